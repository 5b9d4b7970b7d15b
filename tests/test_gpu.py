"""On a CUDA GPU the stages give the CPU's results: the same code runs on either by placement alone.

Skipped where there is no GPU (CI has none). A GPU machine runs it with `python -m pytest tests/test_gpu.py`;
`SAFEGENE_TEST_DEVICE=cpu` runs the same comparisons CPU against CPU, to check the test itself anywhere.
"""

import dataclasses
import os

import pytest
import torch

from safegene.adapter import merge_into_model
from safegene.data.records import PromptResponse
from safegene.evaluation.refusal import RefusalEvalConfig, evaluate_refusal
from safegene.generation import GenerationConfig
from safegene.models import PlacementConfig, load_model, load_tokenizer, model_device
from safegene.recalibration import RecalibrateConfig, recalibrate
from safegene.selection import SelectConfig, select_layers
from safegene.training import LoraTrainConfig, train_lora
from test_placement import IDS, _map

DEVICE = os.environ.get("SAFEGENE_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (CI has none; run it on a GPU machine)")

CPU = PlacementConfig(device="cpu", dtype="float32")
ON_DEVICE = PlacementConfig(device=DEVICE, dtype="float32")
# float32 on two devices: different kernels and summation orders; TF32 matmuls (10-bit mantissa) are kept off
CLOSE = 1e-4


@pytest.fixture(autouse=True)
def no_tf32():
    """PyTorch's default, made sure of: a TF32 matmul would differ from the CPU by far more than CLOSE."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def _scores(ad, d, model, tok, linearize: bool) -> dict[str, float]:
    scfg = SelectConfig(model=str(d), harmful="many-shot-harmful", n_harmful=4, n_benign=4, top_k=2,
                        linearize=linearize)
    return select_layers(ad, scfg, model=model, tokenizer=tok, progress=False).card["selection"]["scores"]


def _recalibration(d, optimizer: str) -> RecalibrateConfig:
    return RecalibrateConfig(task_model=str(d), harmful="many-shot-harmful", task="arithmetic", n_harmful=6,
                             n_task=6, optimizer=optimizer, steps=8, batch_size=4, learning_rate=0.3)


def test_auto_places_on_the_gpu_in_half_precision(tiny_qwen):
    if not DEVICE.startswith("cuda"):
        pytest.skip("auto's choice is the GPU's only where there is one")
    model = load_model(tiny_qwen, PlacementConfig())
    want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("cuda", want)}


def test_float32_on_the_device_gives_the_cpu_numbers(family):
    root, d, ad = family
    tok = load_tokenizer(d)
    cpu, dev = load_model(d, CPU), load_model(d, ON_DEVICE)
    assert model_device(dev).type == torch.device(DEVICE).type
    with torch.no_grad():
        assert (cpu(IDS).logits - dev(IDS.to(model_device(dev))).logits.cpu()).abs().max().item() < CLOSE

    for linearize in (True, False):
        want, got = _scores(ad, d, cpu, tok, linearize), _scores(ad, d, dev, tok, linearize)
        assert got.keys() == want.keys()
        assert all(abs(got[k] - want[k]) <= CLOSE * max(1.0, abs(want[k])) for k in want), (linearize, got, want)

    for optimizer in ("adam", "line-search"):
        want = recalibrate(ad, _recalibration(d, optimizer), model=cpu, tokenizer=tok, progress=False).coefficients
        got = recalibrate(ad, _recalibration(d, optimizer), model=dev, tokenizer=tok, progress=False).coefficients
        assert any(abs(v - 1.0) > 0.05 for v in want.values()), (optimizer, want)  # it fitted something
        assert got.keys() == want.keys() and all(abs(got[l] - want[l]) < 1e-3 for l in want), (optimizer, got, want)

    # the adapter merged on the device: the CPU's merged weights
    merged_cpu = dict(merge_into_model(ad, load_model(d, CPU)).named_parameters())
    merged_dev = dict(merge_into_model(ad, load_model(d, ON_DEVICE)).named_parameters())
    assert max((merged_dev[k].cpu() - w).abs().max().item() for k, w in merged_cpu.items()) < 1e-6

    # greedy answers, through the config (the command's path: it loads the model itself)
    ecfg = RefusalEvalConfig(model=str(d), n_prompts=3, generation=GenerationConfig(max_new_tokens=6))
    answers = {key: [s["response"] for s in evaluate_refusal(dataclasses.replace(ecfg, placement=p),
                                                               progress=False)["samples"]]
               for key, p in (("ref", CPU), ("dev", ON_DEVICE))}
    assert answers["dev"] == answers["ref"] and all(answers["ref"])


def test_lora_training_on_the_device_gives_the_cpu_losses(family):
    root, d, _ = family
    pairs = [PromptResponse(f"What is {i} + {i}? Answer with the number only.", str(2 * i)) for i in range(8)]
    cfg = LoraTrainConfig(max_steps=4, batch_size=2, learning_rate=1e-3)
    losses = {}
    for key, placement in (("ref", CPU), ("dev", ON_DEVICE)):
        tok = load_tokenizer(d, padding_side="right")
        peft_model, stats = train_lora(load_model(d, placement), tok, pairs, cfg, progress=False)
        assert {p.device.type for p in peft_model.parameters()} == {torch.device(placement.device).type}
        losses[key] = stats.losses
    assert len(losses["ref"]) == 4 and len(set(losses["ref"])) == 4  # four steps, on four different batches
    assert all(abs(a - b) < 1e-3 * max(1.0, abs(a)) for a, b in zip(losses["ref"], losses["dev"])), losses


def test_a_model_split_over_the_device_and_the_cpu_gives_the_same_fit(family):
    root, d, ad = family
    tok = load_tokenizer(d)
    here = "cuda:0" if DEVICE.startswith("cuda") else "cpu"
    split = PlacementConfig(device=DEVICE, dtype="float32", device_map=_map(
        {"model.embed_tokens": here, "model.rotary_emb": here, "model.layers.0": here, "model.layers.2": here,
         "model.norm": here, "lm_head": here}))  # layer 1 on the CPU, the rest on the device
    plain, spread = load_model(d, ON_DEVICE), load_model(d, split)
    weights = dict(spread.named_parameters())
    # with a GPU in the map, accelerate offloads a "cpu" layer: its weights stay in CPU memory (the module holds meta
    # tensors, as accelerate does it today) and go to the GPU only while the layer runs
    assert weights["model.layers.1.mlp.down_proj.weight"].device.type in ("meta", "cpu")
    assert weights["model.layers.2.mlp.down_proj.weight"].device.type == torch.device(DEVICE).type
    with torch.no_grad():
        ids = IDS.to(model_device(plain))
        assert (plain(ids).logits.cpu() - spread(IDS.to(model_device(spread))).logits.cpu()).abs().max().item() < CLOSE
    want = recalibrate(ad, _recalibration(d, "adam"), model=plain, tokenizer=tok, progress=False).coefficients
    got = recalibrate(ad, _recalibration(d, "adam"), model=spread, tokenizer=tok, progress=False).coefficients
    assert got.keys() == want.keys() and all(abs(got[l] - want[l]) < 1e-3 for l in want), (got, want)


def test_bfloat16_on_the_device_ranks_the_layers_as_float32(family):
    root, d, ad = family
    tok = load_tokenizer(d)
    s32 = _scores(ad, d, load_model(d, ON_DEVICE), tok, True)
    s16 = _scores(ad, d, load_model(d, dataclasses.replace(ON_DEVICE, dtype="bfloat16")), tok, True)
    assert sorted(s16, key=s16.get) == sorted(s32, key=s32.get), (s16, s32)
    coefficients = recalibrate(ad, dataclasses.replace(_recalibration(d, "adam"), placement=dataclasses.replace(
        ON_DEVICE, dtype="bfloat16")), tokenizer=tok, progress=False).coefficients
    assert all(0.0 < v < 2.0 for v in coefficients.values()) and any(abs(v - 1.0) > 0.05 for v in coefficients.values())
