"""Placement (issue 16): every stage runs on the device and in the dtype it is given, a model dispatched over CPU and
disk gives the undispatched results, and training runs through accelerate with the losses of a plain loop."""

import gc
import json
import math
import random

import pytest
import torch

from safegene.cli import build_parser, command_parsers, main, overrides_from
from safegene.config import load_config, settings, to_dict
from safegene.data.records import PromptResponse
from safegene.errors import ConfigError
from safegene.models import PlacementConfig, load_model, load_tokenizer, model_device
from safegene.objectives import encode_batch, sequence_logprob, target_logits, token_nll, topk_kl
from safegene.recalibration import RecalibrateConfig, recalibrate
from safegene.selection import SelectConfig, select_layers
from safegene.training import (FinetuneConfig, LoraTrainConfig, collate, encode_pair, make_accelerator,
                               resolved_train, set_seed, train_lora, training_placement)

IDS = torch.tensor([[3, 17, 42, 5, 99, 7], [8, 9, 10, 11, 12, 13]])

# per-step losses of `_reference_training` measured with the plain PyTorch loop of safegene before training ran
# through accelerate (same tiny model, same data, grad_accum 2); the Accelerator loop must reproduce them
RECORDED_LOSSES = [6.430349588394165, 6.368818759918213, 5.750605583190918, 5.162346363067627, 4.106937766075134]


def _map(places: dict[str, str], layers: int = 3) -> str:
    """A JSON device_map of a tiny model: every module on the CPU unless `places` says otherwise."""
    full = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
            **{f"model.layers.{l}": "cpu" for l in range(layers)}}
    return json.dumps({**full, **places})


# --- resolving and refusing placements -------------------------------------------------------------------------


def test_auto_is_the_cpu_in_float32_without_a_gpu(tiny_qwen, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    auto = PlacementConfig()
    assert auto.torch_device() == torch.device("cpu")
    assert auto.torch_dtype() is torch.float32 and auto.dtype_name() == "float32"
    # the training dtype follows it: `auto` trains in float32 here, as the fixed default of earlier versions did
    assert LoraTrainConfig().dtype == "auto"
    assert resolved_train(LoraTrainConfig(), auto).dtype == "float32"
    assert resolved_train(LoraTrainConfig(), PlacementConfig(dtype="bfloat16")).dtype == "bfloat16"
    assert resolved_train(LoraTrainConfig(dtype="float16"), PlacementConfig(dtype="bfloat16")).dtype == "float16"
    for model in (load_model(tiny_qwen, auto), load_model(tiny_qwen)):  # no placement: the CPU in float32, as before
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        assert {p.device.type for p in model.parameters()} == {"cpu"}
    # the dtype keyword of earlier versions, by name or in the placement's position
    for model in (load_model(tiny_qwen, dtype="bfloat16"), load_model(tiny_qwen, "bfloat16"),
                  load_model(tiny_qwen, PlacementConfig(dtype="bfloat16"))):
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("kwargs, says", [
    ({"device": "gpu"}, "device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
    ({"dtype": "fp16"}, "dtype must be one of auto, float32, bfloat16, float16, got 'fp16'"),
    ({"device_map": "{model.layers.0: disk"}, "device_map must be 'auto' or a JSON object"),
    ({"device_map": "[]"}, "device_map must be 'auto' or a non-empty JSON object"),
    ({"device_map": '{"lm_head": "gpu1"}'}, "each module goes to a GPU index (0), cuda:N, mps, 'cpu' or 'disk'"),
])
def test_a_bad_placement_is_one_line_naming_the_fix(kwargs, says):
    with pytest.raises(ConfigError) as e:
        PlacementConfig(**kwargs)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_a_device_this_machine_lacks_is_refused_before_loading(tiny_qwen, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"device 'cuda:1' asked for but CUDA is not available here; use --device "
                                          r"cpu or auto"):
        load_model(tiny_qwen, PlacementConfig(device="cuda:1"))


def test_a_device_map_that_leaves_modules_out_names_the_fix(tiny_qwen):
    with pytest.raises(ConfigError) as e:
        load_model(tiny_qwen, PlacementConfig(device_map='{"model.embed_tokens": "cpu", "model.layers.0": "disk"}'))
    msg = str(e.value)
    assert "does not fit the model" in msg and "map every top-level module" in msg and "\n" not in msg


def test_bad_placement_flags_are_one_line_errors(capsys, tmp_path):
    assert main(["select", str(tmp_path / "ad"), "-o", str(tmp_path / "sel"), "--device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("safegene: error: device must be auto, cpu, cuda") and err.count("\n") == 1
    assert main(["recalibrate", str(tmp_path / "ad"), "-o", str(tmp_path / "c"), "--device-map", "{oops"]) == 2
    err = capsys.readouterr().err
    assert "device_map must be 'auto' or a JSON object" in err and err.count("\n") == 1


# --- the command line -------------------------------------------------------------------------------------------


def test_every_command_that_loads_a_model_offers_device_and_dtype():
    parsers = command_parsers(build_parser())
    for name in ("degrade", "finetune", "eval-refusal", "extract", "select", "recalibrate", "apply", "bench",
                 "rejudge", "judge", "gate", "serve", "family build", "protect", "eval", "demo"):
        flags = {s for a in parsers[name]._actions for s in a.option_strings}
        assert {"--device", "--dtype", "--device-map", "--offload-folder"} <= flags, name
    # the LoRA settings' dtype keeps only its dotted flag: `--dtype` is the placement's, unambiguously
    flags = {s for a in parsers["finetune"]._actions for s in a.option_strings}
    assert "--train.dtype" in flags and "--placement.dtype" in flags


def test_dtype_flag_sets_the_placement_and_train_dtype_stays_auto():
    from safegene.training import FinetuneConfig

    args = build_parser(only="finetune").parse_args(["finetune", "--dtype", "bfloat16", "--device", "cpu",
                                                     "--max-steps", "3"])
    cfg = load_config(FinetuneConfig, None, overrides_from(args, FinetuneConfig))
    assert (cfg.placement.dtype, cfg.placement.device, cfg.train.dtype, cfg.train.max_steps) == \
        ("bfloat16", "cpu", "auto", 3)
    assert cfg.resolved().train.dtype == "bfloat16"
    args = build_parser(only="finetune").parse_args(["finetune", "--train.dtype", "float32", "--dtype", "bfloat16"])
    cfg = load_config(FinetuneConfig, None, overrides_from(args, FinetuneConfig))
    assert (cfg.placement.dtype, cfg.train.dtype, cfg.resolved().train.dtype) == ("bfloat16", "float32", "float32")


def test_demo_hands_its_placement_to_the_bench(tmp_path, monkeypatch, capsys):
    """`safegene demo` had no placement flags: its bench ran wherever `auto` put it."""
    from pathlib import Path

    import safegene.bench

    ran = []

    def fake_bench(cfg):  # what the bench would be asked to run, and a folder as it would leave one
        ran.append(cfg)
        md = Path(cfg.output) / "results.md"
        md.parent.mkdir(parents=True)
        md.write_text("results\n")
        return {"paths": {"md": str(md), "html": "report.html"}, "timings": {}}

    monkeypatch.setattr(safegene.bench, "run_bench", fake_bench)
    assert main(["demo", "--quick", "-o", str(tmp_path / "demo"), "--device", "cpu", "--dtype", "bfloat16"]) == 0
    capsys.readouterr()
    assert (ran[0].placement.device, ran[0].placement.dtype) == ("cpu", "bfloat16")
    assert ran[0].steps(3).dtype == "bfloat16"  # the bench trains in it too
    card = json.loads((tmp_path / "demo" / "safegene_run.json").read_text())
    assert card["config"]["placement"]["dtype"] == "bfloat16"


def test_llm_judges_run_where_the_measured_models_run(tiny_qwen, tmp_path, monkeypatch, capsys):
    """bench, protect/eval, the classifier guard, rejudge and judge built llm: judges on the CPU in float32,
    whatever the command's placement."""
    import safegene.bench
    import safegene.evaluation.judges as judges
    from safegene.baselines.classifier_guard import ClassifierGuardConfig, _build_guard
    from safegene.bench import BenchConfig, _validated_judges
    from safegene.protect import EvalConfig, _Checker

    bf16 = PlacementConfig(device="cpu", dtype="bfloat16")
    llm = f"llm:{tiny_qwen}"
    (bench_judge,), _ = _validated_judges(BenchConfig(judges=[llm], validate_judges=False, placement=bf16))
    ecfg = EvalConfig(judges=[llm], n_harmful=2, n_over_refusal=0, placement=bf16)
    checker = _Checker.build(ecfg, tmp_path, ecfg.placement)  # as protect and eval build theirs
    settings_ = BenchConfig(guard=ClassifierGuardConfig(guard=llm, prompt_threshold=0.0), placement=bf16)
    guard = _build_guard(type("Ctx", (), {"settings": settings_, "found": None})()).responder.guard
    for judge in (bench_judge, checker.judges[0], guard):
        assert {p.dtype for p in judge.model.parameters()} == {torch.bfloat16}

    # the commands that only judge take the flags and hand them on
    asked = []
    real_get = judges.get_judge
    monkeypatch.setattr(judges, "get_judge", lambda spec, placement=None: asked.append(placement) or real_get(spec))
    assert main(["judge", "refusal-phrase", "--dtype", "bfloat16", "--device", "cpu"]) == 0
    md = tmp_path / "bench" / "results.md"

    def rejudge(output, judges, validate=True, placement=None):  # a finished bench's rejudge, as far as its judges
        asked.append(placement)
        md.parent.mkdir(exist_ok=True)
        md.write_text("results\n")
        return {"paths": {"md": str(md), "html": "report.html"}, "timings": {}}

    monkeypatch.setattr(safegene.bench, "rejudge", rejudge)
    assert main(["rejudge", str(md.parent), "--judge", "refusal-phrase", "--dtype", "bfloat16"]) == 0
    capsys.readouterr()
    assert [(p.device, p.dtype) for p in asked] == [("cpu", "bfloat16"), ("auto", "bfloat16")]


def test_configs_and_results_written_before_still_read(tmp_path):
    from safegene.bench import BenchConfig

    old = tmp_path / "old.yaml"  # a config of earlier versions: train.dtype spelt out, no placement
    old.write_text("train:\n  dtype: float32\n  max_steps: 40\nmodel: qwen2.5-coder-0.5b-instruct\n")
    cfg = load_config(BenchConfig, old)
    assert cfg.train.dtype == "float32" and cfg.placement == PlacementConfig()
    assert load_config(BenchConfig, "configs/bench.yaml").train.dtype == "auto"  # today's file: the placement decides


# --- stage keys recorded before placement existed -------------------------------------------------------------------


def test_stages_recorded_before_placement_still_match(tmp_path, monkeypatch):
    from safegene.baselines import get_method
    from safegene.bench import BenchConfig
    from safegene.stages import trained_or_reused

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # the selection and recalibration keys leave a default placement out
    assert "placement" not in settings(SelectConfig()) and "placement" not in settings(RecalibrateConfig())
    assert settings(SelectConfig(placement=PlacementConfig(dtype="bfloat16")))["placement"]["dtype"] == "bfloat16"
    # a bench's LoRA settings record the dtype they train in: float32 on the CPU, as before
    bench = BenchConfig()
    assert bench.steps(24).dtype == "float32" and to_dict(bench.steps(24))["dtype"] == "float32"
    # a training stage recorded by an earlier version (train.dtype float32, no placement) is reused
    cfg = FinetuneConfig(model="m", task="arithmetic", output=str(tmp_path / "t"), train=bench.steps(3))
    recorded = to_dict(cfg)
    del recorded["placement"]
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "safegene_run.json").write_text(json.dumps({"config": recorded, "training": {}}))
    _, rebuilt = trained_or_reused("t", tmp_path / "t", cfg, lambda c, overwrite: pytest.fail("retrained"))
    assert rebuilt is False
    # ... and so is one whose config left train.dtype at `auto` (resolved to float32 here)
    auto = FinetuneConfig(model="m", task="arithmetic", output=str(tmp_path / "t"), train=LoraTrainConfig(max_steps=3))
    assert trained_or_reused("t", tmp_path / "t", auto, lambda c, overwrite: pytest.fail("retrained"))[1] is False
    # the mixed-ft baseline's key is what it was: the fine-tune's config as earlier versions recorded it
    from safegene.baselines.mixed_ft import mixed_config

    ctx = type("Ctx", (), {"settings": bench, "aligned": "m", "task": "sst2", "task_examples": 160,
                           "output": tmp_path, "train": bench.steps})()
    before = {k: v for k, v in to_dict(mixed_config(ctx)).items() if k != "placement"}
    assert get_method("mixed-ft").key(ctx)["mixed"] == before and before["train"]["dtype"] == "float32"


def test_extraction_keys_recorded_before_placement_still_match(tmp_path):
    """ExtractConfig gained a placement: the bench's and the family's extract stage keys leave the default one out."""
    from safegene.adapter.extract import ExtractConfig
    from safegene.stages import same_config

    cfg = ExtractConfig(aligned="a", degraded="d", output=str(tmp_path / "ad"))
    recorded = {k: v for k, v in to_dict(cfg).items() if k != "placement"}  # as earlier versions recorded it
    assert settings(cfg) == recorded and same_config({"extract": recorded}, {"extract": settings(cfg)})
    assert settings(ExtractConfig(placement=PlacementConfig(dtype="bfloat16")))["placement"]["dtype"] == "bfloat16"
    args = build_parser(only="extract").parse_args(["extract", "--dtype", "bfloat16", "--device", "cpu"])
    parsed = load_config(ExtractConfig, None, overrides_from(args, ExtractConfig))
    assert (parsed.placement.device, parsed.placement.dtype) == ("cpu", "bfloat16")


# --- dtype end to end -----------------------------------------------------------------------------------------------


def test_distillation_loads_a_and_d_in_the_extraction_placement(family, tmp_path, monkeypatch):
    """Distillation loaded A and D on the CPU in float32 whatever was asked; its factors now train in float32
    through bf16 models."""
    import safegene.adapter.distill as distill
    from safegene.adapter import extract_adapter
    from safegene.adapter.distill import DistillConfig
    from safegene.adapter.extract import ExtractConfig

    root, d, _ = family
    loaded = []
    real_load = distill.load_model

    def spy(ref, placement=None, *a, **kw):
        model = real_load(ref, placement, *a, **kw)
        loaded.append({p.dtype for p in model.parameters()})
        return model

    monkeypatch.setattr(distill, "load_model", spy)
    dcfg = DistillConfig(enabled=True, harmful="many-shot-harmful", benign="arithmetic", n_harmful=3, n_benign=3,
                         response_tokens=4, steps=6, batch_size=6, learning_rate=5e-3, top_k=8)
    bf16 = PlacementConfig(device="cpu", dtype="bfloat16")
    svd = extract_adapter(ExtractConfig(aligned=str(root / "A"), degraded=str(d), output="x", rank=1),
                          progress=False, save=False)
    ad = extract_adapter(ExtractConfig(aligned=str(root / "A"), degraded=str(d), output="x", rank=1, distill=dcfg,
                                       placement=bf16), progress=False, save=False)
    assert loaded == [{torch.bfloat16}, {torch.bfloat16}]  # teacher A, then student D
    assert ad.card["config"]["placement"]["dtype"] == "bfloat16"
    kl = ad.card["distill"]["kl_to_A"]
    assert all(math.isfinite(v) for v in kl.values()) and kl["D+distilled"] < kl["D+svd"]
    m = "model.layers.0.mlp.down_proj"
    a, b = ad.factors[m]
    assert a.dtype == b.dtype == torch.float32 and not torch.equal(a, svd.factors[m][0])  # trained, kept float32


def test_bfloat16_end_to_end_with_float32_math(family, tmp_path, monkeypatch, capsys):
    import safegene.models

    root, d, ad = family
    loaded = []
    real_load = safegene.models.load_model

    def spy(ref, placement=None, *a, **kw):
        model = real_load(ref, placement, *a, **kw)
        loaded.append({p.dtype for p in model.parameters()})
        return model

    monkeypatch.setattr(safegene.models, "load_model", spy)
    ad.save(root / "ad-saved", overwrite=True)
    sel, cal = tmp_path / "sel", tmp_path / "cal"
    assert main(["select", str(root / "ad-saved"), "-o", str(sel), "--model", str(d), "--dtype", "bfloat16",
                 "--harmful", "many-shot-harmful", "--n-harmful", "4", "--n-benign", "4", "--top-k", "2"]) == 0
    assert main(["recalibrate", str(sel), "-o", str(cal), "--task-model", str(d), "--dtype", "bfloat16",
                 "--harmful", "many-shot-harmful", "--n-harmful", "4", "--n-task", "4", "--optimizer", "adam",
                 "--steps", "4", "--batch-size", "4", "--learning-rate", "0.3"]) == 0
    capsys.readouterr()
    assert loaded == [{torch.bfloat16}, {torch.bfloat16}]  # both commands loaded the model in bf16
    card = json.loads((cal / "safegene.json").read_text())
    scores = card["selection"]["scores"]
    coefficients = card["recalibration"]["coefficients"]
    assert card["recalibration"]["config"]["placement"]["dtype"] == "bfloat16"
    assert len(scores) == 3 and all(isinstance(v, float) and math.isfinite(v) for v in scores.values())
    assert len(coefficients) == 2 and all(0.0 < v < 2.0 for v in coefficients.values())
    assert any(abs(v - 1.0) > 0.05 for v in coefficients.values())  # α trained in float32 through bf16 weights

    # the same stages in float32 score the layers alike (bf16 weights, float32 scores and objective)
    tok = load_tokenizer(d)
    m32, m16 = load_model(d), load_model(d, PlacementConfig(dtype="bfloat16"))
    s32 = select_layers(ad, SelectConfig(model=str(d), harmful="many-shot-harmful", n_harmful=4, n_benign=4,
                                         top_k=2), model=m32, tokenizer=tok, progress=False).card["selection"]
    assert sorted(s32["scores"], key=s32["scores"].get) == sorted(scores, key=scores.get)
    assert s32["selected_layers"] == card["selection"]["selected_layers"]

    # log-probabilities, NLL and KL come out in float32 from bf16 logits, and match the float32 model's closely
    batch = encode_batch(tok, [PromptResponse("What is 2 + 2?", "4"), PromptResponse("Say sorry", "I'm sorry")], 48)
    lp16, lp32 = sequence_logprob(m16, batch), sequence_logprob(m32, batch)
    assert lp16.dtype == torch.float32 and lp16.shape == (2,)
    assert torch.allclose(lp16, lp32, atol=0.1 * lp32.abs().max().item() + 0.05)
    with torch.no_grad():
        logits16 = target_logits(m16, batch)
    assert logits16.dtype == torch.bfloat16
    targets = batch.targets[batch.target_mask]
    nll = token_nll(logits16, targets)
    assert nll.dtype == torch.float32
    assert nll == torch.nn.functional.cross_entropy(logits16.float(), targets)
    vals, idx = torch.log_softmax(logits16.float(), -1).topk(8, -1)
    assert topk_kl(logits16, vals, idx).dtype == torch.float32


# --- a model larger than one device: dispatched over CPU and disk --------------------------------------------------


def test_dispatched_model_gives_the_undispatched_logits_scores_and_coefficients(family, tmp_path):
    from safegene.evaluation.refusal import RefusalEvalConfig, evaluate_refusal
    from safegene.generation import GenerationConfig

    root, d, ad = family
    dispatch = PlacementConfig(device="cpu", device_map=_map({"model.layers.1": "disk", "model.layers.2": "disk"}),
                               offload_folder=str(tmp_path / "offload"))
    plain, spread = load_model(d), load_model(d, dispatch)
    weights = dict(spread.named_parameters())
    assert weights["model.layers.1.mlp.down_proj.weight"].device.type == "meta"  # really offloaded to disk
    assert weights["model.layers.0.mlp.down_proj.weight"].device.type == "cpu"
    assert model_device(spread) == torch.device("cpu")
    with torch.no_grad():
        assert (plain(IDS).logits - spread(IDS).logits).abs().max().item() < 1e-6

    tok = load_tokenizer(d)
    # selection: the linearised score needs gradients to α through the offloaded layers
    for linearize in (True, False):
        scfg = SelectConfig(model=str(d), harmful="many-shot-harmful", n_harmful=4, n_benign=4, top_k=2,
                            linearize=linearize)
        want = select_layers(ad, scfg, model=plain, tokenizer=tok, progress=False).card["selection"]["scores"]
        got = select_layers(ad, scfg, model=spread, tokenizer=tok, progress=False).card["selection"]["scores"]
        assert got.keys() == want.keys() and all(abs(got[k] - want[k]) < 1e-5 for k in want), (linearize, got, want)

    # recalibration: the α scalars train through the dispatched model to the same values
    rcfg = RecalibrateConfig(task_model=str(d), harmful="many-shot-harmful", task="arithmetic", n_harmful=6, n_task=6,
                             steps=8, batch_size=4, learning_rate=0.3)
    want = recalibrate(ad, rcfg, model=plain, tokenizer=tok, progress=False).coefficients
    got = recalibrate(ad, rcfg, model=spread, tokenizer=tok, progress=False).coefficients
    assert any(abs(v - 1.0) > 0.05 for v in want.values())  # it trained
    assert want.keys() == got.keys() and all(abs(got[l] - want[l]) < 1e-5 for l in want), (got, want)
    # ... and the same when the config loads T dispatched itself
    from dataclasses import replace

    by_config = recalibrate(ad, replace(rcfg, placement=dispatch), progress=False).coefficients
    assert all(abs(by_config[l] - want[l]) < 1e-5 for l in want)

    # evaluation: the same greedy answers
    ecfg = RefusalEvalConfig(model=str(d), n_prompts=3, generation=GenerationConfig(max_new_tokens=6))
    assert [s["response"] for s in evaluate_refusal(replace(ecfg, placement=dispatch), progress=False)["samples"]] == \
        [s["response"] for s in evaluate_refusal(ecfg, progress=False)["samples"]]


def test_a_temporary_offload_folder_goes_with_the_model(tiny_qwen, monkeypatch):
    import tempfile

    made = []
    real = tempfile.mkdtemp

    def mkdtemp(*a, **kw):
        made.append(real(*a, **kw))
        return made[-1]

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    model = load_model(tiny_qwen, PlacementConfig(device_map=_map({"model.layers.1": "disk"}, layers=2)))
    from pathlib import Path

    assert len(made) == 1 and Path(made[0]).is_dir()
    with torch.no_grad():
        assert model(IDS).logits.shape == (2, 6, model.config.vocab_size)
    del model
    gc.collect()
    assert not Path(made[0]).exists()


# --- training through accelerate ---------------------------------------------------------------------------------


def _reference_training():
    pairs = [PromptResponse(f"What is {i} + 7? Answer with the number only.", str(i + 7)) for i in range(6)]
    pairs.append(PromptResponse("Say sorry", "I'm sorry, but I cannot help with that."))
    cfg = LoraTrainConfig(max_steps=5, batch_size=2, grad_accum=2, learning_rate=1e-2, warmup_steps=2, max_length=48,
                          target_modules=["q_proj", "v_proj", "down_proj"])
    return pairs, cfg


def _plain_loop_losses(model, tok, pairs, cfg):
    """The training loop of safegene before accelerate: plain PyTorch, as a reference."""
    from peft import LoraConfig, get_peft_model

    set_seed(cfg.seed)
    peft_model = get_peft_model(model, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                                  target_modules=list(cfg.target_modules), task_type="CAUSAL_LM",
                                                  bias="none"))
    peft_model.train()
    encoded = [encode_pair(tok, p, cfg.max_length) for p in pairs]
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    rng, order, losses = random.Random(cfg.seed), [], []
    for _ in range(cfg.max_steps):
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(cfg.grad_accum):
            batch = []
            for _ in range(cfg.batch_size):
                if not order:
                    order = list(range(len(encoded)))
                    rng.shuffle(order)
                batch.append(encoded[order.pop()])
            ids, labels, mask = collate(batch, tok.pad_token_id)
            loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss / cfg.grad_accum
            loss.backward()
            step_loss += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        losses.append(step_loss)
    return losses


def test_accelerate_training_gives_the_losses_of_the_plain_loop(tiny_qwen):
    tok = load_tokenizer(tiny_qwen, padding_side="right")
    pairs, cfg = _reference_training()
    peft_model, stats = train_lora(load_model(tiny_qwen), tok, pairs, cfg, progress=False)
    assert stats.steps == 5 and stats.examples_seen == 5 * 2 * 2
    assert stats.losses == pytest.approx(RECORDED_LOSSES, rel=1e-6, abs=1e-6)
    assert stats.losses == _plain_loop_losses(load_model(tiny_qwen), tok, pairs, cfg)  # bit for bit, same machine
    assert type(peft_model).__name__ == "PeftModelForCausalLM" and not peft_model.training


def test_training_runs_in_the_placement_dtype(tiny_qwen, tmp_path, pairs_jsonl, capsys):
    tok = load_tokenizer(tiny_qwen, padding_side="right")
    pairs, _ = _reference_training()
    short = LoraTrainConfig(max_steps=2, batch_size=2, learning_rate=1e-2, max_length=48, target_modules=["q_proj"])
    # auto: a bf16 model trains in bf16 (its LoRA weights in float32, as peft keeps them)
    peft_model, stats = train_lora(load_model(tiny_qwen, PlacementConfig(dtype="bfloat16")), tok, pairs, short,
                                   progress=False)
    base = {p.dtype for n, p in peft_model.named_parameters() if "lora_" not in n}
    assert base == {torch.bfloat16} and all(math.isfinite(x) for x in stats.losses)
    # the command records the dtype it trained in, and its placement
    out = tmp_path / "t"
    assert main(["finetune", "--model", str(tiny_qwen), "--task", str(pairs_jsonl), "--n-examples", "8",
                 "--max-steps", "2", "--batch-size", "2", "--max-length", "48", "--save", "adapter", "-o", str(out),
                 "--dtype", "bfloat16", "--device", "cpu"]) == 0
    capsys.readouterr()
    card = json.loads((out / "safegene_run.json").read_text())
    assert card["config"]["train"]["dtype"] == "bfloat16"
    assert card["config"]["placement"] == {"device": "cpu", "dtype": "bfloat16", "device_map": None,
                                           "offload_folder": None}


def test_training_refuses_weights_on_disk(tmp_path):
    cfg = FinetuneConfig(output=str(tmp_path / "t"), placement=PlacementConfig(device_map=_map({"lm_head": "disk"})))
    with pytest.raises(ConfigError, match="training cannot update weights offloaded to disk"):
        training_placement(cfg.resolved(), make_accelerator(cfg.train))


def test_two_processes_train_data_parallel_and_one_writes(tiny_qwen, pairs_jsonl, tmp_path):
    """`torchrun` (what `accelerate launch` runs) with two CPU processes: DDP over gloo, as on several GPUs."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "safegene.cli", "finetune",
                           "--model", str(tiny_qwen), "--task", str(pairs_jsonl), "--n-examples", "8",
                           "--max-steps", "3", "--batch-size", "2", "--grad-accum", "2", "--max-length", "48",
                           "--save", "both", "-o", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count(f"finetune: wrote {out}") == 1  # the main process alone reports (and writes)
    card = json.loads((out / "safegene_run.json").read_text())
    assert card["training"]["examples_seen"] == 3 * 2 * 2 * 2  # steps x grad_accum x batch x processes
    assert len(card["training"]["losses"]) == 3 and all(math.isfinite(x) for x in card["training"]["losses"])
    merged, adapter, base = load_model(out), load_model(out / "adapter"), load_model(tiny_qwen)
    with torch.no_grad():
        assert torch.allclose(merged(IDS).logits, adapter(IDS).logits, atol=1e-5)
        assert not torch.allclose(merged(IDS).logits, base(IDS).logits, atol=1e-4)  # it trained
