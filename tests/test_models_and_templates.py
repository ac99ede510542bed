"""Your own models (a registry name or a GGUF path, hash checked where given, the pair's tokenizers
compared), chat templates from the GGUF, and main.py's checks that run before any model loads.

Fast tests need no model; the slow ones read the real built-in GGUFs (vocabulary and metadata only,
except one short edge-only answer from a model given by path)."""
import asyncio
import hashlib
import json
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from aiohttp import web

import common.assets as assets
from common.assets import AssetError, MODELS, model_file, model_path
from common.chat_template import CHATML, ChatTemplate, validate_messages
from common.config import ConfigError, load_config
from common.tokenizer_check import check_pair, fingerprint_of, public
from tests.conftest import ROOT

DRAFT, TARGET = "qwen2.5-coder-0.5b-instruct-q4_k_m", "qwen2.5-coder-1.5b-instruct-q4_k_m"
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def one_line_error(r, code=2):
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.fixture
def fake_gguf(tmp_path):
    """A file with GGUF's magic (enough for the path checks; llama.cpp never reads it in these tests)."""
    p = tmp_path / "my model.gguf"
    p.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    return p


# --- chat templates ------------------------------------------------------------------------------

def test_chatml_fallback_and_template_variables():
    t = ChatTemplate.from_metadata({"general.name": "x"})
    assert t.is_chatml_fallback and t.source == CHATML
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"}]
    assert t.render(msgs) == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                              "<|im_start|>assistant\nyo<|im_end|>\n<|im_start|>user\nagain<|im_end|>\n"
                              "<|im_start|>assistant\n")
    assert not t.render(msgs, add_generation_prompt=False).endswith("<|im_start|>assistant\n")
    own = ChatTemplate.from_metadata({"tokenizer.chat_template": "{{ bos_token }}{% for m in messages %}"
                                      "[{{ m.role }}]{{ m.content | tojson }}{% endfor %}{{ eos_token }}"},
                                     bos="<s>", eos="</s>")
    assert not own.is_chatml_fallback
    assert own.render([{"role": "user", "content": "é"}]) == '<s>[user]"é"</s>'


@pytest.mark.parametrize("messages, match", [
    ([], "must not be empty"),
    ("hello", "must be a list"),
    ([{"role": "tool", "content": "x"}], r"messages\[0\]\.role must be one of system, user, assistant, not 'tool'"),
    ([{"role": "user", "content": "a"}, {"role": "user"}], r"messages\[1\]\.content must be a string, not missing"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}]}], r"messages\[0\]\.content must be a string, not list"),
    (["hi"], r"messages\[0\] must be an object"),
])
def test_bad_messages_are_named(messages, match):
    with pytest.raises(ValueError, match=match):
        validate_messages(messages)
    with pytest.raises(ValueError, match=match):
        ChatTemplate(CHATML).render(messages)


def test_template_errors_are_value_errors():
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")
    strict = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok")
    assert strict.render([{"role": "user", "content": "a"}]) == "ok"
    with pytest.raises(ValueError, match="first must be user"):
        strict.render([{"role": "assistant", "content": "a"}])
    with pytest.raises(ValueError, match="refused"):       # the sandbox: no attribute games
        ChatTemplate("{{ messages.__class__.__mro__ }}").render([{"role": "user", "content": "a"}])


# --- tokenizer pairs -----------------------------------------------------------------------------

def vocab(n, **changes):
    items = [f"tok{i}".encode() for i in range(n)]
    for i, piece in changes.items():
        items[int(i.lstrip("_"))] = piece
    return items


def test_same_vocabulary_passes_and_fingerprints_are_json():
    a, b = fingerprint_of(vocab(10000), True), fingerprint_of(vocab(10000), True)
    check_pair(a, b)
    check_pair(public(a), public(b))
    assert json.loads(json.dumps(public(a)))["n_vocab"] == 10000 and "pieces" not in public(a)


def test_size_difference_named():
    with pytest.raises(ValueError, match="the draft has 10000 tokens, the target 10001"):
        check_pair(fingerprint_of(vocab(10000)), fingerprint_of(vocab(10001)))


def test_first_differing_token_named_with_both_pieces():
    a = fingerprint_of(vocab(10000), True)
    b = fingerprint_of(vocab(10000, _7000=b"other", _9000=b"x"), True)
    with pytest.raises(ValueError, match=r"token 7000 is b'tok7000' in the draft and b'other' in the target"):
        check_pair(a, b)
    with pytest.raises(ValueError, match=r"token ids 4096\.\.8191"):     # remote: block hashes only
        check_pair(a, public(b))


def test_piece_boundaries_count():
    """['ab', 'c'] and ['a', 'bc'] concatenate alike; the vocabularies differ."""
    with pytest.raises(ValueError, match="token 0"):
        check_pair(fingerprint_of([b"ab", b"c"], True), fingerprint_of([b"a", b"bc"], True))
    assert fingerprint_of([b"ab", b"c"])["sha256"] != fingerprint_of([b"a", b"bc"])["sha256"]


# --- model files ---------------------------------------------------------------------------------

def test_registry_names_and_paths(tmp_path, fake_gguf):
    with pytest.raises(AssetError, match="unknown model 'qwen-typo'.*or a path to a .gguf file"):
        model_path("qwen-typo", str(tmp_path))
    with pytest.raises(AssetError, match=r"model file .*nowhere/my\.gguf not found"):
        model_path(str(tmp_path / "nowhere" / "my.gguf"), str(tmp_path))
    with pytest.raises(AssetError, match="is not a file"):
        model_path(str(tmp_path) + "/", str(tmp_path))
    text = tmp_path / "notes.gguf"
    text.write_text("hello")
    with pytest.raises(AssetError, match="is not a GGUF file"):
        model_path(str(text), str(tmp_path))
    assert model_path(str(fake_gguf), str(tmp_path)) == fake_gguf.resolve()
    # a registry name is looked up in the cache, never treated as a path
    with pytest.raises(AssetError, match="python -m common.assets install"):
        model_path(DRAFT, str(tmp_path))
    with pytest.raises(AssetError, match="pinned sha256"):
        model_path(DRAFT, str(tmp_path), sha256="0" * 64)


def test_sha256_checked_once_per_file_version(tmp_path, fake_gguf, monkeypatch):
    digest = hashlib.sha256(fake_gguf.read_bytes()).hexdigest()
    calls = []
    real = assets._sha256
    monkeypatch.setattr(assets, "_sha256", lambda p: calls.append(p) or real(p))
    cache = str(tmp_path / "cache")
    with pytest.raises(AssetError, match=f"has sha256 {digest}, not the {'1' * 64} given"):
        model_path(str(fake_gguf), cache, sha256="1" * 64)
    assert model_path(str(fake_gguf), cache, sha256=digest.upper()) == fake_gguf.resolve()
    assert model_path(str(fake_gguf), cache, sha256=digest) == fake_gguf.resolve()
    assert len(calls) == 2                                  # the wrong hash, then the right one once
    fake_gguf.write_bytes(fake_gguf.read_bytes() + b"changed")
    with pytest.raises(AssetError, match="has sha256"):
        model_path(str(fake_gguf), cache, sha256=digest)


def test_model_file_names_the_config_key(tmp_path, fake_gguf):
    cfg = load_config(overrides={"models.cache_dir": str(tmp_path), "models.target": str(fake_gguf),
                                 "models.draft": str(tmp_path / "missing.gguf")})
    assert model_file(cfg.models, "target") == fake_gguf.resolve()
    with pytest.raises(AssetError, match=r"^models\.draft: model file .*missing\.gguf not found$"):
        model_file(cfg.models, "draft")
    with pytest.raises(ConfigError, match=r"models\.target_sha256"):
        load_config(overrides={"models.target_sha256": "abc"})
    assert load_config().models.draft == DRAFT and load_config().models.target == TARGET
    assert set(MODELS) == {DRAFT, TARGET}


# --- main.py: everything checked before a model loads --------------------------------------------

def test_help_prints_each_default_once():
    r = cli("--help", timeout=60)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for opt in ("--max-tokens", "--temperature", "--cloud-url", "--mode"):
        section = text.split(opt, 2)[-1].split(" --", 1)[0]
        assert section.count("default") == 1, (opt, section)
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "--exact" in text and "cloud.exact" in text


def test_usage_errors(tmp_path):
    r = cli("--prompt", "x", "--humaneval", "1", timeout=60)
    assert r.returncode == 2 and "not allowed with argument --prompt" in r.stderr
    r = cli("--mode", "interactive", "--prompt", "x", timeout=60)
    assert r.returncode == 2 and "for --mode client" in r.stderr
    r = cli("--mode", "client", timeout=60)
    assert "needs --prompt" in one_line_error(r)
    # --humaneval 999 fails before the models are looked at (the cache here holds none)
    r = cli("--humaneval", "999", "--set", f"models.cache_dir={tmp_path}", timeout=60)
    assert "--humaneval must be in 0..163" in one_line_error(r)


def test_own_model_path_errors(tmp_path):
    r = cli("--prompt", "x", "--set", f"models.draft={tmp_path}/mine.gguf", timeout=60)
    assert one_line_error(r) == f"error: models.draft: model file {tmp_path}/mine.gguf not found"
    r = cli("--prompt", "x", "--set", "models.target=bogus", timeout=60)
    assert "models.target: unknown model 'bogus'" in one_line_error(r)


@pytest.mark.parametrize("url", ["localhost:8080", "127.0.0.1:8080", "ftp://127.0.0.1:8080", "http://"])
def test_cloud_url_without_scheme_is_one_line(url):
    r = cli("--prompt", "x", "--cloud-url", url, timeout=60)
    assert "must look like http://HOST:PORT" in one_line_error(r)


class TinyServer:
    """An HTTP server on loopback answering GET /health with a given body."""

    def __init__(self, health):
        self.health = health
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        async def handler(request):
            if self.health == "token":
                if "Authorization" in request.headers:
                    return web.json_response({"error": "missing or wrong bearer token"}, status=401)
                return web.json_response({"status": "ok", "auth_required": True})
            if self.health is None:
                return web.Response(text="<html>hello</html>", content_type="text/html")
            return web.json_response(self.health)
        app = web.Application()
        app.router.add_get("/health", handler)
        runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.url = "http://127.0.0.1:%d" % site._server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    def __enter__(self):
        self.thread.start()
        self.ready.wait(10)
        return self.url

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.mark.parametrize("health, says", [
    ({"status": "ok", "draft_model": DRAFT, "cloud": None}, "looks like a Tandem edge"),
    (None, "answered 200 text/html"),
    ({"status": "ok", "protocol": "tandem/0", "backend": "llama_cpp"}, "speaks Tandem protocol 'tandem/0'"),
])
def test_cloud_url_that_is_not_a_cloud(fake_gguf, health, says):
    with TinyServer(health) as url:
        r = cli("--prompt", "x", "--cloud-url", url, "--set", f"models.draft={fake_gguf}", timeout=60)
    line = one_line_error(r)
    assert line.startswith(f"error: {url}") and says in line


@pytest.mark.parametrize("extra, says", [
    ([], "the cloud requires a bearer token; set edge.auth_token"),
    (["--set", "edge.auth_token=wrong"], "missing or wrong bearer token; set edge.auth_token"),
])
def test_cloud_that_wants_a_token_is_exit_3(fake_gguf, extra, says):
    """As cloud/server.py answers with auth_token set: liveness only without a token, 401 for a wrong one."""
    with TinyServer("token") as url:
        r = cli("--prompt", "x", "--cloud-url", url, "--set", f"models.draft={fake_gguf}", *extra, timeout=60)
    assert says in one_line_error(r, 3)


def test_a_real_cloud_is_recognised(tmp_path):
    """identify_cloud against cloud/server.py's own /health (a table target: no model needed), with
    and without its auth token."""
    from cloud.node import CloudNode
    from common.cloud_identity import identify_cloud
    from common.errors import CloudError
    from tests.conftest import TableBackend

    async def body():
        cfg = load_config(overrides={"cloud.auth_token": "s3cret"})
        cloud = await CloudNode.start(cfg, "127.0.0.1", 0, backend=TableBackend())
        try:
            health = await identify_cloud(cloud.url + "/", "s3cret")
            with pytest.raises(CloudError, match="requires a bearer token"):
                await identify_cloud(cloud.url)
            return health
        finally:
            await cloud.close()
    health = asyncio.run(body())
    assert health["backend"] and health["protocol"]


def test_unreachable_cloud_is_exit_3(fake_gguf):
    r = cli("--prompt", "x", "--cloud-url", "http://127.0.0.1:9", "--set", f"models.draft={fake_gguf}", timeout=60)
    assert "unreachable" in one_line_error(r, 3)


def test_exact_flag_sets_cloud_exact(fake_gguf):
    import main
    plan = main.prepare(main.parse_args(["--prompt", "x", "--edge-only", "--exact", "--set",
                                         f"models.draft={fake_gguf}"]))
    assert plan.cfg.cloud.exact is True and plan.target is None and plan.text == "x"
    plan = main.prepare(main.parse_args(["--prompt", "x", "--edge-only", "--set", f"models.draft={fake_gguf}"]))
    assert plan.cfg.cloud.exact is False


# --- real GGUFs ----------------------------------------------------------------------------------

def sparse_copy(src: Path, dst: Path, patch: tuple[bytes, bytes] | None = None, head: int = 16 << 20) -> Path:
    """dst: src's first `head` bytes (the metadata: vocabulary, template), the rest a hole of the same
    size (vocabulary-only loads never read the weights). patch: (old, new) bytes of equal length,
    replaced once in the head."""
    data = bytearray(src.open("rb").read(head))
    if patch:
        old, new = patch
        assert len(old) == len(new) and data.count(old) == 1, old
        i = data.index(old)
        data[i:i + len(old)] = new
    with open(dst, "wb") as f:
        f.write(data)
        f.truncate(src.stat().st_size)
    return dst


def gguf_string(s: str) -> bytes:
    return struct.pack("<Q", len(s)) + s.encode()


@pytest.fixture(scope="module")
def draft_gguf():
    return model_path(DRAFT)


@pytest.mark.slow
def test_builtin_template_reproduces_the_old_prompt_text(draft_gguf):
    from common.prompts import builtin_template, chat, humaneval
    t = ChatTemplate.from_gguf(draft_gguf)
    assert builtin_template().source == t.source and t.eos == "<|im_end|>"

    def old(user, system=QWEN_SYSTEM):       # common/prompts.chat before templates came from the GGUF
        return (f"<|im_start|>system\n{system}<|im_end|>\n"
                f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
    for user in ["Say hi.", humaneval()[0].text, "ünïcode ✓ {{ not jinja }} {% raw %}", "  \n"]:
        assert t.render([{"role": "system", "content": QWEN_SYSTEM}, {"role": "user", "content": user}]) == old(user)
        assert t.render([{"role": "user", "content": user}]) == old(user)    # Qwen's default system prompt
        assert chat(user) == old(user)
        assert chat(user, system="Be brief.") == old(user, "Be brief.")


@pytest.mark.slow
def test_builtin_pair_shares_a_tokenizer(tmp_path):
    from common.tokenizer_check import check_files, fingerprint_file
    check_files(model_path(DRAFT), model_path(TARGET), tmp_path)
    fp = fingerprint_file(model_path(DRAFT), cache=tmp_path)          # now from the cache
    assert fp["n_vocab"] == 151936 and list((tmp_path / "fingerprints").iterdir())


@pytest.mark.slow
def test_a_pair_with_another_tokenizer_is_refused(tmp_path, draft_gguf):
    from common.tokenizer_check import check_files
    other = sparse_copy(draft_gguf, tmp_path / "other.gguf",
                        (gguf_string("<|box_start|>"), gguf_string("<|box_stXrt|>")))
    with pytest.raises(ValueError, match=r"token 151648 is b'<\|box_start\|>' in the draft and "
                                         r"b'<\|box_stXrt\|>' in the target"):
        check_files(draft_gguf, other, tmp_path)
    r = cli("--prompt", "x", "--max-tokens", "2", "--set", f"models.target={other}")
    assert "token 151648" in one_line_error(r) and "starting the embedded" not in r.stderr


@pytest.mark.slow
def test_gguf_without_a_template_gets_chatml(tmp_path, draft_gguf):
    bare = sparse_copy(draft_gguf, tmp_path / "bare.gguf",
                       (gguf_string("tokenizer.chat_template"), gguf_string("tokenizer.chat_templatX")))
    t = ChatTemplate.from_gguf(bare)
    assert t.is_chatml_fallback
    assert t.render([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.slow
def test_own_model_by_path_answers(tmp_path, draft_gguf):
    mine = tmp_path / "mine.gguf"
    mine.symlink_to(draft_gguf)
    pinned = MODELS[DRAFT].sha256
    r = cli("--prompt", "Say hi.", "--edge-only", "--max-tokens", "4", "--json",
            "--set", f"models.draft={mine}", "--set", f"models.draft_sha256={pinned}")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["mode"] == "edge_only" and json.loads(r.stdout)["token_ids"]
    r = cli("--prompt", "Say hi.", "--edge-only", "--set", f"models.draft={mine}",
            "--set", f"models.draft_sha256={'f' * 64}")
    assert "has sha256 " + pinned in one_line_error(r)
