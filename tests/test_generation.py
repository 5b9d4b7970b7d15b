"""Fast generation: length-sorted batches, finished rows dropped from the running batch (token-identical outputs),
JSONL resume with sorted order, and the vLLM backend's plumbing (vLLM itself is not installed here)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from safegene.errors import ConfigError, SafegeneError
from safegene.generation import (
    GenerationConfig, Sampling, decode, generate_detailed, generate_to_jsonl, left_pad, prompt_token_ids,
    read_jsonl_rows, stop_token_ids,
)

PROMPTS = [
    "What is 12 + 7?", "Classify the sentiment: positive negative. The quick brown fox jumps over the lazy dog",
    "Sure", "You are a helpful assistant. What is 12 + 7? Answer with the number only.", "Hi",
    "The quick brown fox jumps over the lazy dog 0123456789 and then some more words to make it long",
    "I'm sorry", "Answer with the number only: 19",
]


@pytest.fixture(scope="module")
def tiny():
    from tiny import make_model

    return make_model(layers=2, hidden=32, seed=3)


def _batch(tok, prompts):
    return left_pad(prompt_token_ids(tok, prompts), tok)


def _run(model, tok, sampling, stop_ids, drop):
    seen = []

    def on_token(i, tokens, finish):
        seen.append((i, len(tokens), finish))
        return False

    ids, mask = _batch(tok, PROMPTS[: len(sampling)])
    rows = decode(model, ids, mask, sampling, stop_ids, on_token, drop_finished=drop)
    return [(r.tokens, r.finish_reason) for r in rows], seen


def test_dropping_finished_rows_is_token_identical(tiny, monkeypatch):
    from transformers import DynamicCache

    model, tok = tiny
    # a stop token the model does emit part-way through some rows, found with no stop tokens at all
    free, _ = _run(model, tok, [Sampling(12)] * 6, set(), drop=False)
    counts: dict[int, int] = {}
    for tokens, _ in free:
        for t in set(tokens[1:8]):
            counts[t] = counts.get(t, 0) + 1
    stop = {max(counts, key=counts.get)}
    sampling = [Sampling(n) for n in (2, 12, 5, 12, 1, 9)]  # and rows that end by length at different steps

    selects = []
    real = DynamicCache.batch_select_indices
    monkeypatch.setattr(DynamicCache, "batch_select_indices",
                        lambda self, idx: (selects.append(idx.tolist()), real(self, idx))[1])
    kept, seen_kept = _run(model, tok, sampling, stop, drop=False)
    assert selects == []
    dropped, seen_dropped = _run(model, tok, sampling, stop, drop=True)
    assert dropped == kept  # same tokens, same finish reasons, row by row
    assert seen_dropped == seen_kept  # on_token saw the same rows (input numbering) at the same lengths
    assert len(selects) >= 2 and all(len(s) < 6 for s in selects)  # the batch really shrank, more than once
    lengths = [len(t) for t, _ in kept]
    assert len(set(lengths)) >= 4 and {"stop", "length"} <= {f for _, f in kept}, kept


def test_dropping_keeps_each_sampled_rows_random_stream(tiny):
    model, tok = tiny
    sampling = [Sampling(n, temperature=0.9, seed=10 + i) for i, n in enumerate((3, 10, 1, 10, 4, 7))]
    kept, _ = _run(model, tok, sampling, set(), drop=False)
    dropped, _ = _run(model, tok, sampling, set(), drop=True)
    assert dropped == kept


def test_sorted_batches_answer_in_input_order_with_less_padding(tiny, monkeypatch):
    import safegene.generation as gen

    model, tok = tiny
    widths: list[tuple[int, int]] = []
    real = gen.decode

    def spy(model, input_ids, attention_mask, *a, **kw):
        widths.append((int(attention_mask.numel()), int(attention_mask.sum())))
        return real(model, input_ids, attention_mask, *a, **kw)

    monkeypatch.setattr(gen, "decode", spy)
    today = generate_detailed(model, tok, PROMPTS, GenerationConfig(max_new_tokens=8, batch_size=3, sort_by_length=False,
                                                                    drop_finished=False), progress=False)
    pads_today = sum(w - n for w, n in widths)
    widths.clear()
    fast = generate_detailed(model, tok, PROMPTS, GenerationConfig(max_new_tokens=8, batch_size=3), progress=False)
    pads_sorted = sum(w - n for w, n in widths)
    assert [g.text for g in fast] == [g.text for g in today]
    assert [g.tokens for g in fast] == [g.tokens for g in today]
    lengths = sorted((len(r) for r in prompt_token_ids(tok, PROMPTS)), reverse=True)
    batches = [lengths[i : i + 3] for i in range(0, len(lengths), 3)]
    assert pads_sorted == sum(max(b) * len(b) - sum(b) for b in batches) < pads_today  # batched longest first
    # one batch holding every prompt: sorting only permutes its rows, and the answers must come back un-permuted
    alone = [generate_detailed(model, tok, [p], GenerationConfig(max_new_tokens=8), progress=False)[0].text
             for p in PROMPTS[:3]]
    assert [g.text for g in fast[:3]] == alone


def test_jsonl_resume_with_sorted_order_ends_in_item_order(tiny, tmp_path):
    model, tok = tiny
    items = [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)]
    cfg = GenerationConfig(max_new_tokens=4, batch_size=3)
    calls: list[list[str]] = []

    def responder(model, tok, prompts, cfg, progress=False):
        calls.append(list(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt  # cut off after the first batch was written
        return generate_detailed(model, tok, prompts, cfg, progress=False)

    path = tmp_path / "out.jsonl"
    with pytest.raises(KeyboardInterrupt):
        generate_to_jsonl(model, tok, items, path, cfg, progress=False, responder=responder)
    first = read_jsonl_rows(path)
    lengths = {it["id"]: len(prompt_token_ids(tok, [it["prompt"]])[0]) for it in items}
    longest = sorted(lengths, key=lambda k: -lengths[k])[:3]
    assert [r["id"] for r in first] == longest  # longest prompts first, written as they finished

    calls.clear()
    rows = generate_to_jsonl(model, tok, items, path, cfg, progress=False,
                             responder=lambda m, t, p, c, progress=False: (calls.append(list(p)),
                                                                           generate_detailed(m, t, p, c, progress=False))[1])
    answered = [p for c in calls for p in c]
    assert sorted(answered) == sorted(it["prompt"] for it in items if it["id"] not in longest)  # only the rest
    assert [r["id"] for r in rows] == [it["id"] for it in items]
    assert [r["id"] for r in read_jsonl_rows(path)] == [it["id"] for it in items]  # file rewritten in item order
    assert {r["id"]: r["response"] for r in read_jsonl_rows(path)}[longest[0]] == first[0]["response"]
    mtime = path.stat().st_mtime_ns
    generate_to_jsonl(model, tok, items, path, cfg, progress=False)
    assert path.stat().st_mtime_ns == mtime  # all answered and in order: untouched


# --- the vLLM backend --------------------------------------------------------------------------------------------


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="backend must be one of transformers, vllm"):
        GenerationConfig(backend="tgi")


def _imported_modules(module: str) -> set[str]:
    """Every module `module`'s source imports, at its top or inside a function, as absolute names."""
    import ast
    import importlib.util
    from pathlib import Path

    tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
    package = module.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package if node.level else ""
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            names.add(".".join(filter(None, (base, node.module))))
            names |= {".".join(filter(None, (base, node.module, a.name))) for a in node.names}
    return names


def test_backends_are_found_by_name_without_an_import_cycle(tiny, monkeypatch):
    """generation imported generation_vllm (when asked for vLLM), which imported generation: a cycle. Both now take
    what they share from generation_backends, which imports neither, and generation finds vLLM by its name."""
    import safegene.generation as generation
    import safegene.generation_backends as backends

    assert "safegene.generation_vllm" not in _imported_modules("safegene.generation")
    assert "safegene.generation" not in _imported_modules("safegene.generation_vllm")
    assert not {"safegene.generation", "safegene.generation_vllm"} & _imported_modules("safegene.generation_backends")
    # the names callers import from safegene.generation are the registry module's own
    assert generation.BACKENDS == ("transformers", "vllm")
    assert generation.GenerationConfig is backends.GenerationConfig and generation.Generated is backends.Generated
    assert generation.prompt_token_ids is backends.prompt_token_ids
    assert backends.backend("transformers") is generation.generate_transformers
    assert backends.backend("vllm").__module__ == "safegene.generation_vllm"
    with pytest.raises(ConfigError, match="backend must be one of transformers, vllm, got 'tgi'"):
        backends.backend("tgi")
    # reached through the registry, the vLLM backend still says how to install vLLM where it is missing
    model, tok = tiny
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(SafegeneError, match="backend vllm needs the vllm package.*pip install vllm"):
        generate_detailed(model, tok, PROMPTS[:1], GenerationConfig(backend="vllm"), progress=False)


def test_vllm_lora_ranks_round_up_to_what_vllm_builds():
    from safegene.generation_vllm import lora_rank_for

    assert [lora_rank_for(r) for r in (1, 8, 9, 17, 300, 512)] == [8, 8, 16, 32, 320, 512]
    with pytest.raises(SafegeneError, match="rank 600.*lower --rank"):
        lora_rank_for(600)


def test_vllm_backend_without_vllm_says_how_to_install(tiny, monkeypatch):
    model, tok = tiny
    monkeypatch.setitem(sys.modules, "vllm", None)  # what an environment without vllm looks like to `import`
    with pytest.raises(SafegeneError) as e:
        generate_detailed(model, tok, PROMPTS[:2], GenerationConfig(backend="vllm"), progress=False)
    msg = str(e.value)
    assert "pip install vllm" in msg and "--backend transformers" in msg and "\n" not in msg


class FakeLLM:
    """Records what safegene asks of vLLM and answers every prompt with its first 3 prompt tokens plus a stop."""

    instances: list["FakeLLM"] = []

    def __init__(self, **kw):
        self.kw, self.calls = kw, []
        FakeLLM.instances.append(self)

    def generate(self, prompts, params, use_tqdm=True, lora_request=None):
        self.calls.append({"prompts": prompts, "params": params, "lora_request": lora_request})
        stop = params.kw["stop_token_ids"][0]
        return [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=p["prompt_token_ids"][:3] + [stop])])
                for p in prompts]


@pytest.fixture
def fake_vllm(monkeypatch):
    import safegene.generation_vllm as gv

    vllm = types.ModuleType("vllm")
    vllm.LLM = FakeLLM
    vllm.SamplingParams = lambda **kw: types.SimpleNamespace(kw=kw)
    lora, request = types.ModuleType("vllm.lora"), types.ModuleType("vllm.lora.request")
    request.LoRARequest = lambda name, int_id, path: types.SimpleNamespace(lora_name=name, lora_int_id=int_id,
                                                                           lora_path=path)
    for name, mod in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, mod)
    FakeLLM.instances.clear()
    monkeypatch.setattr(gv, "_engine", {})
    monkeypatch.setattr(gv, "_lora_ids", {})
    return gv


def _adapter(model):
    from safegene.adapter import SafetyAdapter
    from safegene.models.fingerprint import fingerprint_model

    g = torch.Generator().manual_seed(0)
    factors = {f"model.layers.{l}.self_attn.q_proj": (torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g))
               for l in (0, 1)}
    return SafetyAdapter(factors=factors, coefficients={0: 0.5, 1: 1.5},
                         card={"fingerprint": fingerprint_model(model).to_dict()})


def test_vllm_backend_serves_the_folder_and_the_attached_adapter_as_lora(tiny_qwen, fake_vllm, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from safegene.models import load_model, load_tokenizer

    monkeypatch.setattr(fake_vllm.tempfile, "gettempdir", lambda: str(tmp_path))
    model, tok = load_model(tiny_qwen), load_tokenizer(tiny_qwen)
    cfg = GenerationConfig(backend="vllm", max_new_tokens=5)
    plain = generate_detailed(model, tok, PROMPTS[:3], cfg, progress=False)
    llm = FakeLLM.instances[0]
    assert llm.kw["model"] == str(tiny_qwen) and llm.kw["enable_lora"] is True and llm.kw["max_lora_rank"] == 16
    assert llm.kw["generation_config"] == "vllm" and llm.kw["dtype"] == "float32"
    call = llm.calls[0]
    assert call["lora_request"] is None
    ids = prompt_token_ids(tok, PROMPTS[:3])
    assert [p["prompt_token_ids"] for p in call["prompts"]] == ids  # the chat-templated ids, no second BOS
    assert call["params"].kw["max_tokens"] == 5 and call["params"].kw["temperature"] == 0.0
    assert sorted(call["params"].kw["stop_token_ids"]) == sorted(stop_token_ids(model, tok))
    assert [g.tokens for g in plain] == [3, 3, 3]  # the stop token is not counted
    assert plain[0].text == tok.decode(ids[0][:3], skip_special_tokens=True).strip()

    adapter = _adapter(model)
    with adapter.attach(model):
        generate_detailed(model, tok, PROMPTS[:2], cfg, progress=False)
    req = FakeLLM.instances[0].calls[1]["lora_request"]
    assert len(FakeLLM.instances) == 1  # rank 2 fits the engine's 16: the same engine
    assert req.lora_int_id == 1
    sd = load_file(f"{req.lora_path}/adapter_model.safetensors")
    b1 = next(v for k, v in sd.items() if "layers.1." in k and "lora_B" in k)
    assert torch.allclose(b1, 1.5 * adapter.factors["model.layers.1.self_attn.q_proj"][1])  # coefficient folded in
    with adapter.attach(model):  # the same adapter again: the same id and folder
        generate_detailed(model, tok, PROMPTS[:2], cfg, progress=False)
    assert FakeLLM.instances[0].calls[2]["lora_request"].lora_path == req.lora_path


def test_vllm_backend_refuses_weights_changed_in_memory(tiny_qwen, fake_vllm):
    from safegene.adapter.runtime import merge_into_model
    from safegene.models import load_model, load_tokenizer

    model, tok = load_model(tiny_qwen), load_tokenizer(tiny_qwen)
    merge_into_model(_adapter(model), model)  # T's weights now differ from the folder vLLM would load
    with pytest.raises(SafegeneError, match=r"differs from its folder .*layers\.0\.self_attn\.q_proj.*--backend transformers"):
        generate_detailed(model, tok, PROMPTS[:1], GenerationConfig(backend="vllm"), progress=False)
    assert FakeLLM.instances == []  # refused before any engine was built

