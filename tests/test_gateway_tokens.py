"""The gateway's tokenizer: routing on token ids, and what reaches the engine.

The engine is the real fake engine's app recording every body it receives
(``RecordingEngine``); the gateway is the real one on uvicorn; the Hugging Face tokenizer
is a real ``tokenizer.json`` written here by the ``tokenizers`` package (nothing is
downloaded).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import httpx
else:
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")

from test_gateway_behaviours import RecordingEngine
from test_gateway_e2e import EXAMPLES, GatewayThread, _cache_aware, _load_example, gateway_mod

fake_engine = _load_example("fake_engine")

SYSTEM = "You are a terse assistant who answers in one line. " * 4


def _hf_tokenizer(tmp_path: Path) -> tuple[Path, Any]:
    """A small word-level tokenizer.json with a BOS token added to every encoding."""
    tokenizers = pytest.importorskip("tokenizers")
    words = sorted(set((SYSTEM + " hello world the sky is blue why <|user|> <|system|>").split()))
    vocab = {"[UNK]": 0, "[BOS]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", 1)]
    )
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path, tok


def _post(gw: GatewayThread, path: str, body: dict[str, Any] | bytes) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(
        gw.url + path, content=content, headers={"content-type": "application/json"}, timeout=10
    )
    assert r.status_code == 200, r.text
    return r


def test_fake_tokenizer_routes_on_the_engines_ids_and_forwards_them() -> None:
    engine = RecordingEngine()
    gw: GatewayThread | None = None
    try:
        gw = GatewayThread([engine.url], _cache_aware(), tokenizer="fake", read_timeout=10.0)
        gw.start()
        prompt = SYSTEM + "why is the sky blue?"
        ids = fake_engine.token_ids(prompt)
        assert len(ids) == -(-len(prompt) // 4)  # one id per 4 characters, as the engine

        # Completions with a text prompt: forwarded as its ids, the other fields kept.
        body = {"model": "fake-model", "prompt": prompt, "max_tokens": 2, "seed": 7}
        r1 = _post(gw, "/v1/completions", body)
        sent = json.loads(engine.bodies[-1])
        assert sent == {**body, "prompt": ids}
        assert list(sent) == list(body)  # key order kept too
        assert engine.headers[-1]["content-length"] == str(len(engine.bodies[-1]))
        # The engine counts the same tokens from the ids as it would from the text.
        assert int(r1.headers["x-prompt-tokens"]) == len(ids)
        r2 = _post(gw, "/v1/completions", {"prompt": prompt, "max_tokens": 2})
        assert int(r2.headers["x-cached-tokens"]) == len(ids) // 16 * 16
        # The policy routed on token ids: the tokens tree holds them, the text tree nothing.
        policy = gw.gateway.policy
        tokens_tree = policy.tree("default", "tokens")
        assert tokens_tree is not None and policy.tree("default", "text") is None
        assert tokens_tree.match_lengths(ids) == {engine.url: len(ids)}

        # Chat: routed on the ids of the fake engine's template, forwarded byte for byte.
        raw = (
            b'{"messages": [{"role": "system", "content": "' + SYSTEM.encode() + b'"},'
            b' {"role": "user", "content": "hello \\u00e9"}], "max_tokens": 2,  "x": 1e3}'
        )
        _post(gw, "/v1/chat/completions", raw)
        assert engine.bodies[-1] == raw
        messages = json.loads(raw)["messages"]
        chat_ids = fake_engine.token_ids(fake_engine.chat_prompt(messages))
        assert tokens_tree.match_lengths(chat_ids) == {engine.url: len(chat_ids)}

        # Token ids and batches of prompts go through as they came.
        for raw in (b'{"prompt": [5, 6, 7], "max_tokens": 1}',
                    b'{"prompt": ["a", "b"], "max_tokens": 1}'):  # fmt: skip
            _post(gw, "/v1/completions", raw)
            assert engine.bodies[-1] == raw
        assert gw.gateway.stats()["tokenizer"] == "fake"
    finally:
        if gw is not None:
            gw.stop()
        engine.stop()


def test_hugging_face_tokenizer_json(tmp_path: Path) -> None:
    path, tok = _hf_tokenizer(tmp_path)
    engine = RecordingEngine()
    gw: GatewayThread | None = None
    try:
        gw = GatewayThread([engine.url], _cache_aware(), tokenizer=str(path), read_timeout=10.0)
        gw.start()
        prompt = SYSTEM + "why is the sky blue"
        ids = tok.encode(prompt).ids
        assert ids[0] == 1 and 0 not in ids  # BOS added, every word known
        _post(gw, "/v1/completions", {"prompt": prompt, "max_tokens": 2})
        assert json.loads(engine.bodies[-1])["prompt"] == ids
        # Chat: the plain template's ids (the file has no chat template of its own).
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello"}]
        _post(gw, "/v1/chat/completions", {"messages": messages, "max_tokens": 2})
        chat_ids = tok.encode(fake_engine.chat_prompt(messages)).ids
        tree = gw.gateway.policy.tree("default", "tokens")
        assert tree is not None
        assert tree.match_lengths(chat_ids) == {engine.url: len(chat_ids)}
        assert tree.match_lengths(ids) == {engine.url: len(ids)}

        # A text the tokenizer refuses (a lone surrogate) is a clear 400, not a 500.
        r = httpx.post(
            gw.url + "/v1/completions",
            content=b'{"prompt": "\\ud800 hello"}',
            headers={"content-type": "application/json"},
            timeout=10,
        )
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "prompt" and "tokenized" in error["message"]
        assert len(engine.bodies) == 2
    finally:
        if gw is not None:
            gw.stop()
        engine.stop()


def _run_main(*args: str, block_tokenizers: bool = False) -> subprocess.CompletedProcess[str]:
    """``python examples/gateway.py ARGS`` (optionally as if ``tokenizers`` were missing)."""
    code = (
        "import runpy, sys\n"
        + ("sys.modules['tokenizers'] = None\n" if block_tokenizers else "")
        + f"sys.argv = ['gateway.py', *{list(args)!r}]\n"
        + f"runpy.run_path({str(EXAMPLES / 'gateway.py')!r}, run_name='__main__')\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def test_tokenizer_startup_errors_are_clear(tmp_path: Path) -> None:
    worker = ("--worker", "http://127.0.0.1:9")
    missing = _run_main(*worker, "--tokenizer", str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and "no such file" in missing.stderr, missing.stderr
    junk = tmp_path / "junk.json"
    junk.write_text("not json")
    bad = _run_main(*worker, "--tokenizer", str(junk))
    assert bad.returncode == 2 and "not a tokenizer.json" in bad.stderr, bad.stderr
    path, _ = _hf_tokenizer(tmp_path)
    no_pkg = _run_main(*worker, "--tokenizer", str(path), block_tokenizers=True)
    assert no_pkg.returncode == 2, no_pkg.stderr
    assert "needs the 'tokenizers' package" in no_pkg.stderr, no_pkg.stderr
    for line in (missing.stderr, bad.stderr, no_pkg.stderr):
        assert "Traceback" not in line

    with pytest.raises(gateway_mod.TokenizerError, match="no such file"):
        gateway_mod.load_tokenizer(str(tmp_path / "nope.json"))
    assert gateway_mod.load_tokenizer(None) is None
    fake = gateway_mod.load_tokenizer("fake")
    assert fake.encode("abcdefgh") == fake_engine.token_ids("abcdefgh")
