"""Classifier guard (the ShieldLM / Llama Guard pattern): a separate safety classifier around an unchanged model.

Each prompt is screened before generation (a flagged one is refused without generating) and each response after
(a flagged one is replaced by the refusal). The guard is any judge object: `judge_batch(prompts, responses)` for
responses and, for prompts, `screen_prompts(prompts, threshold)` (local LLM and endpoint judges have it). The
benchmark scores with other judges, so the guard cannot grade its own work.

`fit_prompt_threshold` puts the prompt threshold where it best separates harmful from benign calibration prompts
(balanced accuracy), the same way a deployer would tune a guard on their own traffic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

from ..chat import last_user_turn
from ..config import check, opt, to_dict
from ..generation import Generated, GenerationConfig, generate_detailed
from ..errors import ConfigError
from .registry import Defence, Method, MethodContext, register


@dataclass
class ClassifierGuardConfig:
    """Classifier guard (ShieldLM / Llama Guard style): a separate safety classifier screens each prompt before
    generation and each response after; a flagged one is answered with a refusal instead."""

    guard: str = opt("llm:qwen2.5-coder-0.5b-instruct",
                     "the guard classifier, a judge spec (llm:<model>, endpoint:<url>?model=<m>, ...); it must not "
                     "be one of the judges that score the benchmark")
    screen_prompts: bool = opt(True, "screen prompts before generating (needs a guard that can: llm:, endpoint:)")
    screen_responses: bool = opt(True, "screen responses after generating")
    prompt_threshold: float | None = opt(None, "guard score above which a prompt is flagged; None: fitted on "
                                         "calibration prompts (harmful vs the task's and general benign ones)")
    response_threshold: float | None = opt(None, "guard score above which a response is flagged; None: the guard's "
                                           "own threshold")
    refusal_text: str = opt("I'm sorry, but I can't assist with that.", "what a flagged request is answered with")
    n_calibration: int = opt(32, "harmful and benign prompts for fitting prompt_threshold (disjoint from evaluation)")

    def __post_init__(self) -> None:
        check(self.screen_prompts or self.screen_responses, "screen prompts, responses or both")
        check(bool(self.guard), "guard must name a classifier")
        check(self.n_calibration >= 2, "n_calibration must be >= 2")


def best_threshold(harmful_scores: Sequence[float], benign_scores: Sequence[float]) -> tuple[float, float]:
    """(threshold, balanced accuracy): the cut between sorted scores that best separates the two groups."""
    values = sorted(set(harmful_scores) | set(benign_scores))
    cuts = [values[0] - 1.0] + [(a + b) / 2 for a, b in zip(values, values[1:])] + [values[-1] + 1.0]
    def balanced(t: float) -> float:
        tpr = sum(s > t for s in harmful_scores) / len(harmful_scores)
        tnr = sum(s <= t for s in benign_scores) / len(benign_scores)
        return (tpr + tnr) / 2
    best = max(cuts, key=lambda t: (balanced(t), -abs(t)))
    return best, balanced(best)


class ClassifierGuard:
    """A responder (see `safegene.generation.Responder`) that wraps plain generation with a guard classifier."""

    name = "classifier-guard"

    def __init__(self, guard: Any, cfg: ClassifierGuardConfig | None = None, prompt_threshold: float | None = None):
        self.guard = guard
        self.cfg = cfg or ClassifierGuardConfig()
        if self.cfg.screen_prompts and not hasattr(guard, "screen_prompts"):
            raise ConfigError(f"guard '{getattr(guard, 'name', guard)}' cannot screen prompts alone; use an llm: or "
                              "endpoint: guard, or set screen_prompts: false")
        self.prompt_threshold = prompt_threshold if prompt_threshold is not None else self.cfg.prompt_threshold

    def fit_prompt_threshold(self, harmful: Sequence[str], benign: Sequence[str]) -> dict[str, float]:
        h = [v.score for v in self.guard.screen_prompts(list(harmful))]
        b = [v.score for v in self.guard.screen_prompts(list(benign))]
        if any(s is None for s in h + b):
            raise ConfigError(f"guard '{self.guard.name}' gives no graded scores; set prompt_threshold instead")
        self.prompt_threshold, acc = best_threshold(h, b)
        return {"threshold": round(self.prompt_threshold, 4), "balanced_accuracy": round(acc, 4),
                "n_harmful": len(h), "n_benign": len(b)}

    def __call__(self, model: Any, tokenizer: Any, prompts: Sequence[Any], cfg: GenerationConfig | None = None,
                 progress: bool = True, desc: str = "guarded") -> list[Generated]:
        n = len(prompts)
        requests = [last_user_turn(p) for p in prompts]  # a wrapped jailbreak stays wrapped: the guard sees it all
        flags: list[str | None] = [None] * n
        guard_s = [0.0] * n
        if self.cfg.screen_prompts:
            t = time.perf_counter()
            verdicts = self.guard.screen_prompts(requests, threshold=self.prompt_threshold)
            share = (time.perf_counter() - t) / max(n, 1)
            for i, v in enumerate(verdicts):
                guard_s[i] += share
                flags[i] = "prompt" if v.harmful else None
        todo = [i for i in range(n) if flags[i] is None]
        generated: dict[int, Generated] = {}
        if todo:
            for i, g in zip(todo, generate_detailed(model, tokenizer, [prompts[i] for i in todo], cfg, progress, desc)):
                generated[i] = g
            if self.cfg.screen_responses:
                t = time.perf_counter()
                verdicts = self.guard.judge_batch([requests[i] for i in todo], [generated[i].text for i in todo])
                share = (time.perf_counter() - t) / len(todo)
                cut = self.cfg.response_threshold
                for i, v in zip(todo, verdicts):
                    guard_s[i] += share
                    if (v.harmful if cut is None or v.score is None else v.score > cut):
                        flags[i] = "response"
        out = []
        for i in range(n):
            g = generated.get(i)
            text = self.cfg.refusal_text if flags[i] else g.text  # type: ignore[union-attr]
            out.append(Generated(text, g.tokens if g else 0, (g.seconds if g else 0.0) + guard_s[i],
                                 {"flag": flags[i], "guard_seconds": round(guard_s[i], 6)}
                                 | ({"unguarded": g.text} if g and flags[i] else {})))
        return out


def _build_guard(ctx: MethodContext) -> Defence:
    from ..data import benign_prompts, harmful_prompt_texts
    from ..evaluation.judges import get_judge

    cfg, seed = ctx.settings.guard, ctx.settings.seed
    guard = ClassifierGuard(get_judge(cfg.guard, ctx.settings.placement), cfg)  # an llm: guard runs beside T
    if not cfg.screen_prompts or cfg.prompt_threshold is not None:
        return Defence(responder=guard, row={"defence": {}})
    if ctx.found and "threshold" in ctx.found:
        guard.prompt_threshold = ctx.found["threshold"]
        return Defence(responder=guard, info=ctx.found, row={"defence": ctx.found})
    n = cfg.n_calibration
    # calibration traffic, disjoint from the evaluation sets: training-side harmful requests vs the task's own
    # training prompts and general benign requests
    harmful = harmful_prompt_texts("harmful-pairs", n, seed + 3)
    benign = benign_prompts(ctx.task, n - n // 2, seed + 3) + benign_prompts("depresso", n // 2, seed + 3)
    fit = guard.fit_prompt_threshold(harmful, benign)
    print(f"[classifier-guard {ctx.task}] prompt threshold {fit['threshold']:+.3f}, balanced accuracy "
          f"{fit['balanced_accuracy']:.3f} on {fit['n_harmful']}+{fit['n_benign']} calibration prompts")
    return Defence(responder=guard, info=fit, row={"defence": fit})


register(Method(
    "classifier-guard", "classifier guard", "responder",
    "a separate classifier screens the prompt before generation and the response after; flagged ones get a refusal",
    key=lambda ctx: {"guard": to_dict(ctx.settings.guard), "task": ctx.task}, build=_build_guard, demo=False))
