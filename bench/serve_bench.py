"""Serving costs and the adaptive gate, measured in one run on a bench output (task model + calibrated adapter).

    python bench/serve_bench.py --run runs/demo --task sst2 [--requests 12] [--clients 8] [--skip-eval]
    python bench/serve_bench.py --load-only [--model smollm2-135m-instruct] [--baseline-ref REF] [--rounds 2]

1. Overhead (in-process engine, one request at a time, greedy, 32 new tokens): tokens/s and time to first token for
   T alone, T with the adapter merged into its weights, attached as hooks, and attached with the gate.
2. Load test: `safegene serve` in a second process; N concurrent clients on loopback, each sending requests back
   to back (half with the adapter); errors, latency percentiles, throughput, largest batch the engine formed.
3. The gate's safety/utility next to always-on: harmful rate (both judges), over-refusal and task accuracy through
   the same harness as the benchmark.
Prints tables and a JSON line; writes nothing except the gated adapter under RUN/methods/TASK/safegene-gated.

`--load-only` runs the load test alone, side by side: the server as committed at `--baseline-ref` (the whole
package, from git) and the working tree's, alternating for `--rounds` rounds on the same machine, on a small real
model with a synthetic gated adapter (random low-rank factors, a gate fitted on a few prompts: the same work per
token as a real one). It needs no bench output and writes the figures to bench/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the last commit with the standard-library server (before FastAPI/uvicorn and the shared decode loop)
STDLIB_SERVER_REF = "86870e7f17b4a4b3762701ddea0cd921fa28fb15"


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def overhead(engine, prompts: list[str], adapter: str | None, max_tokens: int) -> dict:
    """Decode speed after the first token (so answers of different lengths, e.g. a short refusal, compare fairly)
    and time to first token (prefill, plus the gate where there is one)."""
    tokens, seconds, ttft = 0, 0.0, []
    for p in prompts:
        t0 = time.perf_counter()
        req = engine.submit([{"role": "user", "content": p}], adapter, max_tokens=max_tokens)
        first = None
        for _ in engine.stream(req):
            if first is None:
                first = time.perf_counter() - t0
        total = time.perf_counter() - t0
        ttft.append(first or total)
        if req.completion_tokens > 1:
            tokens += req.completion_tokens - 1
            seconds += total - (first or total)
    return {"tok_s": tokens / max(seconds, 1e-9), "ttft_ms_median": 1000 * statistics.median(ttft), "tokens": tokens}


def load_test(task_ref: str, adapter_dir: Path, prompts: list[str], clients: int, per_client: int,
              code: Path = REPO, max_tokens: int = 24) -> dict:
    """`code`: the folder whose `safegene` package serves (the working tree, or an older commit's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "safegene.cli", "serve", "--model", task_ref, "--name", "T",
                             "--adapter", f"safety={adapter_dir}", "--port", str(port), "--max-batch", "8"],
                            env={**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(code)}, cwd=code,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    server_header = r.headers.get("Server")  # which HTTP stack answered
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("server did not start") from None
                time.sleep(0.5)
        latencies: list[float] = []
        errors: list[str] = []
        finished: list[float] = []  # when each client sent its last answer back
        lock = threading.Lock()

        def client(c: int) -> None:
            for i in range(per_client):
                body = {"model": "T+safety" if (c + i) % 2 else "T", "max_tokens": max_tokens,
                        "messages": [{"role": "user", "content": prompts[(c * per_client + i) % len(prompts)]}]}
                req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
                t0 = time.perf_counter()
                try:
                    with urllib.request.urlopen(req, timeout=600) as r:
                        json.loads(r.read())
                    with lock:
                        latencies.append(time.perf_counter() - t0)
                except Exception as e:  # noqa: BLE001 - counted, reported
                    with lock:
                        errors.append(repr(e))
            with lock:
                finished.append(time.perf_counter())

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        # the server must stay responsive to health checks under the burst
        health_ms = []
        while any(t.is_alive() for t in threads):
            h0 = time.perf_counter()
            stats = json.loads(urllib.request.urlopen(base + "/health", timeout=30).read())["stats"]
            health_ms.append(1000 * (time.perf_counter() - h0))
            time.sleep(1.0)
        for t in threads:
            t.join()
        wall = max(finished) - t0  # not when the once-a-second health loop noticed
        return {"server": server_header, "clients": clients, "requests": clients * per_client, "errors": len(errors),
                "error_samples": errors[:3],
                "p50_s": _percentile(latencies, 0.5), "p90_s": _percentile(latencies, 0.9),
                "p99_s": _percentile(latencies, 0.99), "throughput_req_s": len(latencies) / wall, "wall_s": wall,
                "health_ms_max": max(health_ms) if health_ms else None, "max_batch_seen": stats["max_batch_seen"]}
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def synthetic_gated_adapter(model, tok, harmful: list[str], benign: list[str], layers: range, rank: int = 8):
    """Random low-rank factors on every projection of `layers`, small enough to leave the answers sensible, with
    a gate fitted on the prompts: the per-token work of a real gated adapter, without a bench run to make one."""
    import torch

    from safegene.adapter import SafetyAdapter
    from safegene.serve.gate import fit_gate

    g = torch.Generator().manual_seed(0)
    params = dict(model.named_parameters())
    factors = {}
    for l in layers:
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                  "mlp.up_proj", "mlp.down_proj"):
            name = f"model.layers.{l}.{m}"
            out_dim, in_dim = params[f"{name}.weight"].shape
            factors[name] = (torch.randn(rank, in_dim, generator=g) / in_dim ** 0.5,
                             torch.randn(out_dim, rank, generator=g) * 0.01)
    adapter = SafetyAdapter(factors=factors, card={"note": "synthetic, for the serving load test"})
    gate = fit_gate(model, tok, harmful, benign, layer=min(layers))
    return adapter._replace(card={**adapter.card, "gate": gate.to_dict()})


def materialise(ref: str, into: Path) -> Path:
    """The `safegene` package as committed at `ref`, unpacked under `into`."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "safegene"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def load_side_by_side(args: argparse.Namespace) -> dict:
    """The load test on the baseline commit's server and on the working tree's, alternating; figures per server
    are the medians over rounds."""
    from safegene.data import get_task, harmful_prompts
    from safegene.models import load_model, load_tokenizer

    harm = [p.prompt for p in harmful_prompts("advbench", n=args.requests // 2, seed=7)]
    task = [e.prompt for e in get_task("arithmetic").load("test", n=args.requests - len(harm), seed=7)]
    prompts = [p for pair in zip(harm, task) for p in pair]
    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    model, tok = load_model(args.model), load_tokenizer(args.model)
    n_layers = model.config.num_hidden_layers
    adapter = synthetic_gated_adapter(model, tok, harm, task, range(n_layers // 3, n_layers // 3 + 8))
    adapter.save(tmp / "adapter")
    del model
    baseline = materialise(args.baseline_ref, tmp / "baseline")
    rounds: dict[str, list[dict]] = {"baseline": [], "current": []}
    for r in range(args.rounds):
        for label, code in (("baseline", baseline), ("current", REPO)):
            lt = load_test(args.model, tmp / "adapter", prompts, args.clients, args.per_client, code=code,
                           max_tokens=args.max_tokens)
            print(f"round {r + 1} {label} ({lt['server']}): p50 {lt['p50_s']:.2f} s, p90 {lt['p90_s']:.2f} s, "
                  f"{lt['throughput_req_s']:.2f} req/s, {lt['errors']} errors, largest batch {lt['max_batch_seen']}",
                  flush=True)
            rounds[label].append(lt)

    def summary(runs: list[dict]) -> dict:
        return {"server": runs[0]["server"], "p50_s": round(statistics.median(r["p50_s"] for r in runs), 3),
                "p90_s": round(statistics.median(r["p90_s"] for r in runs), 3),
                "req_s": round(statistics.median(r["throughput_req_s"] for r in runs), 3),
                "errors": sum(r["errors"] for r in runs), "n": sum(r["requests"] for r in runs),
                "rounds": [{k: round(r[k], 3) for k in ("p50_s", "p90_s", "throughput_req_s")} | {"errors": r["errors"]}
                           for r in runs]}

    return {"model": args.model, "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), CPU inference",
            "concurrency": args.clients, "requests_per_client": args.per_client, "max_tokens": args.max_tokens,
            "rounds": args.rounds, "baseline_ref": args.baseline_ref,
            "baseline": summary(rounds["baseline"]), "current": summary(rounds["current"])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--per-client", type=int, default=3)
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--skip-load-test", action="store_true")
    ap.add_argument("--rounds", type=int, default=2,
                    help="overhead rounds (interleaved; the best of each is kept); with --load-only, load-test rounds")
    ap.add_argument("--load-only", action="store_true", help="only the load test, baseline and current side by side")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model of --load-only")
    ap.add_argument("--baseline-ref", default=STDLIB_SERVER_REF, help="commit whose server --load-only compares to")
    ap.add_argument("--output", default=str(REPO / "bench" / "results" / "serve_load.json"),
                    help="where --load-only writes its figures")
    args = ap.parse_args()

    if args.load_only:
        res = load_side_by_side(args)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps({k: res[k] for k in ("baseline", "current")}))
        return

    from safegene.adapter import SafetyAdapter
    from safegene.adapter.runtime import AttachedAdapter, merge_into_model
    from safegene.generation import GenerationConfig
    from safegene.serve.gate import GateConfig
    from safegene.data import get_task, harmful_prompts
    from safegene.models import load_model, load_tokenizer
    from safegene.serve import Engine
    from safegene.serve.gate import SafetyGate, gate_adapter, install_gate

    run = Path(args.run)
    t_ref = str(run / f"task-{args.task}")
    adapter = SafetyAdapter.load(run / "methods" / args.task / "safegene")
    model, tok = load_model(t_ref), load_tokenizer(t_ref)
    t = time.perf_counter()
    gated = gate_adapter(adapter, GateConfig(model=t_ref, benign=[args.task, "depresso"]), model=model, tokenizer=tok)
    gate_fit_s = time.perf_counter() - t
    gated_dir = run / "methods" / args.task / "safegene-gated"
    gated.save(gated_dir, overwrite=True)
    print(f"gate: layer {gated.card['gate']['layer']}, fit AUC {gated.card['gate']['fit']['auc']:.3f}, "
          f"{gate_fit_s:.1f} s")

    # prompts: half harmful (held-out AdvBench), half the task's own
    harm = [p.prompt for p in harmful_prompts("advbench", n=args.requests // 2, seed=7)]
    task = [e.prompt for e in get_task(args.task).load("test", n=args.requests - len(harm), seed=7)]
    prompts = [p for pair in zip(harm, task) for p in pair]

    # --- 1. overhead -------------------------------------------------------------------------------------------
    rows = {}
    engine = Engine(model, tok, max_batch=1)
    engine.load_adapter("attached", adapter)
    engine.load_adapter("gated", gated)
    overhead(engine, prompts[:2], None, 4)  # warm-up
    order = [("T alone", None), ("attached", "attached"), ("attached + gate", "gated")]
    for label, name in order * args.rounds:  # rounds, interleaved, keep the better: less noise from the machine
        r = overhead(engine, prompts, name, args.max_tokens)
        if label not in rows or r["tok_s"] > rows[label]["tok_s"]:
            rows[label] = r
    engine.close()
    merged_model = merge_into_model(adapter, load_model(t_ref))
    m_engine = Engine(merged_model, tok, max_batch=1)
    overhead(m_engine, prompts[:2], None, 4)
    rows["merged"] = max((overhead(m_engine, prompts, None, args.max_tokens) for _ in range(args.rounds)),
                         key=lambda r: r["tok_s"])
    m_engine.close()
    del merged_model
    base = rows["T alone"]
    print("\n| mode | decode tokens/s | vs T alone | TTFT median (ms) |")
    print("|---|---|---|---|")
    for label in ("T alone", "merged", "attached", "attached + gate"):
        r = rows[label]
        print(f"| {label} | {r['tok_s']:.1f} | {r['tok_s'] / base['tok_s']:.3f} | {r['ttft_ms_median']:.0f} |")

    # --- 2. load test ------------------------------------------------------------------------------------------
    lt = {} if args.skip_load_test else load_test(t_ref, gated_dir, prompts, args.clients, args.per_client)
    if lt:
        print(f"\nload test: {lt['clients']} clients x {args.per_client} requests, {lt['errors']} errors, "
              f"latency p50 {lt['p50_s']:.1f} s / p90 {lt['p90_s']:.1f} s / p99 {lt['p99_s']:.1f} s, "
              f"{lt['throughput_req_s']:.2f} req/s, largest batch {lt['max_batch_seen']}, "
              f"slowest /health {lt['health_ms_max']:.0f} ms")

    # --- 3. gate vs always-on ----------------------------------------------------------------------------------
    evals = {}
    if not args.skip_eval:
        from safegene.evaluation.harness import EvalSets, evaluate_model, over_refusal_prompts
        from safegene.evaluation.judges import get_judge

        over, src = over_refusal_prompts("auto", 32, 0)
        sets = EvalSets(harmful=harmful_prompts("advbench", n=64, seed=0), over_refusal=over, over_refusal_source=src,
                        n_task=64)
        judges = [get_judge("refusal-phrase"), get_judge("content-classifier")]
        gen = GenerationConfig(max_new_tokens=32, batch_size=32)
        out = run / "responses-serve-bench"
        with adapter.attach(model, check=False):
            evals["always-on"] = evaluate_model("always-on", model, tok, sets, judges, gen, out, tasks=[args.task])
        handle = AttachedAdapter(model, gated)
        hook = install_gate(SafetyGate.from_dict(gated.card["gate"]), model, handle)
        try:
            evals["gated"] = evaluate_model("gated", model, tok, sets, judges, gen, out, tasks=[args.task])
        finally:
            hook.remove()
            handle.remove()
        evals["T alone"] = evaluate_model("T alone", model, tok, sets, judges, gen, out, tasks=[args.task])
        print("\n| model | harmful (refusal-phrase) | harmful (content-classifier) | over-refusal | accuracy |")
        print("|---|---|---|---|---|")
        for k, r in evals.items():
            print(f"| {k} | {r['harmful']['refusal-phrase']['overall']['rate']:.3f} | "
                  f"{r['harmful']['content-classifier']['overall']['rate']:.3f} | {r['over_refusal']['rate']:.3f} | "
                  f"{r['utility'][args.task]['rate']:.3f} |")
    print(json.dumps({"overhead": rows, "load_test": lt, "gate_fit": gated.card["gate"]["fit"], "gate_fit_s": gate_fit_s,
                      "eval": {k: {"harmful": v["harmful"], "over_refusal": v["over_refusal"], "utility": v["utility"]}
                               for k, v in evals.items()}}, default=str))


if __name__ == "__main__":
    main()
