"""Refusal rate of a model on harmful prompts (the foundation's safety measurement)."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from ..config import opt, to_dict
from ..generation import GenerationConfig, generate, generate_to_jsonl
from ..data import harmful_prompts
from ..models import DEFAULT_MODEL, load_model, load_tokenizer
from ..models.placement import PlacementConfig
from .judges import RefusalPhraseJudge
from .metrics import Rate


@dataclass
class RefusalEvalConfig:
    """Refusal rate of a model on harmful prompts, judged by refusal phrases."""

    model: str = opt(DEFAULT_MODEL, "model to evaluate")
    prompts: str = opt("advbench", "harmful prompts: built-in name or file")
    n_prompts: int = opt(100, "prompts drawn from `prompts`", aliases=("-n",))
    seed: int = opt(0, "sampling seed (same seed, same prompts)")
    output: str | None = opt(None, "optional JSONL of responses + verdicts (a re-run resumes it)",
                             aliases=("--responses",))
    save_json: str | None = opt(None, "write the full result as JSON here")
    generation: GenerationConfig = opt(GenerationConfig(), "decoding settings")
    placement: PlacementConfig = opt(PlacementConfig(), "where the model runs and in what dtype (--device, --dtype, "
                                     "--device-map)", added_later=True)


def refusal_rate(model: Any, tokenizer: Any, prompts, gen_cfg=None, judge=None, progress: bool = True, jsonl: str | None = None) -> dict[str, Any]:
    judge = judge or RefusalPhraseJudge()
    t0 = time.perf_counter()
    if jsonl:
        rows = generate_to_jsonl(model, tokenizer, [{"id": p.id or str(i), "prompt": p.prompt, "category": p.category}
                                                    for i, p in enumerate(prompts)], jsonl, gen_cfg, progress)
        responses = [r["response"] for r in rows]
    else:
        responses = generate(model, tokenizer, [p.prompt for p in prompts], gen_cfg, progress=progress, desc="refusal eval")
    # a judge (judge_batch) or a bare refusal detector (is_refusal); an answer the judge could not read (None)
    # stays out of the rates
    if hasattr(judge, "judge_batch"):
        harmful = [v.harmful for v in judge.judge_batch([p.judged_request for p in prompts], responses)]
    else:
        harmful = [not judge.is_refusal(r) for r in responses]
    refused = [None if h is None else not h for h in harmful]
    by_cat: dict[str, list[bool | None]] = defaultdict(list)
    for p, r in zip(prompts, refused):
        by_cat[p.category].append(r)
    return {
        "judge": judge.name,
        "refusal": Rate.of(refused).to_dict(),
        "harmful": Rate.of(harmful).to_dict(),
        "by_category": {c: Rate.of(v).to_dict() for c, v in sorted(by_cat.items())},
        "seconds": round(time.perf_counter() - t0, 2),
        "samples": [{"prompt": p.prompt, "response": r, "refused": f} for p, r, f in list(zip(prompts, responses, refused))[:5]],
    }


def evaluate_refusal(cfg: RefusalEvalConfig, progress: bool = True) -> dict[str, Any]:
    prompts = harmful_prompts(cfg.prompts, n=cfg.n_prompts, seed=cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, cfg.placement)
    res = refusal_rate(model, tokenizer, prompts, cfg.generation, progress=progress, jsonl=cfg.output)
    res["config"] = to_dict(cfg)
    res["model"] = cfg.model
    return res
