"""Serving costs and the adaptive gate, measured in one run on a bench output (task model + calibrated adapter).

    python bench/serve_bench.py --run runs/demo --task sst2 [--requests 12] [--clients 8] [--skip-eval]

1. Overhead (in-process engine, one request at a time, greedy, 32 new tokens): tokens/s and time to first token for
   T alone, T with the adapter merged into its weights, attached as hooks, and attached with the gate.
2. Load test: `safegene serve` in a second process; N concurrent clients on loopback, each sending requests back
   to back (half with the adapter); errors, latency percentiles, throughput, largest batch the engine formed.
3. The gate's safety/utility next to always-on: harmful rate (both judges), over-refusal and task accuracy through
   the same harness as the benchmark.
Prints tables and a JSON line; writes nothing except the gated adapter under RUN/methods/TASK/safegene-gated.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path


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


def load_test(task_ref: str, adapter_dir: Path, prompts: list[str], clients: int, per_client: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "safegene.cli", "serve", "--model", task_ref, "--name", "T",
                             "--adapter", f"safety={adapter_dir}", "--port", str(port), "--max-batch", "8"],
                            env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("server did not start") from None
                time.sleep(0.5)
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()

        def client(c: int) -> None:
            for i in range(per_client):
                body = {"model": "T+safety" if (c + i) % 2 else "T", "max_tokens": 24,
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
        wall = time.perf_counter() - t0
        return {"clients": clients, "requests": clients * per_client, "errors": len(errors), "error_samples": errors[:3],
                "p50_s": _percentile(latencies, 0.5), "p90_s": _percentile(latencies, 0.9),
                "p99_s": _percentile(latencies, 0.99), "throughput_req_s": len(latencies) / wall, "wall_s": wall,
                "health_ms_max": max(health_ms) if health_ms else None, "max_batch_seen": stats["max_batch_seen"]}
    finally:
        proc.terminate()
        proc.wait(timeout=20)


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
    ap.add_argument("--rounds", type=int, default=2, help="overhead rounds (interleaved; the best of each is kept)")
    args = ap.parse_args()

    from safegene.adapter import SafetyAdapter
    from safegene.adapter.runtime import AttachedAdapter, merge_into_model
    from safegene.config import GateConfig, GenerationConfig
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
