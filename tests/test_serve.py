"""Serving on a tiny model: the engine's decode loop, per-request adapters, hot swap, the gate, and the HTTP
server driven by the official openai client."""

import http.client
import json
import urllib.error
import urllib.request

import pytest

from safegene.adapter import SafetyAdapter, extract_adapter
from safegene.generation import GenerationConfig, generate
from safegene.adapter.extract import ExtractConfig
from safegene.errors import FamilyMismatchError
from safegene.models import load_model, load_tokenizer
from safegene.serve import Engine, RequestError, SafetyGate, fit_gate
from safegene.serve.server import SafegeneServer
from test_adapter import make_degraded

PROMPTS = ["What is 12 + 7? Answer with the number only.", "Classify the sentiment: positive negative",
           "The quick brown fox"]


def _adapter(tiny, tmp_path, seed=1, scale=40.0) -> SafetyAdapter:
    d = tmp_path / f"D{seed}"
    make_degraded(tiny, d, layers=(0, 1), seed=seed, modules=("q_proj", "o_proj", "down_proj"))
    ad = extract_adapter(ExtractConfig(aligned=str(tiny), degraded=str(d), output=str(tmp_path / "x"), rank=2),
                         progress=False, save=False)
    return ad.with_coefficients(scale)  # strong enough to change greedy outputs of a random model


@pytest.fixture
def engine(tiny_qwen):
    e = Engine(load_model(str(tiny_qwen)), load_tokenizer(str(tiny_qwen)), max_batch=4, max_wait_ms=30)
    yield e
    e.close()


def _chat(p):
    return [{"role": "user", "content": p}]


def test_engine_matches_generate_batched_and_alone(engine, tiny_qwen):
    model, tok = load_model(str(tiny_qwen)), load_tokenizer(str(tiny_qwen))
    want = generate(model, tok, PROMPTS, GenerationConfig(max_new_tokens=8, batch_size=1), progress=False)
    reqs = [engine.submit(_chat(p), None, max_tokens=8) for p in PROMPTS]  # arrive together: one padded batch
    got = [engine.complete(r).strip() for r in reqs]  # generate() strips; a server returns the text as decoded
    assert got == want
    assert engine.stats["max_batch_seen"] >= 2
    assert all(r.completion_tokens <= 8 and r.finish_reason in ("stop", "length") for r in reqs)


def test_engine_applies_the_requested_adapter_only(engine, tiny_qwen, tmp_path):
    ad = _adapter(tiny_qwen, tmp_path)
    engine.load_adapter("safety", ad)
    model, tok = load_model(str(tiny_qwen)), load_tokenizer(str(tiny_qwen))
    cfg = GenerationConfig(max_new_tokens=8, batch_size=1)
    base = generate(model, tok, PROMPTS, cfg, progress=False)
    with ad.attach(model, check=False):
        adapted = generate(model, tok, PROMPTS, cfg, progress=False)
    assert base != adapted
    r1 = [engine.submit(_chat(p), "safety", max_tokens=8) for p in PROMPTS]
    r0 = [engine.submit(_chat(p), None, max_tokens=8) for p in PROMPTS]
    assert [engine.complete(r).strip() for r in r1] == adapted
    assert [engine.complete(r).strip() for r in r0] == base  # the adapter is off again for plain requests
    with pytest.raises(RequestError, match="no safety adapter named 'nope'"):
        engine.submit(_chat("x"), "nope")


def test_hot_swap_keeps_in_flight_requests_and_refuses_bad_adapters(engine, tiny_qwen, tiny_llama, tmp_path):
    old, new = _adapter(tiny_qwen, tmp_path, seed=1), _adapter(tiny_qwen, tmp_path, seed=2)
    model, tok = load_model(str(tiny_qwen)), load_tokenizer(str(tiny_qwen))
    cfg = GenerationConfig(max_new_tokens=24, batch_size=1)
    outs = {}
    for name, ad in (("old", old), ("new", new)):
        with ad.attach(model, check=False):
            outs[name] = generate(model, tok, PROMPTS[:1], cfg, progress=False)[0]
    assert outs["old"] != outs["new"]
    engine.load_adapter("safety", old)
    in_flight = engine.submit(_chat(PROMPTS[0]), "safety", max_tokens=24)
    info = engine.load_adapter("safety", new)  # replaces while the first request is queued or running
    assert info["replaced"] is True
    after = engine.submit(_chat(PROMPTS[0]), "safety", max_tokens=24)
    assert engine.complete(in_flight).strip() == outs["old"]
    assert engine.complete(after).strip() == outs["new"]
    # wrong family: refused with the reason, and the running adapter keeps serving
    llama_ad = _adapter(tiny_llama, tmp_path / "l")
    with pytest.raises(FamilyMismatchError):
        engine.load_adapter("safety", llama_ad)
    assert engine.complete(engine.submit(_chat(PROMPTS[0]), "safety", max_tokens=24)).strip() == outs["new"]
    # removing detaches every hook: plain generation is the model's own again
    engine.remove_adapter("safety")
    base = generate(model, tok, PROMPTS[:1], cfg, progress=False)[0]
    assert engine.complete(engine.submit(_chat(PROMPTS[0]), None, max_tokens=24)).strip() == base
    assert not any(m._forward_hooks for m in engine.model.modules())
    engine.load_adapter("again", new)
    engine.close()  # closing detaches what is still loaded
    assert not any(m._forward_hooks for m in engine.model.modules())


def test_gate_scales_the_adapter_per_request(engine, tiny_qwen, tmp_path):
    # the gate reads the input of the lowest adapted layer; at layer 0 that is the embedding of the template's last
    # token, the same for every prompt, so the adapter here changes layer 1 only and the gate reads layer 1
    ad = _adapter(tiny_qwen, tmp_path).select([1])
    model, tok = engine.model, engine.tokenizer
    gate = fit_gate(model, tok, ["I'm sorry, but I cannot help with that."] * 3 + ["Sure, here is how to do it"],
                    ["What is 12 + 7?", "The quick brown fox", "Classify the sentiment: positive negative", "19"],
                    layer=1)
    assert gate.fit["auc"] > 0.8 and gate.fit["mean_strength_harmful"] > gate.fit["mean_strength_benign"]
    gated = ad._replace(card={**ad.card, "gate": gate.to_dict()})
    engine.load_adapter("gated", gated)
    engine.load_adapter("plain", ad)
    prompts = ["I'm sorry, but I cannot help with that.", "The quick brown fox"]
    reqs = [engine.submit(_chat(p), "gated", max_tokens=6) for p in prompts]
    for r in reqs:
        engine.complete(r)
    strengths = [r.gate_strength for r in reqs]
    assert strengths[0] > 0.5 > strengths[1]
    # a hard gate (tiny temperature: strength exactly 0 or 1) gives the model's own answer on the benign prompt and
    # the full adapter's answer on the harmful one, in the same batch
    hard = SafetyGate(layer=1, direction=gate.direction, threshold=gate.threshold, temperature=1e-9)
    engine.load_adapter("hard", ad._replace(card={**ad.card, "gate": hard.to_dict()}))
    fresh, ftok = load_model(str(tiny_qwen)), load_tokenizer(str(tiny_qwen))
    cfg = GenerationConfig(max_new_tokens=6, batch_size=1)
    alone = generate(fresh, ftok, prompts, cfg, progress=False)
    with ad.attach(fresh, check=False):
        full = generate(fresh, ftok, prompts, cfg, progress=False)
    assert alone[1] != full[1]
    reqs = [engine.submit(_chat(p), "hard", max_tokens=6) for p in prompts]
    got = [engine.complete(r).strip() for r in reqs]
    assert [r.gate_strength for r in reqs] == [1.0, 0.0]
    assert got == [full[0], alone[1]]
    assert engine.complete(engine.submit(_chat(prompts[1]), "plain", max_tokens=6)).strip() == full[1]


# --- HTTP, through the official client --------------------------------------------------------------------------


@pytest.fixture
def server(engine, tiny_qwen, tmp_path):
    engine.load_adapter("safety", _adapter(tiny_qwen, tmp_path))
    engine.max_input_tokens = 64
    srv = SafegeneServer(("127.0.0.1", 0), engine, "tiny", admin_token=None).start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _post(url, body, raw=None, method="POST", headers=None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_openai_client_lists_completes_and_streams(server):
    openai = pytest.importorskip("openai")
    srv, url = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    try:
        _drive_client(openai, client)
    finally:
        client.close()


def _drive_client(openai, client):
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny+safety"]
    for model in ("tiny", "tiny+safety"):
        full = client.chat.completions.create(model=model, messages=_chat(PROMPTS[0]), max_tokens=8)
        assert full.choices[0].finish_reason in ("stop", "length") and full.usage.completion_tokens <= 8
        pieces = list(client.chat.completions.create(model=model, messages=_chat(PROMPTS[0]), max_tokens=8, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
        assert text == full.choices[0].message.content
    plain = client.chat.completions.create(model="tiny", messages=_chat(PROMPTS[0]), max_tokens=8)
    safe = client.chat.completions.create(model="tiny+safety", messages=_chat(PROMPTS[0]), max_tokens=8)
    via_field = client.chat.completions.create(model="tiny", messages=_chat(PROMPTS[0]), max_tokens=8,
                                               extra_body={"safety_adapter": "safety"})
    assert plain.choices[0].message.content != safe.choices[0].message.content
    assert via_field.choices[0].message.content == safe.choices[0].message.content
    with pytest.raises(openai.NotFoundError, match="unknown model"):
        client.chat.completions.create(model="gpt-5", messages=_chat("hi"))
    with pytest.raises(openai.BadRequestError, match="at most 64"):
        client.chat.completions.create(model="tiny", messages=_chat("fox " * 200))


def test_server_answers_bad_requests_with_4xx(server):
    srv, url = server
    status, body = _post(url + "/v1/chat/completions", None, raw=b"{not json")
    assert status == 400 and "malformed JSON" in body["error"]["message"]
    status, body = _post(url + "/v1/chat/completions", {"model": "tiny", "messages": "hello"})
    assert status == 400 and "messages" in body["error"]["message"]
    status, body = _post(url + "/v1/chat/completions", {"messages": _chat("x"), "max_tokens": -3})
    assert status == 400
    status, body = _post(url + "/v1/nothing", {})
    assert status == 404
    # still serving after all that
    status, body = _post(url + "/v1/chat/completions", {"model": "tiny", "messages": _chat("x"), "max_tokens": 2})
    assert status == 200 and body["object"] == "chat.completion"


def test_admin_load_replace_and_refuse(server, tiny_qwen, tmp_path):
    srv, url = server
    ad = _adapter(tiny_qwen, tmp_path / "n", seed=3)
    ad.save(tmp_path / "v2")
    status, info = _post(url + "/admin/adapters", {"name": "safety", "path": str(tmp_path / "v2")})
    assert status == 200 and info["replaced"] is True
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "safegene.json").write_text("{}")
    (tmp_path / "broken" / "safegene_factors.safetensors").write_bytes(b"not safetensors")
    status, body = _post(url + "/admin/adapters", {"name": "safety", "path": str(tmp_path / "broken")})
    assert status == 400 and "corrupt adapter" in body["error"]["message"]
    assert sorted(srv.engine.slots) == ["safety"]  # the running one stays
    srv.admin_token = "s3cret"
    status, body = _post(url + "/admin/adapters", {"name": "x", "path": str(tmp_path / "v2")})
    assert status == 401
    status, body = _post(url + "/admin/adapters/safety", None, raw=b"", method="DELETE",
                         headers={"Authorization": "Bearer s3cret"})
    assert status == 200 and srv.engine.slots == {}


def test_cli_gate_then_serve_in_a_subprocess(tiny_qwen, tmp_path):
    import os
    import socket
    import subprocess
    import sys
    import time

    from safegene.cli import main

    ad = _adapter(tiny_qwen, tmp_path).select([1])
    ad.save(tmp_path / "ad")
    assert main(["gate", "--adapter", str(tmp_path / "ad"), "--model", str(tiny_qwen), "-o", str(tmp_path / "gated"),
                 "--set", "n_harmful=4", "--set", "n_benign=4", "--set", "benign=arithmetic",
                 "--set", "harmful=many-shot-harmful"]) == 0
    gated = SafetyAdapter.load(tmp_path / "gated")
    assert gated.card["gate"]["layer"] == 1 and len(gated.card["gate"]["direction"]) == 32
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "safegene.cli", "serve", "--model", str(tiny_qwen), "--name", "tiny",
                             "--adapter", f"safety={tmp_path / 'gated'}", "--port", str(port)],
                            env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    health = json.loads(r.read())
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()[-2000:]
                time.sleep(0.3)
        assert health["adapters"] == ["safety"] and health["model"] == "tiny"
        status, body = _post(f"http://127.0.0.1:{port}/v1/chat/completions",
                             {"model": "tiny+safety", "messages": _chat("19"), "max_tokens": 3})
        assert status == 200 and body["safegene"]["adapter"] == "safety" and 0 <= body["safegene"]["gate"] <= 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_admin_load_that_fails_for_any_reason_is_a_400_and_keeps_the_running_adapter(server, tiny_qwen, tmp_path):
    # regression: the handler caught SafegeneError only, so an adapter whose loading raised anything else (here a
    # malformed gate in safegene.json: a TypeError on the worker thread) killed it and the client saw a dropped
    # connection, not an answer
    import shutil

    srv, url = server
    _adapter(tiny_qwen, tmp_path / "a", seed=3).save(tmp_path / "good")
    status, _ = _post(url + "/admin/adapters", {"name": "a", "path": str(tmp_path / "good")})
    assert status == 200
    ask = {"model": "tiny+a", "messages": _chat(PROMPTS[0]), "max_tokens": 8}
    status, before = _post(url + "/v1/chat/completions", ask)
    assert status == 200
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in srv.engine.model.modules())
    bad_gate = tmp_path / "bad-gate"
    shutil.copytree(tmp_path / "good", bad_gate)
    card = json.loads((bad_gate / "safegene.json").read_text())
    (bad_gate / "safegene.json").write_text(json.dumps({**card, "gate": {"layer": 0}}))
    not_json = tmp_path / "not-json"
    not_json.mkdir()
    (not_json / "adapter_config.json").write_text("{not json")
    (not_json / "adapter_model.safetensors").write_bytes(b"")
    for corrupt in (bad_gate, not_json):
        status, body = _post(url + "/admin/adapters", {"name": "a", "path": str(corrupt)})
        assert status == 400 and body["error"]["code"] == "bad_adapter", body
        assert "'a' not loaded" in body["error"]["message"]
        status, after = _post(url + "/v1/chat/completions", ask)
        assert status == 200 and after["choices"][0]["message"] == before["choices"][0]["message"]
        assert after["safegene"]["adapter"] == "a"
    # the half-installed adapter left no hook behind
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in srv.engine.model.modules()) == hooks


def test_unexpected_error_is_a_json_500(server, monkeypatch):
    srv, url = server

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(srv.engine, "submit", broken)
    status, body = _post(url + "/v1/chat/completions", {"model": "tiny", "messages": _chat("x")})
    assert status == 500 and body["error"]["type"] == "server_error" and "boom" not in body["error"]["message"]


def _sse(url, body):
    """The data events of a streamed chat completion, parsed ([DONE] kept as the string)."""
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        lines = [ln.decode().removeprefix("data: ").strip() for ln in r if ln.startswith(b"data: ")]
    return [ln if ln == "[DONE]" else json.loads(ln) for ln in lines]


def _text(events):
    return "".join(c["choices"][0]["delta"].get("content", "") for c in events[:-1] if c["choices"])


@pytest.mark.parametrize("field, value", [("max_tokens", "8"), ("max_tokens", 2.5), ("max_tokens", True),
                                          ("temperature", "hot"), ("temperature", 3), ("top_p", 1.5),
                                          ("stream", "yes"), ("messages", [{"role": "user", "content": 5}]),
                                          ("messages", [{"role": "robot", "content": "x"}]), ("messages", []),
                                          ("stop", ["a", "b", "c", "d", "e"]), ("stop", ""), ("seed", "7")])
def test_schema_refuses_bad_types_and_values_with_a_400(server, field, value):
    srv, url = server
    status, body = _post(url + "/v1/chat/completions", {"model": "tiny", "messages": _chat("x"), field: value})
    assert status == 400, body
    assert set(body["error"]) >= {"message", "type", "code"} and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith(field)


def test_schema_refuses_unknown_and_unimplemented_fields_and_n_above_1(server):
    srv, url = server
    ask = {"model": "tiny", "messages": _chat("x"), "max_tokens": 2}
    status, body = _post(url + "/v1/chat/completions", {**ask, "temprature": 0.5})
    assert status == 400 and body["error"]["code"] == "unknown_field" and body["error"]["param"] == "temprature"
    status, body = _post(url + "/v1/chat/completions", {**ask, "frequency_penalty": 0.5})
    assert status == 400 and "'frequency_penalty' is not implemented" in body["error"]["message"]
    status, body = _post(url + "/v1/chat/completions", {**ask, "tools": [{"type": "function"}]})
    assert status == 400 and "'tools'" in body["error"]["message"]
    status, body = _post(url + "/v1/chat/completions", {**ask, "n": 2})
    assert status == 400 and body["error"]["param"] == "n" and "one choice per request" in body["error"]["message"]
    status, body = _post(url + "/v1/chat/completions", {**ask, "max_tokens": 600})
    assert status == 400 and "between 1 and 512" in body["error"]["message"]
    status, body = _post(url + "/v1/chat/completions", {**ask, "max_completion_tokens": 3})
    assert status == 400 and "disagree" in body["error"]["message"]
    # the values that ask for nothing are fine, and so are n=1 and the end-user id
    status, body = _post(url + "/v1/chat/completions", {**ask, "n": 1, "frequency_penalty": 0, "logprobs": False,
                                                        "tools": None, "user": "u-1"})
    assert status == 200 and len(body["choices"]) == 1
    status, body = _post(url + "/v1/chat/completions", {**ask, "messages": [{"role": "user", "content": "x"}] * 2,
                                                        "model": "tiny+nope"})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    status, body = _post(url + "/v1/models", {})
    assert status == 405 and body["error"]["type"] == "invalid_request_error"
    status, body = _post(url + "/v1/chat/completions", None, raw=b"[1, 2]")
    assert status == 400 and body["error"]["message"] == "the request body must be a JSON object"
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Length", str(2 << 20))
    conn.endheaders()  # the server answers before reading a body that big
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["code"] == "request_too_large"
    conn.close()
    status, body = _post(url + "/admin/adapters", {"name": "a/b", "path": "x"})
    assert status == 400 and "without '/' or '+'" in body["error"]["message"]


def test_stop_strings_end_the_answer_whole_and_streamed(server):
    srv, url = server
    ask = {"model": "tiny", "messages": _chat(PROMPTS[2]), "max_tokens": 16}
    status, body = _post(url + "/v1/chat/completions", ask)
    full = body["choices"][0]["message"]["content"]
    assert status == 200 and len(full) >= 8
    stop = full[len(full) // 2: len(full) // 2 + 3]
    want = full[: full.find(stop)]
    status, body = _post(url + "/v1/chat/completions", {**ask, "stop": [stop, "\u2603never"]})
    assert status == 200 and body["choices"][0]["message"]["content"] == want
    assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["completion_tokens"] < 16
    events = _sse(url, {**ask, "stop": stop})
    assert _text(events) == want and events[-2]["choices"][0]["finish_reason"] == "stop"
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-2]) and events[-1] == "[DONE]"


def test_top_p_seed_and_text_parts_are_honoured(server):
    srv, url = server
    ask = {"model": "tiny", "messages": _chat(PROMPTS[1]), "max_tokens": 12}
    greedy = _post(url + "/v1/chat/completions", ask)[1]["choices"][0]["message"]["content"]
    # top_p=0 keeps only the most likely token: sampling at any temperature is greedy decoding
    nucleus = _post(url + "/v1/chat/completions", {**ask, "temperature": 2.0, "top_p": 0.0, "seed": 1})[1]
    assert nucleus["choices"][0]["message"]["content"] == greedy
    seeded = [_post(url + "/v1/chat/completions", {**ask, "temperature": 2.0, "seed": 7})[1] for _ in range(2)]
    others = {_post(url + "/v1/chat/completions", {**ask, "temperature": 2.0, "seed": s})[1]["choices"][0]["message"]
              ["content"] for s in range(8, 12)}
    assert seeded[0]["choices"][0]["message"] == seeded[1]["choices"][0]["message"]
    assert len(others | {greedy}) > 1  # sampling at temperature 2 does change the answer
    parts = {**ask, "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPTS[1]}]}]}
    assert _post(url + "/v1/chat/completions", parts)[1]["choices"][0]["message"]["content"] == greedy
    events = _sse(url, {**ask, "stream_options": {"include_usage": True}})
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] >= 1
    assert _text(events[:-1]) == greedy


def test_engine_and_generate_leave_the_shared_tokenizer_alone(tiny_qwen):
    model, tok = load_model(str(tiny_qwen)), load_tokenizer(str(tiny_qwen), padding_side="right")
    generate(model, tok, PROMPTS[:2], GenerationConfig(max_new_tokens=2), progress=False)
    e = Engine(model, tok)
    try:
        e.complete(e.submit(_chat(PROMPTS[0]), None, max_tokens=2))
    finally:
        e.close()
    assert tok.padding_side == "right"
