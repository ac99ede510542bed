"""Do the draft and the target share one tokenizer? Speculation sends token ids, so the two models must
map every id to the same piece; a pair that does not is refused before anything runs.

fingerprint(model) summarises a vocabulary: its size, a sha256 over all token pieces in id order, and
one short hash per block of ids, small enough for the cloud's /health. check_pair(draft, target)
raises a ValueError naming the difference: the sizes, or the first differing token id and both pieces
(when both fingerprints carry their pieces, as local ones do), else the first differing block of ids.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Iterator

BLOCK = 4096          # ids per block hash: a 151k vocabulary gives 38 hashes of 16 hex digits


def pieces(model) -> list[bytes]:
    """Every token's piece in id order, from llama.cpp's vocabulary; `model` is a llama_cpp.Llama or a
    llama_cpp._internals.LlamaModel (both hold the llama_model pointer as `.model`)."""
    import llama_cpp
    vocab = llama_cpp.llama_model_get_vocab(model.model)
    n = llama_cpp.llama_vocab_n_tokens(vocab)
    return [llama_cpp.llama_vocab_get_text(vocab, i) or b"" for i in range(n)]


def _digest(items: list[bytes]) -> hashlib._Hash:
    h = hashlib.sha256()
    for p in items:                          # length-prefixed: no two vocabularies hash alike by accident
        h.update(len(p).to_bytes(4, "little"))
        h.update(p)
    return h


def fingerprint_of(items: list[bytes], with_pieces: bool = False) -> dict:
    """{"n_vocab", "sha256", "block", "blocks"} of the pieces in id order (+ "pieces", a list of bytes,
    if with_pieces: keep those out of JSON; see public())."""
    fp = {"n_vocab": len(items), "sha256": _digest(items).hexdigest(), "block": BLOCK,
          "blocks": [_digest(items[i:i + BLOCK]).hexdigest()[:16] for i in range(0, len(items), BLOCK)]}
    if with_pieces:
        fp["pieces"] = items
    return fp


def fingerprint(model, with_pieces: bool = False) -> dict:
    """The fingerprint of a loaded llama.cpp model's vocabulary (a Llama or a LlamaModel)."""
    return fingerprint_of(pieces(model), with_pieces)


@contextlib.contextmanager
def vocab_only(path: str | Path) -> Iterator:
    """A GGUF's llama.cpp model with its vocabulary and metadata only (no weights): a fraction of a
    second even for large models."""
    import llama_cpp
    from llama_cpp import _internals
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = _internals.LlamaModel(path_model=str(path), params=params, verbose=False)
    try:
        yield model
    finally:
        model.close()


def fingerprint_file(path: str | Path, with_pieces: bool = False, cache: str | Path | None = None) -> dict:
    """A GGUF's fingerprint. Without pieces it is kept in the cache (keyed by the file's path, size
    and mtime), so that checking a pair at every start costs milliseconds, not a vocabulary load."""
    path = Path(path).resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path} {st.st_size} {st.st_mtime_ns}".encode()).hexdigest()[:32]
    stored = Path(cache) / "fingerprints" / f"{key}.json" if cache is not None else None
    if stored is not None and not with_pieces:
        with contextlib.suppress(OSError, ValueError):
            return json.loads(stored.read_text())
    with vocab_only(path) as model:
        fp = fingerprint(model, with_pieces)
    if stored is not None:
        with contextlib.suppress(OSError):
            stored.parent.mkdir(parents=True, exist_ok=True)
            stored.write_text(json.dumps(public(fp)))
    return fp


def check_files(draft: str | Path, target: str | Path, cache: str | Path | None = None) -> None:
    """check_pair for two local GGUFs: cached fingerprints first; on a difference, the pieces of both
    to name the first differing token."""
    a, b = fingerprint_file(draft, cache=cache), fingerprint_file(target, cache=cache)
    if a["n_vocab"] == b["n_vocab"] and a["sha256"] != b["sha256"]:
        a, b = fingerprint_file(draft, with_pieces=True), fingerprint_file(target, with_pieces=True)
    check_pair(a, b)


def public(fp: dict) -> dict:
    """The JSON-safe part of a fingerprint (what a cloud's /health carries)."""
    return {k: v for k, v in fp.items() if k != "pieces"}


def check_pair(draft_fp: dict, target_fp: dict) -> None:
    """ValueError unless both fingerprints describe the same vocabulary."""
    if draft_fp["n_vocab"] != target_fp["n_vocab"]:
        raise ValueError(f"the draft and target tokenizers differ: the draft has {draft_fp['n_vocab']} tokens, "
                         f"the target {target_fp['n_vocab']}; pick models of one family (same tokenizer)")
    if draft_fp["sha256"] == target_fp["sha256"]:
        return
    if "pieces" in draft_fp and "pieces" in target_fp:
        for i, (a, b) in enumerate(zip(draft_fp["pieces"], target_fp["pieces"])):
            if a != b:
                raise ValueError(f"the draft and target tokenizers differ: token {i} is {a!r} in the draft "
                                 f"and {b!r} in the target (both have {draft_fp['n_vocab']} tokens)")
    block = draft_fp.get("block")
    if block and block == target_fp.get("block"):
        for j, (a, b) in enumerate(zip(draft_fp["blocks"], target_fp["blocks"])):
            if a != b:
                first = j * block
                raise ValueError(f"the draft and target tokenizers differ in token ids {first}.."
                                 f"{min(first + block, draft_fp['n_vocab']) - 1}; both have "
                                 f"{draft_fp['n_vocab']} tokens")
    raise ValueError(f"the draft and target tokenizers differ (token piece hashes {draft_fp['sha256'][:12]} vs "
                     f"{target_fp['sha256'][:12]}); both have {draft_fp['n_vocab']} tokens")
