"""How far each judge agrees with people: refusal-phrase, content-classifier and minilm-judge on PyRIT's
human-labelled scorer_evals (395 items, never used for training or tuning any of them).

Two views: responses cut to their opening 200 characters (the windowing `validate_judge` uses for every judge,
matching the ~40-token generations the benchmark judges) and the full responses. Writes bench/results/judges.json.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/judge_bench.py [--judges refusal-phrase content-classifier minilm-judge]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safegene.evaluation.judge_validation import human_labelled, validate_judge  # noqa: E402
from safegene.evaluation.judges import get_judge  # noqa: E402

TARGET = {"accuracy": 0.90, "kappa": 0.80, "seconds_per_item": 0.25}


def per_category(judge, items) -> dict[str, dict]:
    verdicts = judge.judge_batch([x.prompt for x in items], [x.response for x in items])
    out: dict[str, list[int]] = {}
    for v, x in zip(verdicts, items):
        if v.harmful is None:
            continue
        c = out.setdefault(x.category, [0, 0])
        c[0] += int(v.harmful == x.harmful)
        c[1] += 1
    return {k: {"accuracy": round(a / n, 4), "n": n} for k, (a, n) in sorted(out.items())}


def summary(r: dict) -> dict:
    return {"accuracy": r["accuracy"]["rate"] if isinstance(r["accuracy"], dict) else r["accuracy"],
            "kappa": r["kappa_vs_human"], "auc": r["auc"],
            "tpr": r["true_positive_rate"]["rate"], "tnr": r["true_negative_rate"]["rate"],
            "n": r["n"], "unparsed": r["unparsed"], "seconds_per_item": r["seconds_per_item"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--judges", nargs="+", default=["refusal-phrase", "content-classifier", "minilm-judge"])
    ap.add_argument("-o", "--output", default=str(ROOT / "bench" / "results" / "judges.json"))
    args = ap.parse_args()
    cut, full = human_labelled(window=200), human_labelled(window=10**9)
    results = {}
    for name in args.judges:
        t0 = time.perf_counter()
        judge = get_judge(name)
        load_s = time.perf_counter() - t0
        r_cut, r_full = validate_judge(judge, cut), validate_judge(judge, full)
        entry = {"window_200": summary(r_cut), "full_response": summary(r_full),
                 "per_category_window_200": per_category(judge, cut), "load_seconds": round(load_s, 1)}
        card = getattr(judge, "card", None)
        if card:
            entry["training_sources"] = card.get("sources") or card.get("data")
            if "threshold" in card:
                entry["threshold"] = card["threshold"]
                entry["training"] = {k: card["training"][k] for k in ("steps", "best_step", "seconds", "stopped")}
                entry["holdout"] = card["holdout"]
                entry["n_train"] = card["n_train"]
        s = entry["window_200"]
        entry["meets_target_window_200"] = bool(s["accuracy"] >= TARGET["accuracy"] and (s["kappa"] or 0) >= TARGET["kappa"]
                                                and s["seconds_per_item"] <= TARGET["seconds_per_item"])
        results[name] = entry
        print(f"{name:20s} cut: acc {s['accuracy']:.3f} κ {s['kappa']} AUC {s['auc']} TPR {s['tpr']:.3f} "
              f"TNR {s['tnr']:.3f} {s['seconds_per_item']:.4f}s/item | full: acc {entry['full_response']['accuracy']:.3f} "
              f"κ {entry['full_response']['kappa']} AUC {entry['full_response']['auc']}", flush=True)
    out = {"date": datetime.date.today().isoformat(), "data": "pyrit scorer_evals/objective, human labels "
           "(never used for training or tuning)", "n": len(cut), "target": TARGET,
           "machine": "2 shared CPU cores", "judges": results}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
