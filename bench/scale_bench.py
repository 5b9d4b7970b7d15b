"""Scale benchmark: selection, recalibration and generation on a random-initialised model of a real shape.

    python bench/scale_bench.py                    # CUDA: Qwen2.5-7B shape in bfloat16; CPU: Qwen2.5-0.5B in float32
    python bench/scale_bench.py --shape tiny --output /tmp/scale_tiny.json     # a smoke test, seconds

The weights are random (no download; the costs do not depend on the values), the tokenizer is the embedded default
model's (Qwen2.5's vocabulary), and the adapter is random rank-8 factors on every target module of every layer. Each
stage runs through the library API, as `protect` runs it:
  * layer selection (`select_layers`, refusal-gain, linearised) on a few harmful + benign prompts,
  * recalibration (`recalibrate`) on 8 layers spread evenly from layer 0 (the worst case: every pass re-runs the
    whole model from the lowest selected layer; a random adapter's own selection would be arbitrary): the default
    line search whole (seconds of each phase), and the Adam fit's seconds per optimiser step, from two runs of
    different step counts (so the one-off activation capture is not counted),
  * the same line search on 8 layers at the relative depth of the default model's own selection (12-17, 22, 23 of
    24: the realistic case, where the cache of the lower layers saves most),
  * generation (`generate_detailed`): tokens/s batched vs one prompt at a time (a random model rarely emits a stop
    token, so every answer runs to max_new_tokens: a like-for-like count),
  * re-align (`train_lora`, the `realign` baseline's training: LoRA on the same refusal and task shots, the bench's
    24 steps) on the same loaded model, its LoRA layers taken out after, so issue 15's ratio `recalibrate_vs_realign`
    is measured at this shape on this machine: recalibration seconds / re-align's training seconds. Re-align's cost
    does not grow with the shots (24 steps of 4 examples) and recalibration's does, so the ratio rises with --recal-shots.
Memory per stage: torch.cuda.max_memory_allocated on a GPU (reset before each stage), else the peak RSS sampled
every 5 ms while the stage runs. Writes bench/results/scale_<device>.json (`--output`) after every stage; a stage that
fails is recorded under `errors` and the others still run. With `--repeat N` the stage figures are the last repeat's
and `repeats` lists every repeat's seconds and ratios.

On a machine where the embedded model's package cannot be installed (a GPU box with no registry), `--tokenizer DIR`
takes the tokenizer's files alone (tokenizer.json, tokenizer_config.json, chat_template.jinja), and the two data files
the stages read (pyrit's many_shot_examples.json, uncensorbench's prompts.json) can sit in their package folders on
PYTHONPATH: the data loaders find them by package name.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import threading
import time
import traceback
from pathlib import Path

MB = 2**20

SHAPES = {
    # config.json of Qwen/Qwen2.5-7B-Instruct
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, rope_theta=1e6,
                       max_position_embeddings=32768, rms_norm_eps=1e-6),
    # config.json of Qwen/Qwen2.5-0.5B-Instruct (the embedded default model's shape)
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                         max_position_embeddings=32768, rms_norm_eps=1e-6),
    # the same layout at a size that runs in seconds (the vocabulary stays the tokenizer's)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                 max_position_embeddings=4096, rms_norm_eps=1e-6),
}
# the layers the family run selected on the default model (24 layers), kept by relative depth at other shapes
DEFAULT_MODEL_SELECTION = (12, 13, 14, 15, 16, 17, 22, 23)
DEFAULT_MODEL_LAYERS = 24
TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


class Memory:
    """Peak memory of one stage: CUDA's allocator peak on a GPU, else the process RSS sampled by a thread."""

    def __init__(self, device):
        self.device, self.peak_mb = device, 0.0

    def __enter__(self) -> "Memory":
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._stop = threading.Event()
            self.peak_mb = _rss_mb()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_mb = max(self.peak_mb, _rss_mb())

    def __exit__(self, *exc) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / MB
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, _rss_mb())


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def build_model(shape: str, device, dtype):
    """A random-initialised Qwen2 causal LM of `shape`, created directly on `device` in `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**SHAPES[shape], hidden_act="silu", use_sliding_window=False)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 7B model never passes through CPU memory
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def tokenizer_files(folder: str):
    """The tokenizer in `folder` (tokenizer.json and its config, no weights), set up as `load_tokenizer` sets one."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def random_adapter(model, rank: int = 8):
    """Random rank-`rank` factors on every target module of every layer, scaled like a small fine-tuning delta."""
    import torch

    from safegene.adapter import SafetyAdapter

    g = torch.Generator().manual_seed(1)
    mods = dict(model.named_modules())
    factors = {}
    for l in range(model.config.num_hidden_layers):
        for t in TARGETS:
            w = mods[f"model.layers.{l}.{t}"].weight
            out_f, in_f = w.shape
            factors[f"model.layers.{l}.{t}"] = (torch.randn(rank, in_f, generator=g) * in_f**-0.5 * 0.1,
                                                torch.randn(out_f, rank, generator=g) * rank**-0.5 * 0.1)
    return SafetyAdapter(factors=factors, card={"name": "random"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="default: qwen2.5-7b on CUDA, qwen2.5-0.5b on CPU")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ap.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16")
    ap.add_argument("--select-prompts", type=int, default=8, help="harmful and as many benign prompts for selection")
    ap.add_argument("--recal-steps", type=int, default=5, help="extra optimiser steps timed for seconds per step")
    ap.add_argument("--recal-shots", type=int, default=16, help="harmful and as many task shots")
    ap.add_argument("--gen-prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--realign-steps", type=int, default=24, help="re-align's LoRA steps (the bench's default); 0: skip")
    ap.add_argument("--repeat", type=int, default=1, help="run selection, both line searches and re-align this many "
                    "times in turn (the first pays the device's warm-up); `repeats` records each")
    ap.add_argument("--tokenizer", default=None, help="a folder with the tokenizer's files (default: the embedded "
                    "default model's, built from its package on first use), e.g. where the package cannot be installed")
    ap.add_argument("--output", default=None, help="default: bench/results/scale_<device>.json")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error(f"--repeat must be >= 1, got {args.repeat}")

    import torch

    from safegene.generation import GenerationConfig, generate_detailed
    from safegene.io import write_json
    from safegene.models import DEFAULT_MODEL, load_tokenizer, prepare_model
    from safegene.models.placement import resolve_device, resolve_dtype
    from safegene.recalibration import RecalibrateConfig, recalibrate, refusal_shots, task_shots
    from safegene.data import harmful_prompt_texts
    from safegene.runcard import library_versions
    from safegene.selection import SelectConfig, select_layers
    from safegene.training import LoraTrainConfig, train_lora

    device = resolve_device(args.device)
    shape = args.shape or ("qwen2.5-7b" if device.type == "cuda" else "qwen2.5-0.5b")
    dtype = resolve_dtype(args.dtype, device)
    tok = tokenizer_files(args.tokenizer) if args.tokenizer else load_tokenizer(prepare_model(DEFAULT_MODEL))
    result: dict = {"shape": shape, "config": SHAPES[shape], "device": str(device),
                    "dtype": str(dtype).removeprefix("torch."), "torch_threads": torch.get_num_threads(),
                    "cpu_count": os.cpu_count(), "versions": library_versions(), "args": vars(args)}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)

    out_path = Path(args.output or f"bench/results/scale_{device.type}.json")
    result["memory_measure"] = ("torch.cuda.max_memory_allocated per stage" if device.type == "cuda"
                                else "peak RSS of the process, sampled every 5 ms during the stage")

    t = time.perf_counter()
    with Memory(device) as mem:
        model = build_model(shape, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    result["build"] = {"seconds": round(time.perf_counter() - t, 1), "peak_mb": round(mem.peak_mb),
                       "params_millions": round(n_params / 1e6, 1)}
    print(f"built {shape} ({n_params / 1e9:.2f} B params, {result['dtype']}) on {device} in "
          f"{result['build']['seconds']} s")
    adapter = random_adapter(model)
    n = args.recal_shots
    n_layers = model.config.num_hidden_layers
    base = RecalibrateConfig(n_harmful=n, n_task=n)
    spread = sorted({round(i * (n_layers - 1) / 7) for i in range(8)}) if n_layers > 8 else list(range(n_layers))
    upper = sorted({min(n_layers - 1, round(l * n_layers / DEFAULT_MODEL_LAYERS)) for l in DEFAULT_MODEL_SELECTION})
    result["recalibration"] = {"shots": 2 * n, "layers": spread}

    def selection() -> None:
        k = args.select_prompts
        scfg = SelectConfig(n_harmful=k, n_benign=k, batch_size=k, top_k=min(8, n_layers))
        t = time.perf_counter()
        with Memory(device) as mem:
            selected = select_layers(adapter, scfg, model, tok, progress=False)
        result["selection"] = {"seconds": round(time.perf_counter() - t, 2), "peak_mb": round(mem.peak_mb),
                               "prompts": 2 * k, "method": scfg.method, "layers_scored": len(adapter.all_layers),
                               "selected": selected.layers}
        print(f"selection: {result['selection']['seconds']} s on {2 * k} prompts, peak {result['selection']['peak_mb']} MB")

    def line_search(key: str, layers: list[int]) -> None:
        t = time.perf_counter()
        with Memory(device) as mem:
            fitted = recalibrate(adapter.select(layers), base, model, tok, progress=False)
        rc = fitted.card["recalibration"]
        result["recalibration"][key] = {"seconds": round(time.perf_counter() - t, 2), "phases": rc["phases"],
                                        "points": len(rc["history"]) - 1, "peak_mb": round(mem.peak_mb),
                                        "layers": layers}
        print(f"recalibration, line search on layers {layers}: {result['recalibration'][key]['seconds']} s "
              f"({rc['phases']}), peak {round(mem.peak_mb)} MB")

    def adam() -> None:
        """Adam's seconds per step, from two runs of different step counts (the one-off capture cancels)."""
        timings, peak = {}, 0.0
        for steps in (1, 1 + args.recal_steps):
            rcfg = dataclasses.replace(base, optimizer="adam", steps=steps, batch_size=8)
            t = time.perf_counter()
            with Memory(device) as mem:
                recalibrate(adapter.select(spread), rcfg, model, tok, progress=False)
            timings[steps] = time.perf_counter() - t
            peak = max(peak, mem.peak_mb)
        per_step = (timings[1 + args.recal_steps] - timings[1]) / args.recal_steps
        result["recalibration"]["adam"] = {"seconds_per_step": round(per_step, 3),
                                           "fixed_seconds": round(timings[1] - per_step, 2), "batch_size": 8,
                                           "peak_mb": round(peak)}
        print(f"recalibration, adam: {per_step:.3f} s/step (+{timings[1] - per_step:.1f} s once), peak {round(peak)} MB")

    def generation() -> None:
        prompts = harmful_prompt_texts("harmful-pairs", args.gen_prompts, 3)
        generate_detailed(model, tok, prompts[:2], GenerationConfig(max_new_tokens=2, batch_size=2), progress=False)
        gen = {}
        for label, batch in (("one_at_a_time", 1), ("batched", len(prompts))):
            cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=batch)
            t = time.perf_counter()
            with Memory(device) as mem:
                out = generate_detailed(model, tok, prompts, cfg, progress=False)
            s = time.perf_counter() - t
            tokens = sum(g.tokens for g in out)
            gen[label] = {"batch_size": batch, "seconds": round(s, 2), "tokens": tokens, "tok_s": round(tokens / s, 1),
                          "peak_mb": round(mem.peak_mb)}
            print(f"generation, {label}: {tokens / s:.1f} tok/s ({tokens} tokens in {s:.1f} s), "
                  f"peak {round(mem.peak_mb)} MB")
        gen["speedup"] = round(gen["one_at_a_time"]["seconds"] / gen["batched"]["seconds"], 2)
        gen.update(prompts=len(prompts), max_new_tokens=args.max_new_tokens)
        result["generation"] = gen

    def realign() -> None:
        """The re-align baseline's training on the same shots and loaded model (train_lora adds LoRA layers to it in
        place; they are taken out again after)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        pairs = refusal_shots(base) + task_shots(base)
        tok.padding_side = "right"  # as realign loads it for training
        t = time.perf_counter()
        try:
            with Memory(device) as mem:
                peft_model, stats = train_lora(model, tok, pairs, LoraTrainConfig(max_steps=args.realign_steps),
                                               progress=False)
        finally:
            # T again for the next repeat's stages, whether training ended or failed: every LoRA layer out, nothing
            # merged (train_lora injects them into `model` itself)
            tok.padding_side = "left"
            for name, module in list(model.named_modules()):
                if isinstance(module, BaseTunerLayer):
                    parent, _, leaf = name.rpartition(".")
                    setattr(model.get_submodule(parent), leaf, module.get_base_layer())
            if hasattr(model, "peft_config"):  # as peft's own unload() leaves it
                del model.peft_config
        rs = {"steps": stats.steps, "shots": len(pairs), "seconds": round(time.perf_counter() - t, 2),
              "train_seconds": round(stats.seconds, 2), "seconds_per_step": round(stats.seconds_per_step, 3),
              "peak_mb": round(mem.peak_mb)}
        # against re-align's training loop alone (its model is loaded already, as recalibration's is): the stricter
        rs["recalibrate_vs_realign"] = {k: round(v["seconds"] / stats.seconds, 3)
                                        for k, v in result["recalibration"].items()
                                        if k.startswith("line_search") and "seconds" in v}
        result["realign"] = rs
        print(f"re-align: {stats.steps} LoRA steps in {rs['train_seconds']} s ({rs['seconds_per_step']} s/step), "
              f"peak {rs['peak_mb']} MB; recalibration / re-align: {rs['recalibrate_vs_realign']}")

    # selection, both line searches and re-align run `--repeat` times in turn (the first pays the device's warm-up:
    # kernel selection, allocator growth); Adam and generation once
    stages = [("selection", selection), ("line_search", lambda: line_search("line_search", spread)),
              ("adam", adam), ("line_search_upper", lambda: line_search("line_search_upper", upper)),
              ("generation", generation)]
    if args.realign_steps:
        stages.append(("realign", realign))
    repeated = {"selection", "line_search", "line_search_upper", "realign"}
    for rep in range(args.repeat):
        # a stage that fails in this repeat must not leave the last repeat's figures in its place
        result.pop("selection", None), result.pop("realign", None)
        for key in ("line_search", "line_search_upper"):
            result["recalibration"].pop(key, None)
        for name, stage in stages:
            if rep and name not in repeated:
                continue
            try:
                stage()
            except Exception as exc:  # noqa: BLE001 - a stage that fails on this device is a finding: record it, go on
                traceback.print_exc()
                result.setdefault("errors", {})[f"{name}#{rep + 1}"] = f"{type(exc).__name__}: {exc}"
                print(f"{name} FAILED: {exc}")
            write_json(out_path, result)  # after every stage: a run cut short still leaves what it measured
        if args.repeat > 1:
            result.setdefault("repeats", []).append(
                {"selection_s": result.get("selection", {}).get("seconds"),
                 **{f"{k}_s": v.get("seconds") for k, v in result["recalibration"].items() if k.startswith("line_search")},
                 "realign_train_s": result.get("realign", {}).get("train_seconds"),
                 "recalibrate_vs_realign": result.get("realign", {}).get("recalibrate_vs_realign")})
            write_json(out_path, result)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
