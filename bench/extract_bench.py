"""Extraction benchmark: peak memory and throughput of `safegene extract` on a real-shaped checkpoint pair.

    python bench/extract_bench.py --shape qwen2.5-7b            # 2 x 15 GB bf16 (needs ~31 GB of disk), 4.5 GB shards
    python bench/extract_bench.py --shape small --output /tmp/extract_small.json   # ~180 MB, a minute: a smoke test

A synthetic pair is written first (random bf16 weights with the real tensor names and shapes of the model, sharded
with a `model.safetensors.index.json`; D = A - a rank-8 update on every target module, so extraction has something
real to find): numpy, in row chunks, streamed into hand-written safetensors files, so a 7B checkpoint takes about as
long as the disk needs to write it and never more than a chunk of memory. Then, each in a fresh subprocess so peak
RSS is that step's alone:
  * raw read: plain sequential reads of every file of A and D (the disk / page-cache speed of this machine),
  * lazy read: every tensor of A and D through `LazyCheckpoint`,
  * extraction (`extract_adapter`, rank 8, randomized SVD, drift check of the other tensors): seconds, peak RSS vs the
    bound 4 x largest tensor + 1 GiB, MB/s vs the raw read speed, and how much of the planted update it recovered,
  * loading both checkpoints whole (what a naive implementation needs) when that fits in memory.
When the pair is larger than memory the page cache cannot hold it, so every pass reads from disk ("page_cache":
"cold"); otherwise a first raw pass warms it and every pass reads from memory ("warm").
Writes the rows as JSON (default bench/results/extract_7b.json for qwen2.5-7b, else extract_<shape>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

MB = 2**20
RANK = 8  # rank of the planted update A - D, and of the extraction

SHAPES = {
    # Qwen2.5-7B(-Instruct) config.json: biases on q/k/v, untied lm_head
    "qwen2.5-7b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", num_hidden_layers=28, hidden_size=3584,
                       intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4, head_dim=128,
                       vocab_size=152064, qkv_bias=True, shard_mb=4500),
    # Meta-Llama-3-8B(-Instruct) config.json: no biases, untied lm_head
    "llama-3-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", num_hidden_layers=32, hidden_size=4096,
                       intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       vocab_size=128256, qkv_bias=False, shard_mb=4500),
    # the Qwen2 layout at a size that writes in seconds, with small shards so the index is exercised
    "small": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", num_hidden_layers=4, hidden_size=512,
                  intermediate_size=1408, num_attention_heads=8, num_key_value_heads=2, head_dim=64, vocab_size=32000,
                  qkv_bias=True, shard_mb=40),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tensor_specs(s: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the model, in the order transformers saves them."""
    h, i, v, hd = s["hidden_size"], s["intermediate_size"], s["vocab_size"], s["head_dim"]
    q, kv = s["num_attention_heads"] * hd, s["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (v, h))]
    for l in range(s["num_hidden_layers"]):
        p = f"model.layers.{l}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
        if s["qkv_bias"]:
            out += [(p + "self_attn.q_proj.bias", (q,)), (p + "self_attn.k_proj.bias", (kv,)),
                    (p + "self_attn.v_proj.bias", (kv,))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def _bf16_bits(rng, n: int):
    """n random bfloat16 bit patterns of magnitude in [2^-7, 2^-5) and random sign: weight-like values with no
    float maths (bits 15 = sign and 7 = low exponent bit random, exponent otherwise 120, mantissa random)."""
    import numpy as np

    bits = rng.integers(0, 65536, n, dtype=np.uint16)
    bits &= np.uint16(0x80FF)  # in place: a 7B checkpoint is 7.6e9 of these
    bits |= np.uint16(0x3C00)
    return bits


def _chunks(spec_index: int, name: str, shape: tuple[int, ...], seed: int, degraded: bool, chunk_bytes: int):
    """The tensor's bf16 bits, row chunk by row chunk. A's bits depend only on (seed, tensor index), so D can
    regenerate them instead of reading A back; D's targets are A - U V (rank 8, about 5 % of a weight's size),
    computed in float32 and rounded to bfloat16 by torch (random numbers from numpy: torch's CPU generator is
    several times slower at 7B scale)."""
    import numpy as np
    import torch

    if len(shape) == 1 and "norm" in name:
        yield np.full(shape, 0x3F80, dtype=np.uint16)  # RMSNorm weights are ones
        return
    rng = np.random.default_rng([seed, spec_index])
    rows, cols = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])
    planted = degraded and len(shape) == 2 and any(f".{t}." in name for t in TARGETS)
    if planted:
        g = np.random.default_rng([seed, spec_index, 1])
        u = torch.from_numpy(g.standard_normal((rows, RANK), dtype=np.float32) * np.float32(4e-4))
        v = torch.from_numpy(g.standard_normal((RANK, cols), dtype=np.float32))
    step = max(1, chunk_bytes // (2 * cols))
    for a in range(0, rows, step):
        b = min(a + step, rows)
        bits = _bf16_bits(rng, (b - a) * cols).reshape(b - a, cols)
        if planted:
            w = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float()
            w.addmm_(u[a:b], v, alpha=-1)  # w -= U V, in place
            bits = w.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        yield bits.reshape(-1) if len(shape) == 1 else bits


def write_checkpoint(folder: Path, shape_name: str, shard_mb: int, seed: int, degraded: bool,
                     chunk_bytes: int = 64 * MB) -> dict:
    """Write one checkpoint (A, or D with `degraded`) as bf16 safetensors shards of about `shard_mb` + an index."""
    s = SHAPES[shape_name]
    specs = tensor_specs(s)
    shards: list[list[int]] = [[]]
    size = 0
    for k, (_, shape) in enumerate(specs):
        n = 2 * _prod(shape)
        if shards[-1] and size + n > shard_mb * MB:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for j, members in enumerate(shards):
        fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        off = 0
        for k in members:
            name, shape = specs[k]
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + 2 * _prod(shape)]}
            off += 2 * _prod(shape)
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
        with open(folder / (fname + ".part"), "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for k in members:
                name, shape = specs[k]
                for bits in _chunks(k, name, shape, seed, degraded, chunk_bytes):
                    f.write(bits.tobytes())
        os.replace(folder / (fname + ".part"), folder / fname)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(2 * _prod(sh) for _, sh in specs)}, "weight_map": weight_map}, indent=1))
    config = {k: v for k, v in s.items() if k not in ("qkv_bias", "shard_mb")}
    config.update(torch_dtype="bfloat16", tie_word_embeddings=False, rms_norm_eps=1e-6, max_position_embeddings=32768,
                  hidden_act="silu")
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return {"shards": len(shards), "tensors": len(specs)}


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _child(code: str) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON line last."""
    r = subprocess.run([sys.executable, "-c", PEAK + code], capture_output=True, text=True,
                       env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


PEAK = ("import resource, json, time\nfrom pathlib import Path\n"
        "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n")


def _mem_available_mb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


def measure(a: Path, d: Path, label: str) -> dict:
    files = [str(f) for f in sorted(a.glob("*.safetensors")) + sorted(d.glob("*.safetensors"))]
    size_mb = sum(os.path.getsize(f) for f in files) / MB
    warm = size_mb < 0.5 * _mem_available_mb()
    raw_code = f"""
t = time.perf_counter(); buf = bytearray(64 * 2**20); n = 0
for f in {files!r}:
    with open(f, "rb", buffering=0) as fh:
        while (k := fh.readinto(buf)):
            n += k
print(json.dumps({{"seconds": time.perf_counter() - t, "bytes": n, "peak_mb": peak()}}))
"""
    if warm:
        _child(raw_code)  # fill the page cache: then every pass below reads from memory
    raw = _child(raw_code)
    lazy = _child(f"""
import torch  # imported before the clock starts, as in a real run
from safegene.adapter.checkpoint import LazyCheckpoint
t = time.perf_counter()
for folder in ({str(a)!r}, {str(d)!r}):
    with LazyCheckpoint(folder) as ck:
        for k in ck.keys():
            ck.get(k)
print(json.dumps({{"seconds": time.perf_counter() - t, "peak_mb": peak()}}))
""")
    ext = _child(f"""
import torch, transformers  # what extraction imports anyway: in the baseline, not in the time
from safegene.adapter import extract_adapter
from safegene.adapter.extract import ExtractConfig
base = peak()
t = time.perf_counter()
ad = extract_adapter(ExtractConfig(aligned={str(a)!r}, degraded={str(d)!r}, output="unused", rank={RANK},
                                   hash_inputs=False), progress=False, save=False)
kept = [m["energy_kept"] for m in ad.card["modules"].values()]
print(json.dumps({{"seconds": time.perf_counter() - t, "peak_mb": peak(), "baseline_mb": base,
                  "largest_mb": ad.card["largest_tensor_mb"], "read_s": ad.card["timings"]["read_s"],
                  "svd_s": ad.card["timings"]["svd_s"], "modules": len(ad.factors), "min_energy_kept": min(kept),
                  "untracked_drift": len(ad.card["untracked_drift"]), "threads": torch.get_num_threads()}}))
""")
    whole = None
    if 1.3 * size_mb < _mem_available_mb():
        whole = _child(f"""
from safetensors.torch import load_file
# clone: load_file returns memory-mapped tensors; a model load materialises them, which is what is measured
sds = [{{k: v.clone() for f in sorted(Path(p).glob('*.safetensors')) for k, v in load_file(str(f)).items()}}
       for p in ({str(a)!r}, {str(d)!r})]
print(json.dumps({{"peak_mb": peak()}}))
""")
    bound = 4 * ext["largest_mb"] + 1024
    return {
        "checkpoint": label, "files_mb": round(size_mb), "page_cache": "warm" if warm else "cold",
        "largest_tensor_mb": ext["largest_mb"], "extract_peak_rss_mb": round(ext["peak_mb"]),
        "import_baseline_rss_mb": round(ext["baseline_mb"]), "bound_mb": round(bound),
        "within_bound": ext["peak_mb"] <= bound,
        "load_both_whole_peak_rss_mb": round(whole["peak_mb"]) if whole else None,
        "raw_read_s": round(raw["seconds"], 1), "raw_read_MBps": round(size_mb / raw["seconds"]),
        "lazy_read_s": round(lazy["seconds"], 1), "lazy_read_MBps": round(size_mb / lazy["seconds"]),
        "lazy_read_peak_rss_mb": round(lazy["peak_mb"]),
        "extract_s": round(ext["seconds"], 1), "extract_MBps": round(size_mb / ext["seconds"]),
        "extract_vs_raw_read": round(raw["seconds"] / ext["seconds"], 3),
        "extract_read_s": ext["read_s"], "svd_s": ext["svd_s"], "modules": ext["modules"],
        "min_energy_kept": ext["min_energy_kept"], "untracked_tensors_drifted": ext["untracked_drift"],
        "torch_threads": ext["threads"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-7b")
    ap.add_argument("--workdir", default="/tmp/safegene-extract-bench", help="where the synthetic pair is written")
    ap.add_argument("--shard-mb", type=int, default=None, help="shard size (default: 4500 for 7B/8B, 40 for small)")
    ap.add_argument("--output", default=None, help="JSON file (default: bench/results/extract_7b.json for qwen2.5-7b, "
                    "else bench/results/extract_<shape>.json)")
    ap.add_argument("--real-aligned", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--real-degraded", default=None, help="degraded model folder of the default model (optional)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic pair (a re-run with the same settings reuses it)")
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    shard_mb = args.shard_mb or shape["shard_mb"]
    out = Path(args.output or ("bench/results/extract_7b.json" if args.shape == "qwen2.5-7b"
                               else f"bench/results/extract_{args.shape}.json"))
    rows = []
    if args.real_degraded:
        from safegene.models import resolve_model_path

        rows.append(measure(Path(resolve_model_path(args.real_aligned)), Path(args.real_degraded), args.real_aligned))

    work = Path(args.workdir)
    a, d = work / f"{args.shape}_A", work / f"{args.shape}_D"
    stamp = {"shape": args.shape, "shard_mb": shard_mb, "rank": RANK, "format": 1}
    gen = None
    if not all((f / "synthetic.json").is_file() and json.loads((f / "synthetic.json").read_text()) == stamp
               for f in (a, d)):
        need = 2 * 2 * sum(_prod(sh) for _, sh in tensor_specs(shape))
        shutil.rmtree(a, ignore_errors=True)
        shutil.rmtree(d, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(work).free
        if free < 1.02 * need:
            sys.exit(f"{work}: {need / 2**30:.1f} GiB needed for the synthetic pair, {free / 2**30:.1f} GiB free; "
                     "free space or pass --workdir on a larger disk")
        gen = {}
        for folder, degraded in ((a, False), (d, True)):
            t = time.perf_counter()
            info = write_checkpoint(folder, args.shape, shard_mb, seed=0, degraded=degraded)
            gen["D" if degraded else "A"] = {"seconds": round(time.perf_counter() - t, 1), **info}
            (folder / "synthetic.json").write_text(json.dumps(stamp))
            print(f"wrote {folder} ({info['shards']} shards) in {gen['D' if degraded else 'A']['seconds']} s",
                  file=sys.stderr)
    row = measure(a, d, f"synthetic {args.shape} (bf16, {shard_mb} MB shards)")
    row["synthetic_write_s"] = gen
    rows.append(row)
    if not args.keep:
        shutil.rmtree(a, ignore_errors=True)
        shutil.rmtree(d, ignore_errors=True)

    from safegene.io import write_json

    write_json(out, {"shape": args.shape, "config": {k: v for k, v in shape.items() if k != "shard_mb"},
                     "shard_mb": shard_mb, "cpu_count": os.cpu_count(), "rows": rows})
    cols = ["checkpoint", "files_mb", "page_cache", "largest_tensor_mb", "extract_peak_rss_mb", "bound_mb",
            "within_bound", "load_both_whole_peak_rss_mb", "raw_read_MBps", "lazy_read_MBps", "extract_MBps",
            "extract_vs_raw_read", "extract_s", "svd_s", "min_energy_kept"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
