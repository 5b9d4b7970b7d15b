"""Extraction benchmark: peak memory and throughput of `safegene extract`, measured in one run.

    python bench/extract_bench.py [--synthetic-gb 2.2] [--workdir /tmp/safegene-bench] [--real-degraded runs/demo/degraded]

Prints, for a synthetic Qwen2-shaped checkpoint pair of at least 2 GB each and (if given) the real default model:
  * peak RSS of extraction (a fresh process) vs the bound 4 x largest tensor + 1 GiB,
  * peak RSS of loading both checkpoints whole (what a naive implementation needs),
  * extraction throughput as a ratio of the raw read speed of the same files.
Each measurement runs in its own subprocess so peak RSS is that step's alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

MB = 2**20


def _child(code: str) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON line. Adds the child's peak RSS."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return out


PEAK = "import resource,json; peak=lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024\n"


def make_synthetic(folder: Path, layers: int, hidden: int, inter: int, vocab: int, seed: int, base: Path | None = None):
    """Write a Qwen2-shaped checkpoint tensor by tensor into ~512 MB shards (D = A + low-rank + small noise)."""
    code = PEAK + f"""
import torch, json
from safegene.apply import ShardWriter
from safegene.adapter.checkpoint import LazyCheckpoint
folder = Path({str(folder)!r}); folder.mkdir(parents=True, exist_ok=True)
H, I, V, L = {hidden}, {inter}, {vocab}, {layers}
g = torch.Generator().manual_seed({seed})
shapes = {{"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}}
for l in range(L):
    p = f"model.layers.{{l}}."
    shapes.update({{p+"self_attn.q_proj.weight": (H, H), p+"self_attn.k_proj.weight": (H // 4, H),
                   p+"self_attn.v_proj.weight": (H // 4, H), p+"self_attn.o_proj.weight": (H, H),
                   p+"mlp.gate_proj.weight": (I, H), p+"mlp.up_proj.weight": (I, H), p+"mlp.down_proj.weight": (H, I),
                   p+"input_layernorm.weight": (H,), p+"post_attention_layernorm.weight": (H,)}})
base = {str(base) if base else None!r}
w = ShardWriter(folder, 512 * 2**20)
src = LazyCheckpoint(base) if base else None
for name, shape in shapes.items():
    if src is None:
        t = torch.randn(*shape, generator=g) * 0.02 if len(shape) == 2 else torch.ones(shape)
    else:
        t = src.get(name).clone()
        if "layers." in name and len(shape) == 2:
            t -= (torch.randn(shape[0], 8, generator=g) @ torch.randn(8, shape[1], generator=g)) * 1e-3
    w.add(name, t)
w.close()
cfg = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", num_hidden_layers=L, hidden_size=H,
           intermediate_size=I, vocab_size=V, num_attention_heads=16, num_key_value_heads=4)
(folder / "config.json").write_text(json.dumps(cfg))
print(json.dumps({{"peak_mb": peak()}}))
"""
    return _child(code)


def measure(a: Path, d: Path, label: str) -> dict:
    files = sorted(a.glob("*.safetensors")) + sorted(d.glob("*.safetensors"))
    size_mb = sum(f.stat().st_size for f in files) / MB
    read_code = PEAK + f"""
import time
t = time.perf_counter(); n = 0
for folder in ({str(a)!r}, {str(d)!r}):
    with LazyCheckpoint(folder) as ck:
        for k in ck.keys():
            n += ck.get(k).numel()
print(json.dumps({{"seconds": time.perf_counter() - t, "peak_mb": peak()}}))
"""
    _child(read_code)  # warm the page cache, so raw read and extraction both read from memory
    read = _child(read_code)
    whole = _child(PEAK + f"""
from safetensors.torch import load_file
# clone: load_file returns memory-mapped tensors; a model load materialises them, which is what is measured
sds = [{{k: v.clone() for f in sorted(Path(p).glob('*.safetensors')) for k, v in load_file(str(f)).items()}}
       for p in ({str(a)!r}, {str(d)!r})]
print(json.dumps({{"peak_mb": peak()}}))
""")
    ext = _child(PEAK + f"""
import time
from safegene.adapter import extract_adapter
from safegene.adapter.extract import ExtractConfig
t = time.perf_counter()
ad = extract_adapter(ExtractConfig(aligned={str(a)!r}, degraded={str(d)!r}, output="unused", hash_inputs=False),
                     progress=False, save=False)
print(json.dumps({{"seconds": time.perf_counter() - t, "peak_mb": peak(), "largest_mb": ad.card["largest_tensor_mb"],
                  "read_s": ad.card["timings"]["read_s"], "svd_s": ad.card["timings"]["svd_s"], "modules": len(ad.factors)}}))
""")
    bound = 4 * ext["largest_mb"] + 1024
    row = {
        "checkpoint": label, "files_mb": round(size_mb), "largest_tensor_mb": ext["largest_mb"],
        "extract_peak_rss_mb": round(ext["peak_mb"]), "bound_mb": round(bound),
        "within_bound": ext["peak_mb"] <= bound, "load_both_whole_peak_rss_mb": round(whole["peak_mb"]),
        "extract_s": round(ext["seconds"], 1), "raw_read_s": round(read["seconds"], 1),
        "read_MBps": round(size_mb / read["seconds"]), "extract_MBps": round(size_mb / ext["seconds"]),
        "throughput_ratio": round(read["seconds"] / ext["seconds"], 3), "svd_s": round(ext["svd_s"], 1),
        "modules": ext["modules"],
    }
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/safegene-bench")
    ap.add_argument("--synthetic-layers", type=int, default=8, help="8 layers of hidden 2048 = about 2.7 GB a checkpoint")
    ap.add_argument("--real-aligned", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--real-degraded", default=None, help="degraded model folder of the default model (optional)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    args = ap.parse_args()
    work = Path(args.workdir)
    rows = []
    if args.real_degraded:
        from safegene.models import resolve_model_path

        rows.append(measure(Path(resolve_model_path(args.real_aligned)), Path(args.real_degraded), args.real_aligned))
    a, d = work / "synthetic_A", work / "synthetic_D"
    if not (a / "config.json").exists():
        shutil.rmtree(work, ignore_errors=True)
        t = time.perf_counter()
        make_synthetic(a, args.synthetic_layers, 2048, 8192, 32000, 0)
        make_synthetic(d, args.synthetic_layers, 2048, 8192, 32000, 1, base=a)
        print(f"wrote synthetic checkpoints in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    rows.append(measure(a, d, f"synthetic qwen2-shaped, {args.synthetic_layers} layers x hidden 2048"))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    cols = ["checkpoint", "files_mb", "largest_tensor_mb", "extract_peak_rss_mb", "bound_mb", "within_bound",
            "load_both_whole_peak_rss_mb", "extract_s", "raw_read_s", "read_MBps", "extract_MBps", "throughput_ratio", "svd_s"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
