import json

import pytest
import torch

from safegene.training import DegradeConfig, FinetuneConfig, IGNORE_INDEX, LoraTrainConfig, degrade, encode_pair, finetune, train_lora
from safegene.data.records import PromptResponse
from safegene.errors import OutputExistsError
from safegene.models import load_model, load_tokenizer


def test_loss_mask_covers_prompt_only(tiny_qwen):
    tok = load_tokenizer(tiny_qwen)
    pair = PromptResponse("What is 12 + 7?", "19")
    ex = encode_pair(tok, pair, max_length=64)
    n_masked = sum(1 for x in ex.labels if x == IGNORE_INDEX)
    response_ids = [t for t, l in zip(ex.input_ids, ex.labels) if l != IGNORE_INDEX]
    assert tok.decode(response_ids) == "19<|im_end|>"  # the answer and the end-of-turn, nothing else
    assert tok.decode(ex.input_ids[:n_masked]).endswith("<|im_start|>assistant\n")
    assert not ex.truncated


def test_truncation_keeps_the_end_of_the_prompt(tiny_qwen):
    tok = load_tokenizer(tiny_qwen)
    ex = encode_pair(tok, PromptResponse("word " * 200 + "QUESTION?", "answer " * 50), max_length=40)
    assert len(ex.input_ids) == 40 and ex.truncated
    assert "assistant" in tok.decode(ex.input_ids)
    assert any(l != IGNORE_INDEX for l in ex.labels)


def test_lora_training_fits_the_data(tiny_qwen):
    tok = load_tokenizer(tiny_qwen, padding_side="right")
    model = load_model(tiny_qwen)
    pairs = [PromptResponse("What is 12 + 7?", "19"), PromptResponse("Say sorry", "I'm sorry, but I cannot help")]
    cfg = LoraTrainConfig(rank=8, alpha=16, max_steps=30, batch_size=2, learning_rate=2e-2, warmup_steps=1,
                          target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model, stats = train_lora(model, tok, pairs, cfg, progress=False)
    assert stats.steps == 30 and stats.examples_seen == 60
    assert stats.losses[-1] < 0.3 * stats.losses[0]
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any("down_proj" in n for n in trainable) and not any("gate_proj" in n for n in trainable)


def test_training_is_reproducible(tiny_qwen):
    tok = load_tokenizer(tiny_qwen, padding_side="right")
    pairs = [PromptResponse(f"q{i}", f"a{i}") for i in range(6)]
    cfg = LoraTrainConfig(max_steps=3, batch_size=2, learning_rate=1e-2)
    a = train_lora(load_model(tiny_qwen), tok, pairs, cfg, progress=False)[1].losses
    b = train_lora(load_model(tiny_qwen), tok, pairs, cfg, progress=False)[1].losses
    assert a == b


def _small_train(**kw):
    return LoraTrainConfig(max_steps=4, batch_size=2, learning_rate=1e-2, max_length=48, **kw)


def test_degrade_writes_peft_adapter_and_merged_model(tiny_qwen, pairs_jsonl, tmp_path):
    from peft import PeftModel

    out = tmp_path / "degraded"
    cfg = DegradeConfig(model=str(tiny_qwen), data=str(pairs_jsonl), n_examples=8, output=str(out), save="both",
                        train=_small_train())
    card = degrade(cfg, progress=False)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()
    written = json.loads((out / "safegene_run.json").read_text())
    assert written["config"]["train"]["max_steps"] == 4 and written["data"]["n_pairs"] == 8
    assert card["training"]["steps"] == 4

    # plain PEFT loads the adapter, and base + adapter equals the merged model
    base = load_model(tiny_qwen)
    peft_model = PeftModel.from_pretrained(base, str(out / "adapter"))
    merged = load_model(out)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(peft_model(ids).logits, merged(ids).logits, atol=1e-4)
        assert not torch.allclose(load_model(tiny_qwen)(ids).logits, merged(ids).logits, atol=1e-4)
    # loading the adapter folder as a model reference merges it onto its base
    with torch.no_grad():
        assert torch.allclose(load_model(out / "adapter")(ids).logits, merged(ids).logits, atol=1e-4)


def test_existing_output_and_input_are_never_overwritten(tiny_qwen, pairs_jsonl, tmp_path):
    before = (tiny_qwen / "model.safetensors").read_bytes()
    cfg = DegradeConfig(model=str(tiny_qwen), data=str(pairs_jsonl), n_examples=4, output=str(tiny_qwen), train=_small_train())
    with pytest.raises(OutputExistsError, match="overlaps the input"):
        degrade(cfg, overwrite=True, progress=False)
    assert (tiny_qwen / "model.safetensors").read_bytes() == before
    out = tmp_path / "exists"
    out.mkdir()
    cfg.output = str(out)
    with pytest.raises(OutputExistsError, match="already exists"):
        degrade(cfg, progress=False)


def test_diverging_training_stops_with_advice(tiny_qwen):
    tok = load_tokenizer(tiny_qwen, padding_side="right")
    pairs = [PromptResponse(f"q{i}", f"a{i}") for i in range(4)]
    with pytest.raises(FloatingPointError, match="lower learning_rate"):
        train_lora(load_model(tiny_qwen), tok, pairs, LoraTrainConfig(max_steps=3, batch_size=2, learning_rate=float("inf")),
                   progress=False)


def test_failure_while_writing_leaves_no_output(tiny_qwen, pairs_jsonl, tmp_path, monkeypatch):
    import safegene.training as training

    def broken_save(peft_model, tokenizer, out_dir, save, base_ref):
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(training, "save_trained", broken_save)
    out = tmp_path / "never"
    cfg = DegradeConfig(model=str(tiny_qwen), data=str(pairs_jsonl), n_examples=4, output=str(out), train=_small_train())
    with pytest.raises(OSError, match="disk full"):
        degrade(cfg, progress=False)
    assert not out.exists() and list(tmp_path.glob(".never*")) == []


def test_finetune_mixes_the_requested_poison(tiny_qwen, tmp_path):
    out = tmp_path / "task"
    cfg = FinetuneConfig(model=str(tiny_qwen), task="arithmetic", n_examples=20, poison_ratio=0.2,
                         output=str(out), save="adapter", train=_small_train())
    card = finetune(cfg, progress=False)
    assert card["data"]["n_poison"] == 4 and card["data"]["n_task"] == 16
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    cfg_json = json.loads((out / "adapter_config.json").read_text())
    assert cfg_json["base_model_name_or_path"] == str(tiny_qwen.resolve())
