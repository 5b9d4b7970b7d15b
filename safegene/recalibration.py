"""Few-shot recalibration: one bounded coefficient per selected layer for a task model T.

    W'_l = W_l + α_l · ΔW_l,   α_l = α_max · sigmoid(θ_l) ∈ (0, α_max)

Only θ trains (the adapter's factors and T are frozen). The objective on a few dozen shots is

    NLL(refusal | harmful prompt)  +  λ · KL(T || T + adapter) on task shots' answer positions
        [ + w · softplus(NLL(refusal) − NLL(compliant answer)) per harmful shot, with `preference_weight` w > 0 ]

so the coefficients buy back refusals where T lost them while leaving T's task outputs where they were.

What the harmful shots train on is set by three opt-in knobs (all off by default, the stage keys unchanged):
- `refusal_target: aligned`: each shot's target is the aligned model A's own greedy answer to it where that answer
  refuses (the fixed sentence where it does not), so the target varies with the request instead of one sentence;
- `preference_weight`: the preference term above, against the compliant answer `harmful` holds for each prompt;
- `jailbreak_shots`: a share of the shots is sent wrapped in a jailbreak template of a family disjoint from the
  one the `jailbreak` attack evaluates with (`safegene.data.attacks`), with the same refusal target.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import re
import time
from dataclasses import dataclass
from typing import Any

from .adapter.core import SafetyAdapter
from .adapter.runtime import AttachedAdapter
from .config import AdapterInOut, check, opt, to_dict
from .data import harmful_prompt_texts, prompt_response_pairs
from .data.attacks import EVALUATION_FAMILY, TRAINING_FAMILIES
from .data.records import PromptResponse
from .errors import ConfigError, DataError
from .io import sha256_text
from .forward import ShotPasses
from .models.placement import PlacementConfig, float32_math
from .objectives import encode_batch, opening_only, preference_loss, token_nll, topk_kl

log = logging.getLogger(__name__)

#: what the refusal shots are trained to say: the fixed text (or the refusals file), or A's own refusals
REFUSAL_TARGETS = ("fixed", "aligned")
#: how the coefficients are fitted (see RecalibrateConfig.optimizer)
OPTIMIZERS = ("line-search", "adam")
#: what the benign-but-sensitive prompts constrain (see RecalibrateConfig.sensitive_term)
SENSITIVE_TERMS = ("kl", "refusal-margin")
#: a level the harmful shots' refusal NLL must end at or below (see RecalibrateConfig.refusal_floor)
REFUSAL_FLOORS = ("none", "aligned")
#: meeting the floor (meet_refusal_floor): gradient rounds at most, points tried along each gradient at most, and
#: bisection steps to the least move that meets it
FLOOR_ROUNDS, FLOOR_TRIES, FLOOR_BISECTIONS = 3, 4, 5


@dataclass
class RecalibrateConfig(AdapterInOut):
    """Few-shot recalibration: learn one bounded coefficient per selected layer for a task model T."""

    task_model: str = opt("runs/task-model", "task model T (HF folder, PEFT adapter folder, or embedded name)")
    harmful: str = opt("harmful-pairs", "harmful prompts for the refusal shots")
    refusals: str | None = opt(None, "prompt/response file of refusals; default: the refusal text below")
    refusal_text: str = opt("I'm sorry, but I can't assist with that.", "refusal target used when `refusals` is unset "
                            "(the default model's own most frequent refusal)")
    task: str = opt("arithmetic", "task name or prompt/response file for the utility shots")
    n_harmful: int = opt(32, "harmful shots (<= 32 by default)")
    n_task: int = opt(32, "task shots whose outputs must not move")
    utility_weight: float = opt(1.0, "weight of the KL-to-T term on task shots")
    alpha_max: float = opt(2.0, "coefficients are bounded to [0, alpha_max]")
    alpha_init: float = opt(1.0, "starting coefficient")
    optimizer: str = opt("line-search", "how the coefficients are fitted: line-search (the objective's gradient over "
                         "every shot at alpha_init, then the objective over every shot at up to `search_points` points "
                         "along it, clipped to [0, alpha_max], forward passes only; the best point wins) or adam "
                         "(`steps` Adam steps on mini-batches of `batch_size` shots, the method as first written)",
                         choices=OPTIMIZERS, earlier_value="adam")
    search_points: int = opt(1, "line-search: points tried along the gradient, each one forward pass over every shot "
                             "(1: one step, to where the layer the gradient pushes hardest meets its bound; 3 also tries "
                             "further along, towards every pushed layer on its bound: safer, more over-refusal, see "
                             "bench/results/recalibration.json)",
                             added_later=True)
    chunk_size: int = opt(16, "shots per forward pass when the objective runs over every shot (bounds the activation "
                          "memory of the gradient pass)", added_later=True)
    reuse_prefix: bool = opt(True, "run the prefix every shot shares (the chat template's opening) once per pass as "
                             "cached keys and values, and each chunk of shots, sorted by length, only to its longest "
                             "shot; the same objective up to float rounding, on Llama/Mistral/Qwen2/Qwen3 layouts with "
                             "sdpa or eager attention (others run whole padded shots)", added_later=True)
    steps: int = opt(30, "adam: optimizer steps")
    batch_size: int = opt(8, "adam: shots per step (half harmful, half task; with the refusal margin, as many "
                          "sensitive prompts again)")
    learning_rate: float = opt(0.1, "adam: learning rate on the coefficients' logits")
    max_length: int = opt(96, "token limit per shot")
    tied: bool = opt(False, "one coefficient shared by all layers (the RESTA baseline) instead of one per layer")
    sensitive: str | None = opt(None, "benign-but-sensitive prompts the adapter must not learn to refuse, constrained "
                                "as `sensitive_term` says (built-in: sensitive-shots; never an over-refusal "
                                "evaluation set)", added_later=True)
    n_sensitive: int = opt(32, "benign-but-sensitive shots (with `sensitive`)", added_later=True)
    sensitive_tokens: int = opt(32, "tokens of T's answer kept as each sensitive shot's target", added_later=True)
    sensitive_term: str = opt("kl", "what the `sensitive` prompts constrain: kl (T's own answers join the task shots "
                              "in the KL-to-T term: every change of those answers costs) or refusal-margin (only the "
                              "refusal overtaking T's answer costs: per prompt, softplus(NLL(T's answer) − "
                              "NLL(refusal_text)) over the first `sensitive_opening` tokens of each, per-token means, "
                              "weight `sensitive_weight`)", choices=SENSITIVE_TERMS, added_later=True)
    sensitive_weight: float = opt(1.0, "weight of the refusal-margin term (sensitive_term: refusal-margin)",
                                  added_later=True)
    sensitive_opening: int = opt(8, "refusal-margin: tokens of each answer's opening that are compared (a greedy "
                                 "answer, and the refusal judge, are decided there)", added_later=True)
    refusal_target: str = opt("fixed", "what the harmful shots are trained to say: fixed (`refusal_text`, or the "
                              "`refusals` file's answers) or aligned (the aligned model's own greedy answer to each "
                              "harmful prompt where it refuses, `refusal_text` where it does not; needs `aligned`)",
                              choices=REFUSAL_TARGETS, added_later=True)
    aligned: str | None = opt(None, "the aligned model A (HF folder, or embedded name): its refusals are the targets "
                              "with refusal_target: aligned, its refusal NLL the floor with refusal_floor: aligned",
                              added_later=True)
    aligned_tokens: int = opt(48, "tokens A may answer with (refusal_target: aligned); an answer cut at this limit "
                              "keeps its whole sentences", added_later=True)
    preference_weight: float = opt(0.0, "weight of a preference term against compliance: per harmful shot, "
                                   "softplus(NLL(refusal) - NLL(compliant answer)), both per-token means; the "
                                   "compliant answers are those `harmful` holds (a prompt/response set such as "
                                   "harmful-pairs); 0: off", added_later=True)
    jailbreak_shots: float = opt(0.0, "share of the harmful shots sent wrapped in a jailbreak template (same refusal "
                                 "target); 0: none", added_later=True)
    jailbreak_templates: str = opt("pyrit", "template family of the wrapped shots: "
                                   f"{', '.join(TRAINING_FAMILIES)} (never the '{EVALUATION_FAMILY}' family the "
                                   "jailbreak attack evaluates with; see safegene.data.attacks)",
                                   choices=TRAINING_FAMILIES, added_later=True)
    jailbreak_max_length: int = opt(384, "token limit of a wrapped shot (templates run to 700 characters; plain "
                                    "shots keep max_length)", added_later=True)
    refusal_floor: str = opt("none", "a safety floor for tasks whose data contradicts refusals (a persona that obeys "
                             "everything): with aligned, the harmful shots' refusal NLL must end at or below the "
                             "aligned model's own NLL of the same targets; where the fit leaves it above, the "
                             "coefficients descend the refusal NLL only as far as the floor needs (up to "
                             f"{FLOOR_ROUNDS} gradients and a few forward passes over the harmful shots each), whatever "
                             "that costs the task; needs `aligned`. none: no floor", choices=REFUSAL_FLOORS,
                             added_later=True)
    seed: int = opt(0, "sampling seed")
    placement: PlacementConfig = opt(PlacementConfig(), "where T runs and in what dtype (--device, --dtype, "
                                     "--device-map); the coefficients and the objective stay float32",
                                     added_later=True)

    def __post_init__(self) -> None:
        check(self.alpha_max > 0, "alpha_max must be > 0")
        check(0 < self.alpha_init < self.alpha_max, f"alpha_init must be in (0, alpha_max={self.alpha_max})")
        check(self.steps >= 1 and self.batch_size >= 2, "steps >= 1 and batch_size >= 2 are needed")
        check(self.optimizer in OPTIMIZERS,
              f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        check(self.search_points >= 1, f"search_points must be >= 1, got {self.search_points}")
        check(self.chunk_size >= 1, f"chunk_size must be >= 1, got {self.chunk_size}")
        check(self.n_harmful >= 1 and self.n_task >= 1, "need at least one harmful and one task shot")
        check(self.refusal_target in REFUSAL_TARGETS,
              f"refusal_target must be one of {', '.join(REFUSAL_TARGETS)}, got {self.refusal_target!r}")
        aligned_target = self.refusal_target == "aligned"
        check(self.refusal_floor in REFUSAL_FLOORS,
              f"refusal_floor must be one of {', '.join(REFUSAL_FLOORS)}, got {self.refusal_floor!r}")
        check(not aligned_target or bool(self.aligned),
              "refusal_target 'aligned' needs the aligned model: set aligned (e.g. --aligned runs/aligned)")
        check(self.refusal_floor != "aligned" or bool(self.aligned),
              "refusal_floor 'aligned' needs the aligned model: set aligned (e.g. --aligned runs/aligned)")
        check(aligned_target or self.refusal_floor == "aligned" or not self.aligned,
              "aligned is read only with refusal_target 'aligned' or refusal_floor 'aligned': set refusal_target: "
              "aligned or refusal_floor: aligned, or unset aligned")
        check(not (aligned_target and self.refusals),
              "refusal_target 'aligned' replaces the refusals file's answers: unset refusals, or use refusal_target: fixed")
        check(self.aligned_tokens >= 1, "aligned_tokens must be >= 1")
        check(self.sensitive_term in SENSITIVE_TERMS,
              f"sensitive_term must be one of {', '.join(SENSITIVE_TERMS)}, got {self.sensitive_term!r}")
        check(self.sensitive_term == "kl" or bool(self.sensitive),
              "sensitive_term 'refusal-margin' reads the benign-but-sensitive prompts: set sensitive (e.g. --sensitive "
              "sensitive-shots)")
        check(math.isfinite(self.sensitive_weight) and self.sensitive_weight >= 0,
              f"sensitive_weight must be a number >= 0, got {self.sensitive_weight}")
        check(self.sensitive_term == "refusal-margin" or self.sensitive_weight == 1.0,
              "sensitive_weight is read only with sensitive_term refusal-margin: set that, or leave the weight at 1")
        check(self.sensitive_opening >= 1, f"sensitive_opening must be >= 1, got {self.sensitive_opening}")
        check(math.isfinite(self.preference_weight) and self.preference_weight >= 0,
              f"preference_weight must be a number >= 0 (0 turns the preference term off), got {self.preference_weight}")
        check(not (self.preference_weight > 0 and self.refusals),
              "preference_weight pairs each prompt of `harmful` with its compliant answer, but `refusals` replaces "
              "those prompts: unset refusals, or set preference_weight: 0")
        check(0 <= self.jailbreak_shots <= 1,
              f"jailbreak_shots is a share of the harmful shots: give a number in [0, 1], got {self.jailbreak_shots}")
        check(self.jailbreak_templates != EVALUATION_FAMILY,
              f"jailbreak_templates '{EVALUATION_FAMILY}' is the family the jailbreak attack evaluates with; train on "
              f"one of {', '.join(TRAINING_FAMILIES)}")
        check(self.jailbreak_templates in TRAINING_FAMILIES,
              f"jailbreak_templates must be one of {', '.join(TRAINING_FAMILIES)}, got {self.jailbreak_templates!r}")
        check(self.jailbreak_max_length >= self.max_length,
              f"jailbreak_max_length must be >= max_length ({self.max_length})")


@dataclass
class HarmfulShots:
    """The harmful shots as trained on. Row i of each list belongs to the same shot."""

    refusal: list[PromptResponse]  # the prompt sent (plain or jailbreak-wrapped) and the refusal it is trained towards
    compliant: list[PromptResponse]  # the same prompt with its compliant answer; [] unless preference_weight > 0
    wrapped: list[bool]  # whether the shot's prompt is wrapped in a jailbreak template
    info: dict[str, Any]  # what the card records about them: targets, wrapping, preference pairs


def harmful_shots(cfg: RecalibrateConfig, aligned_model: Any = None, aligned_tokenizer: Any = None) -> HarmfulShots:
    """The harmful shots for `cfg`: prompts from `harmful` (or `refusals`), refusal targets, optional jailbreak
    wrapping and compliant answers. With refusal_target 'aligned', A is loaded from `cfg.aligned` unless given. A
    answers the plain request, and a wrapped shot keeps that target (what to say to the request, whatever wraps
    it), as it keeps the request's compliant answer for the preference term."""
    from .data.attacks import template_family, wrap

    compliant: list[str] = []
    if cfg.refusals:
        given = prompt_response_pairs(cfg.refusals, n=cfg.n_harmful, seed=cfg.seed)
        requests, targets = [p.prompt for p in given], [p.response for p in given]
    else:
        given = []
        if cfg.preference_weight > 0:
            pairs = compliant_pairs(cfg)
            requests, compliant = [p.prompt for p in pairs], [p.response for p in pairs]
        else:
            requests = harmful_prompt_texts(cfg.harmful, cfg.n_harmful, cfg.seed)
        targets = [cfg.refusal_text] * len(requests)
    info: dict[str, Any] = {"refusal_target": cfg.refusal_target}
    if cfg.refusal_target == "aligned":
        answers = aligned_refusals(cfg, requests, aligned_model, aligned_tokenizer)
        targets = [a if a is not None else cfg.refusal_text for a in answers]
        n_aligned = sum(a is not None for a in answers)
        info["refusal_targets"] = {"aligned": n_aligned, "fixed": len(answers) - n_aligned}
        log.info("refusal targets: %d of A's own refusals, %d fixed (A did not refuse)", n_aligned,
                 len(answers) - n_aligned)
    prompts, wrapped = list(requests), [False] * len(requests)
    if cfg.jailbreak_shots > 0:
        # which shots, and in which template, are fixed by the seed; the templates are shuffled and then cycled, so
        # each is used about equally often
        rng = random.Random(cfg.seed + 3)
        n_wrap = min(len(requests), max(1, int(cfg.jailbreak_shots * len(requests) + 0.5)))
        templates = template_family(cfg.jailbreak_templates)
        order = rng.sample(range(len(templates)), len(templates))
        for k, i in enumerate(sorted(rng.sample(range(len(requests)), n_wrap))):
            prompts[i], wrapped[i] = wrap(templates[order[k % len(order)]], requests[i]), True
        info["jailbreak"] = {"family": cfg.jailbreak_templates, "share": cfg.jailbreak_shots, "wrapped": n_wrap,
                             "templates": min(n_wrap, len(templates))}
    if cfg.preference_weight > 0:
        info["preference_pairs"] = len(compliant)
    if given:  # a refusals file's pairs keep their own fields (system prompt, source)
        refusal = [dataclasses.replace(g, prompt=q, response=t) for g, q, t in zip(given, prompts, targets)]
    else:
        refusal = [PromptResponse(q, t) for q, t in zip(prompts, targets)]
    return HarmfulShots(refusal, [PromptResponse(q, c) for q, c in zip(prompts, compliant)], wrapped, info)


def compliant_pairs(cfg: RecalibrateConfig) -> list[PromptResponse]:
    """`harmful`'s prompts with their compliant answers: the same prompts, in the same order, that
    `harmful_prompt_texts` samples from a prompt/response set."""
    from .data.text import looks_like_refusal

    try:
        pairs = prompt_response_pairs(cfg.harmful, n=cfg.n_harmful, seed=cfg.seed)
    except DataError as e:
        raise ConfigError(f"preference_weight needs a compliant answer for each harmful prompt, but harmful "
                          f"'{cfg.harmful}' gives none ({e}); set harmful to a prompt/response set such as "
                          "harmful-pairs, or preference_weight: 0") from None
    refusing = sum(looks_like_refusal(p.response) for p in pairs)
    if refusing:  # the term would then push *towards* refusing less on those shots
        log.warning("%d of the %d 'compliant' answers in %s look like refusals", refusing, len(pairs), cfg.harmful)
    return pairs


def aligned_refusals(cfg: RecalibrateConfig, prompts: list[str], model: Any = None,
                     tokenizer: Any = None) -> list[str | None]:
    """A's own greedy answer to each prompt where it looks like a refusal, else None (the caller falls back to the
    fixed text). Greedy decoding makes the targets a function of A, the prompts and `aligned_tokens` alone, so a
    re-run trains on the same targets. An answer cut at `aligned_tokens` keeps its whole sentences: a target ending
    mid-phrase would teach the model to stop there."""
    from .data.text import looks_like_refusal
    from .generation import GenerationConfig, generate_detailed

    if model is None:
        from .models import load_model, load_tokenizer

        model, tokenizer = load_model(cfg.aligned, cfg.placement), load_tokenizer(cfg.aligned)
    gen = GenerationConfig(max_new_tokens=cfg.aligned_tokens, batch_size=16, do_sample=False)
    out: list[str | None] = []
    for g in generate_detailed(model, tokenizer, prompts, gen, progress=False):
        text = whole_sentences(g.text) if g.tokens >= cfg.aligned_tokens else g.text.strip()
        out.append(text if text and looks_like_refusal(text) else None)
    return out


def whole_sentences(text: str) -> str:
    """`text` up to its last sentence end (., ! or ? before a space or the end); all of it when none ends."""
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
    return (text[:ends[-1]] if ends else text).strip()


def refusal_shots(cfg: RecalibrateConfig) -> list[PromptResponse]:
    """The harmful shots' (prompt, refusal target) pairs, as recalibration trains on them."""
    return harmful_shots(cfg).refusal


def task_shots(cfg: RecalibrateConfig) -> list[PromptResponse]:
    from .data.tasks import TASKS

    if cfg.task in TASKS:
        return [e.as_pair() for e in TASKS[cfg.task].load("train", n=cfg.n_task, seed=cfg.seed + 1)]
    return prompt_response_pairs(cfg.task, n=cfg.n_task, seed=cfg.seed + 1)


def _sensitive_prompts(cfg: RecalibrateConfig) -> list[str]:
    from .data import harmful_prompts

    return [p.prompt for p in harmful_prompts(cfg.sensitive, n=cfg.n_sensitive, seed=cfg.seed + 2)]


def sensitive_shots(cfg: RecalibrateConfig, model: Any, tokenizer: Any) -> list[PromptResponse]:
    """Benign-but-sensitive prompts with T's own greedy answers (T alone: call before the adapter is attached): the
    KL shots of sensitive_term 'kl', the answers the refusal must not overtake with 'refusal-margin'."""
    from .generation import GenerationConfig, generate

    if not cfg.sensitive:
        return []
    prompts = _sensitive_prompts(cfg)
    answers = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=cfg.sensitive_tokens,
                                                                   batch_size=16), progress=False)
    return [PromptResponse(p, a) for p, a in zip(prompts, answers) if a.strip()]


def margin_batches(tokenizer: Any, sensitive: list[PromptResponse], cfg: RecalibrateConfig) -> tuple[Any, Any]:
    """The refusal-margin's two batches over the same sensitive prompts, row by row: T's answers and the refusal,
    each scored on its first `sensitive_opening` tokens only."""
    refusals = [PromptResponse(p.prompt, cfg.refusal_text) for p in sensitive]
    return (opening_only(encode_batch(tokenizer, sensitive, cfg.max_length), cfg.sensitive_opening),
            opening_only(encode_batch(tokenizer, refusals, cfg.max_length), cfg.sensitive_opening))


class ShotObjective:
    """The recalibration objective on the shots, run from the lowest selected layer on the recorded lower layers.

    `terms` is the mini-batch form (Adam); `evaluate` runs every shot in chunks of `chunk_size` and weights each chunk
    by its share of target tokens (NLL), target positions (KL) or shots (preference), so the chunked value and
    gradient are those of one pass over every shot, with the activation memory of one chunk. Each pass runs the
    prefix the shots share once and each chunk only to its longest shot (`forward.ShotPasses`)."""

    def __init__(self, model: Any, start_layer: int, cfg: RecalibrateConfig, harmful: Any, task: Any,
                 compliant: Any | None, sensitive: Any | None = None) -> None:
        """Runs the layers below `start_layer` once over each set of shots (call with the adapter disabled: they
        never change). `sensitive`: the refusal-margin's (T's answers, refusals) to the same sensitive prompts, row
        by row, each scored on its opening only."""
        self.cfg, self.hb, self.tb, self.cb = cfg, harmful, task, compliant
        self.sb, self.rb = sensitive if sensitive is not None else (None, None)
        cut = cfg.reuse_prefix
        self.h = ShotPasses.capture(model, start_layer, harmful, cut)
        self.t = ShotPasses.capture(model, start_layer, task, cut)
        # the compliant answers pair with the harmful shots row by row: they are grouped as the harmful rows are
        self.c = ShotPasses.capture(model, start_layer, compliant, cut) if compliant is not None else None
        self.s = ShotPasses.capture(model, start_layer, self.sb, cut) if sensitive is not None else None
        self.r = ShotPasses.capture(model, start_layer, self.rb, cut) if sensitive is not None else None
        self.t_vals = self.t_idx = None
        # each term's weight in the loss (the refusal NLL is the unit)
        self.weights = {"refusal_nll": 1.0, "preference": cfg.preference_weight, "task_kl": cfg.utility_weight,
                        "sensitive_refusal": cfg.sensitive_weight}

    def fix_reference(self) -> None:
        """T's own top-64 answer distribution on the task shots (call while the adapter is disabled): what must not
        move, stored by target position in the shots' order, whatever order the chunks ran in."""
        import torch

        with torch.inference_mode():
            prefix = self.t.prefix()
            vals = idxs = None
            for idx in self._chunks(self.t):
                logp = torch.log_softmax(float32_math(self.t.logits(idx, prefix)), -1)
                v, i = logp.topk(64, -1)
                if vals is None:
                    n = int(self.tb.target_mask.sum())
                    vals, idxs = v.new_empty((n, v.shape[1])), i.new_empty((n, i.shape[1]))
                rows = self.tb.target_rows(idx)
                vals[rows], idxs[rows] = v, i
        self.t_vals, self.t_idx = vals.clone(), idxs.clone()

    def _chunks(self, passes: ShotPasses) -> list[list[int]]:
        return passes.groups(self.cfg.chunk_size)

    def harmful_terms(self, idx: list[int], prefixes: dict[str, Any] | None = None,
                      preference: bool = True) -> dict[str, Any]:
        """The refusal NLL on harmful shots `idx` and, when on (and `preference`), the preference term on the same
        shots."""
        prefixes = prefixes or {}
        logits = self.h.logits(idx, prefixes.get("h"))
        terms = {"refusal_nll": token_nll(logits, self.hb.targets[idx][self.hb.target_mask[idx]])}
        if self.c is not None and preference:
            c_logits = self.c.logits(idx, prefixes.get("c"))
            terms["preference"] = preference_loss(logits, self.hb.subset(idx), c_logits, self.cb.subset(idx))
        return terms

    def task_kl(self, idx: list[int], prefix: dict[int, tuple] | None = None) -> Any:
        rows = self.tb.target_rows(idx)
        return topk_kl(self.t.logits(idx, prefix), self.t_vals[rows], self.t_idx[rows])

    def sensitive_refusal(self, idx: list[int], prefixes: dict[str, Any] | None = None) -> Any:
        """mean over sensitive prompts `idx` of softplus(NLL(T's answer) − NLL(refusal)), each over its opening:
        near 0 where T's own answer is far likelier than the refusal (T's greedy answer stands), log 2 where the two
        tie, rising as the refusal overtakes it. The preference term's mirror image (objectives.preference_loss)."""
        prefixes = prefixes or {}
        answer = self.s.logits(idx, prefixes.get("s"))
        refusal = self.r.logits(idx, prefixes.get("r"))
        return preference_loss(answer, self.sb.subset(idx), refusal, self.rb.subset(idx))

    def terms(self, h_idx: list[int], t_idx: list[int], s_idx: list[int] | None = None) -> dict[str, Any]:
        out = {**self.harmful_terms(h_idx), "task_kl": self.task_kl(t_idx)}
        if self.s is not None and s_idx:
            out["sensitive_refusal"] = self.sensitive_refusal(s_idx)
        return out

    def loss(self, terms: dict[str, Any]) -> Any:
        return sum(self.weights[k] * v for k, v in terms.items())

    def evaluate(self, grad: bool = False, task: bool = True, before_chunk: Any = None,
                 refusal_only: bool = False) -> dict[str, float]:
        """Every term over every shot (the task KL only with `task`), and their weighted sum as `loss`. With `grad`,
        the loss's gradient accumulates into the coefficients' leaf; `before_chunk()` runs before each chunk (it
        re-derives the per-layer coefficients, whose graph each backward frees). `refusal_only`: the refusal NLL
        alone (one pass over the harmful shots; what the refusal floor descends)."""
        import torch

        hm, tm = self.hb.target_mask, self.tb.target_mask
        n_tokens, n_positions, n_shots = int(hm.sum()), int(tm.sum()), len(self.hb)
        preference = self.c is not None and not refusal_only

        def harmful(idx: list[int], prefixes: dict[str, Any]) -> dict[str, tuple[float, Any]]:
            shares = {"refusal_nll": int(hm[idx].sum()) / n_tokens, "preference": len(idx) / n_shots}
            return {k: (shares[k], v) for k, v in self.harmful_terms(idx, prefixes, preference).items()}

        def task_kl(idx: list[int], prefixes: dict[str, Any]) -> dict[str, tuple[float, Any]]:
            return {"task_kl": (int(tm[idx].sum()) / n_positions, self.task_kl(idx, prefixes["t"]))}

        def sensitive(idx: list[int], prefixes: dict[str, Any]) -> dict[str, tuple[float, Any]]:
            return {"sensitive_refusal": (len(idx) / len(self.s), self.sensitive_refusal(idx, prefixes))}

        passes = [({"h": self.h, **({"c": self.c} if preference else {})}, harmful)]
        if task and not refusal_only:
            passes.append(({"t": self.t}, task_kl))
        if self.s is not None and not refusal_only:  # not 0 at T alone: run with `task` off too
            passes.append(({"s": self.s, "r": self.r}, sensitive))
        out: dict[str, float] = {}
        with torch.enable_grad() if grad else torch.no_grad():
            for sets, chunk_terms in passes:
                self._pass(sets, chunk_terms, grad, before_chunk, out)
        out["loss"] = float(self.loss({**out, "task_kl": out.get("task_kl", 0.0)}))
        return out

    def _pass(self, sets: dict[str, ShotPasses], chunk_terms: Any, grad: bool, before_chunk: Any,
              out: dict[str, float]) -> None:
        """One pass over the chunks of the first of `sets` (the others pair with it row by row): their shared
        prefixes once, then per chunk `chunk_terms(idx, prefixes)` = {term: (the chunk's share of it, value)},
        whose weighted sum's gradient is taken with `grad`; each term's shares add up into `out`."""
        if before_chunk:
            before_chunk()
        prefixes = _PrefixPass(sets, grad)
        for idx in self._chunks(next(iter(sets.values()))):
            if before_chunk:
                before_chunk()
            terms = chunk_terms(idx, prefixes.values)
            if grad:
                sum(self.weights[k] * share * v for k, (share, v) in terms.items()).backward()
            for k, (share, v) in terms.items():
                out[k] = out.get(k, 0.0) + share * float(v.detach())
        prefixes.backward()

    def at_task_model(self) -> dict[str, float]:
        """The objective's terms with the adapter disabled (T alone); the KL of T to itself is 0 by definition, so
        the task shots are not run."""
        out = {**self.evaluate(task=False), "task_kl": 0.0}
        out.pop("loss")
        return out


class _PrefixPass:
    """The shared prefixes of one pass over every chunk. With grad, each chunk's backward stops at a detached copy
    of the prefix's keys and values and leaves its gradient there; `backward()` then takes the sum of those through
    the prefix's own graph once, so the prefix runs once per pass, not once per chunk."""

    def __init__(self, passes: dict[str, ShotPasses], grad: bool) -> None:
        self.values: dict[str, Any] = {}
        self._graphs: list[tuple[Any, Any]] = []
        for name, p in passes.items():
            kv = p.prefix()
            if kv is not None and grad:
                leaves = {l: tuple(t.detach().requires_grad_() for t in pair) for l, pair in kv.items()}
                self._graphs += [(t, leaf) for l in kv for t, leaf in zip(kv[l], leaves[l])]
                kv = leaves
            self.values[name] = kv

    def backward(self) -> None:
        import torch

        pairs = [(t, leaf.grad) for t, leaf in self._graphs if leaf.grad is not None and t.requires_grad]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        self._graphs = []


def recalibrate(adapter: SafetyAdapter, cfg: RecalibrateConfig, model: Any = None, tokenizer: Any = None,
                progress: bool = True, aligned_model: Any = None, aligned_tokenizer: Any = None) -> SafetyAdapter:
    """Learn α_l for `adapter`'s selected layers on task model `cfg.task_model`; returns the calibrated adapter.
    With refusal_target 'aligned', A is `aligned_model` if given, else loaded from `cfg.aligned` for the targets."""
    from .models import load_model, load_tokenizer

    t0 = time.perf_counter()
    if model is None:
        model, tokenizer = load_model(cfg.task_model, cfg.placement), load_tokenizer(cfg.task_model)
    for msg in adapter.check_model(model, what=f"task model {cfg.task_model}"):
        log.warning(msg)
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.refusal_floor == "aligned":  # A is loaded once, for the targets and the floor
        if aligned_tokenizer is None:
            aligned_tokenizer = load_tokenizer(cfg.aligned)
        if len(aligned_tokenizer) != len(tokenizer):
            raise ConfigError(f"refusal_floor 'aligned' scores the shots' tokens under A, but A's tokenizer "
                              f"({len(aligned_tokenizer)} tokens) is not T's ({len(tokenizer)}): set aligned to the "
                              "aligned model of T's family")
        if aligned_model is None:
            aligned_model = load_model(cfg.aligned, cfg.placement)
    shots = harmful_shots(cfg, aligned_model, aligned_tokenizer)
    harm = shots.refusal
    # a wrapped shot gets room for its template; plain shots keep max_length, so their tokens are as before
    limits = [cfg.jailbreak_max_length if w else cfg.max_length for w in shots.wrapped]
    hb = encode_batch(tokenizer, harm, limits)
    floor = refusal_nll(aligned_model, hb, cfg.chunk_size, cfg.reuse_prefix) if cfg.refusal_floor == "aligned" else None
    aligned_model = aligned_tokenizer = None  # not needed again: dropped before T generates and the fit runs
    sensitive = sensitive_shots(cfg, model, tokenizer)
    margin = cfg.sensitive_term == "refusal-margin"
    task = task_shots(cfg) + ([] if margin else sensitive)
    tb = encode_batch(tokenizer, task, cfg.max_length)
    preference = cfg.preference_weight > 0
    cb = encode_batch(tokenizer, shots.compliant, limits) if preference else None
    layers = adapter.layers
    start_layer = min(layers)
    handle = AttachedAdapter(model, adapter)
    try:
        handle.disable()
        t_phase = time.perf_counter()
        # layers below the lowest selected one never change: run them once, and only the rest per evaluation
        objective = ShotObjective(model, start_layer, cfg, hb, tb, cb,
                                  margin_batches(tokenizer, sensitive, cfg) if margin and sensitive else None)
        objective.fix_reference()
        before = objective.at_task_model()
        handle.enable()
        phases = {"cache_lower_layers_s": round(time.perf_counter() - t_phase, 2)}
        fit = fit_line_search if cfg.optimizer == "line-search" else fit_adam
        alpha, unit, after, history, fit_phases = fit(objective, handle, layers, cfg, progress)
        phases.update(fit_phases)
        if floor is not None:
            t_phase = time.perf_counter()
            alpha, after, floor_info = meet_refusal_floor(objective, handle, layers, cfg, alpha, after, floor, history)
            phases["floor_s"] = round(time.perf_counter() - t_phase, 2)
    finally:
        handle.remove()
    coeffs = {l: round(float(a), 6) for l, a in zip(layers, alpha)}
    out = adapter.with_coefficients(coeffs)
    # the adapter at full strength should make the refusals likelier than T alone does; where it does not (a model
    # whose fine-tune moved it where A − D no longer points back to refusals, as a role-play persona does), no
    # coefficient can restore safety and the user should hear so rather than read a calm card
    lowers = unit["refusal_nll"] < before["refusal_nll"]
    if not lowers:
        log.warning("the safety adapter does not make refusals likelier on %s (refusal NLL %.3f at T alone, %.3f with "
                    "every selected layer at α = 1): recalibration cannot restore safety on this model; measure it, "
                    "and consider re-aligning it (safety SFT) instead", cfg.task_model, before["refusal_nll"],
                    unit["refusal_nll"])
    # the compliant answers are part of the data only when the preference term reads them
    hashed = harm + task + (shots.compliant if preference else []) + (sensitive if margin else [])
    out.card["recalibration"] = {
        "task_model": cfg.task_model,
        "config": to_dict(cfg),
        "coefficients": {str(l): c for l, c in coeffs.items()},
        "shots": {"harmful": len(harm), "task": len(task), **({"sensitive_refusal": len(sensitive)} if margin else {}),
                  "data_sha256": sha256_text("\n".join(f"{p.prompt}\x1f{p.response}" for p in hashed))},
        "harmful_shots": shots.info,
        "objective": {"task_model_alone": _rounded(before), "alpha_1": _rounded(unit), "after": _rounded(after)},
        "adapter_lowers_refusal_nll": lowers,
        **({"refusal_floor": floor_info} if floor is not None else {}),
        "history": history,
        "seconds": round(time.perf_counter() - t0, 2),
        "phases": phases,
    }
    return out


def _coefficient_setter(handle: AttachedAdapter, layers: list[int]) -> Any:
    """set(values) puts α (one value, tied, or one per layer) on the attached layers, each as a 0-d tensor that
    multiplies a bfloat16 or GPU activation like a number and takes its gradient back to `values`."""

    def set_(values: Any) -> Any:
        alpha = values.expand(len(layers))
        for j, l in enumerate(layers):
            handle.scales[l] = alpha[j]
        return alpha

    return set_


def _descent_line(grad: Any, start: Any, alpha_max: float) -> tuple[Any, Any] | None:
    """The direction d = −grad/‖grad‖∞ from `start` and, per coefficient, how far along d it may go before its bound
    in [0, alpha_max] (inf where d does not move it); None where the gradient is zero or not finite."""
    import torch

    scale = float(grad.abs().max())
    if not (math.isfinite(scale) and scale > 0):
        return None
    d = -grad / scale
    room = torch.where(d > 0, (alpha_max - start) / d.clamp(min=1e-12),
                       torch.where(d < 0, start / (-d).clamp(min=1e-12), torch.full_like(d, math.inf)))
    return d, room


def _terms_only(evaluated: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in evaluated.items() if k != "loss"}


def fit_line_search(objective: ShotObjective, handle: AttachedAdapter, layers: list[int], cfg: RecalibrateConfig,
                    progress: bool) -> tuple[Any, dict, dict, list, dict]:
    """One gradient of the whole objective at α = alpha_init, then the objective at up to `search_points` points
    α(t) = clip(α0 − t·g/‖g‖∞, 0, alpha_max). The first point puts the layer the gradient pushes hardest on its
    bound; a point that improves is followed by one twice as far (up to where every pushed layer sits on its
    bound), one that does not by one a quarter as far, until a step back from an improvement; the best point seen,
    α0 included, wins.

    Why not many small steps: the parameters are |S| scalars and the shots a few dozen, so one exact gradient over
    every shot says where to go, and on the default model the objective falls towards the bound (the Adam fit's
    coefficients ended where its step budget let them). Adam's mini-batch steps paid a backward pass each for noisy
    gradients. Measured (bench/results/recalibration.json): one point reached a lower objective than 20 Adam steps
    in 39 % of their time; three points put every coefficient on its bound."""
    import torch

    set_alphas = _coefficient_setter(handle, layers)
    n = 1 if cfg.tied else len(layers)
    a0 = torch.full((n,), float(cfg.alpha_init), requires_grad=True)
    t_phase = time.perf_counter()
    at_a0 = objective.evaluate(grad=True, before_chunk=lambda: set_alphas(a0))
    grad = a0.grad.detach().clone()
    a0 = a0.detach()
    phases = {"gradient_s": round(time.perf_counter() - t_phase, 2)}
    t_phase = time.perf_counter()
    history: list[dict[str, Any]] = [{"t": 0.0, **_rounded(at_a0), "gradient": [round(float(g), 6) for g in grad]}]
    best_a, best = a0, at_a0
    line = _descent_line(grad, a0, cfg.alpha_max)
    if line is not None:
        d, room = line
        t_lead = float(room[d.abs() == 1].min())
        t_all = float(room[torch.isfinite(room)].max())
        t, improved_once = t_lead, False
        bar = _progress_bar(cfg.search_points, progress)
        for _ in range(cfg.search_points):
            a = (a0 + t * d).clamp(0.0, cfg.alpha_max)
            with torch.no_grad():
                set_alphas(a)
                value = objective.evaluate()
            history.append({"t": round(t, 6), **_rounded(value), "alpha": [round(float(x), 6) for x in a]})
            if bar:
                bar.update(1)
            if value["loss"] < best["loss"]:
                best_a, best, improved_once = a, value, True
                if t >= t_all:
                    break  # every pushed coefficient is on its bound: further along changes nothing
                t = min(2 * t, t_all)
            elif improved_once:
                break  # past the best point along the line
            else:
                t /= 4
        if bar:
            bar.close()
    phases["search_s"] = round(time.perf_counter() - t_phase, 2)
    unit = at_a0
    if cfg.alpha_init != 1.0:  # the card compares with the uncalibrated adapter, α = 1
        with torch.no_grad():
            set_alphas(torch.ones(n))
            unit = objective.evaluate()
    return (set_alphas(best_a).detach(), _terms_only(unit), _terms_only(best), history, phases)


def refusal_nll(model: Any, batch: Any, chunk_size: int, reuse_prefix: bool = True) -> float:
    """`model`'s NLL of `batch`'s targets, per target token over every row: the objective's refusal_nll term, for a
    whole model (the aligned one) rather than the adapted layers. Runs as the objective does (`forward.ShotPasses`
    from the embeddings: the LM head only at the targets, each chunk to its longest row, the shared prefix once)."""
    import torch

    total, n_tokens = 0.0, int(batch.target_mask.sum())
    with torch.inference_mode():
        passes = ShotPasses.capture(model, 0, batch, reuse_prefix)
        prefix = passes.prefix()
        for idx in passes.groups(chunk_size):
            k = int(batch.target_mask[idx].sum())
            if k:
                nll = token_nll(passes.logits(idx, prefix), batch.targets[idx][batch.target_mask[idx]])
                total += float(nll) * k
    return total / n_tokens


def meet_refusal_floor(objective: ShotObjective, handle: AttachedAdapter, layers: list[int], cfg: RecalibrateConfig,
                       alpha: Any, after: dict[str, float], floor: float,
                       history: list[dict[str, Any]]) -> tuple[Any, dict[str, float], dict[str, Any]]:
    """The fitted coefficients `alpha` moved, where their refusal NLL (`after`) is above `floor`, by projected
    descent on the refusal NLL alone: per round, its gradient g and the points α(t) = clip(α − t·g/‖g‖∞, 0,
    alpha_max) from every pushed coefficient on its bound back by quarters, until one meets the floor (then the
    least t that does, by bisection) or at least lowers the refusal NLL (the next round starts there). The gradient
    is local: the far end of its line can be worse than where it starts, so no point is taken unseen. The task terms
    are not consulted: the floor is a constraint, its price is what the task pays. Out of reach, the lowest refusal
    NLL found is kept and a warning says so. The points tried join `history` (marked with their `floor` round);
    returns (α, the objective's terms there, what the card records)."""
    import torch

    info: dict[str, Any] = {"floor": round(floor, 4), "fit_refusal_nll": round(after["refusal_nll"], 4)}
    if after["refusal_nll"] <= floor:
        return alpha, after, {**info, "met": True, "moved": False}
    set_alphas = _coefficient_setter(handle, layers)
    n = 1 if cfg.tied else len(layers)

    def direction(a: Any) -> tuple[Any, float] | None:
        leaf = a.clone().requires_grad_()
        objective.evaluate(grad=True, before_chunk=lambda: set_alphas(leaf), refusal_only=True)
        line = _descent_line(leaf.grad.detach(), a, cfg.alpha_max)
        if line is None:
            return None
        d, room = line
        t_far = float(room[torch.isfinite(room)].max())
        # every coefficient the gradient pushes already sits on that bound: the descent ends here
        return (d, t_far) if t_far > 1e-9 else None

    def refusal_at(a: Any, d: Any, t: float, round_: int) -> float:
        point = (a + t * d).clamp(0.0, cfg.alpha_max)
        with torch.no_grad():
            set_alphas(point)
            value = objective.evaluate(refusal_only=True)["refusal_nll"]
        history.append({"t": round(t, 6), "refusal_nll": round(value, 4),
                        "alpha": [round(float(x), 6) for x in point], "floor": round_})
        return value

    a, r, met = alpha[:n].detach().clone(), after["refusal_nll"], False
    for round_ in range(1, FLOOR_ROUNDS + 1):
        line = direction(a)
        if line is None:
            break
        d, t = line
        step = None
        for _ in range(FLOOR_TRIES):
            value = refusal_at(a, d, t, round_)
            if value <= floor or value < r:
                step, met = t, value <= floor
                break
            t /= 4
        if step is None:
            break  # no point along the gradient lowers the refusal NLL: as low as this descent goes
        if met:
            lo, hi = 0.0, step  # lo above the floor (where the round started), hi at or below it
            for _ in range(FLOOR_BISECTIONS):
                mid = (lo + hi) / 2
                if refusal_at(a, d, mid, round_) <= floor:
                    hi = mid
                else:
                    lo = mid
            a = (a + hi * d).clamp(0.0, cfg.alpha_max)
            break
        a, r = (a + step * d).clamp(0.0, cfg.alpha_max), value
    if not met:
        log.warning("refusal floor %.4f (the aligned model's refusal NLL) is out of reach: descent on the refusal NLL "
                    "got it to %.4f from %.4f; kept that point", floor, r, after["refusal_nll"])
    with torch.no_grad():
        moved = set_alphas(a).detach()
        value = objective.evaluate()
    return moved, _terms_only(value), {**info, "met": met, "moved": not torch.equal(a, alpha[:n]),
                                       "rounds": max((h["floor"] for h in history if h.get("floor")), default=0)}


def _progress_bar(total: int, progress: bool) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="recalibrating α (line search)", unit="point")


def fit_adam(objective: ShotObjective, handle: AttachedAdapter, layers: list[int], cfg: RecalibrateConfig,
             progress: bool) -> tuple[Any, dict, dict, list, dict]:
    """`steps` Adam steps on θ, α = alpha_max·sigmoid(θ), each on `batch_size` shots (half harmful, half task)."""
    import torch
    from tqdm.auto import tqdm

    set_alphas = _coefficient_setter(handle, layers)
    frac = cfg.alpha_init / cfg.alpha_max
    # tied: one θ broadcast over every layer (RESTA's single global coefficient, fitted by the same objective)
    theta = torch.nn.Parameter(torch.full((1 if cfg.tied else len(layers),), math.log(frac / (1 - frac))))
    opt = torch.optim.Adam([theta], lr=cfg.learning_rate)
    t_phase = time.perf_counter()
    rng = random.Random(cfg.seed)
    half = max(1, cfg.batch_size // 2)
    n_h, n_t, n_s = len(objective.hb), len(objective.tb), len(objective.s) if objective.s is not None else 0
    history = []
    for _ in tqdm(range(cfg.steps), desc="recalibrating α", unit="step", disable=not progress):
        set_alphas(cfg.alpha_max * torch.sigmoid(theta))
        terms = objective.terms(rng.sample(range(n_h), min(half, n_h)), rng.sample(range(n_t), min(half, n_t)),
                                rng.sample(range(n_s), min(half, n_s)) if n_s else None)
        loss = objective.loss(terms)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append({"loss": round(loss.detach().item(), 4),
                        **_rounded({k: v.detach() for k, v in terms.items()})})
    alpha = set_alphas(cfg.alpha_max * torch.sigmoid(theta)).detach()
    phases = {"steps_s": round(time.perf_counter() - t_phase, 2)}
    t_phase = time.perf_counter()
    after = objective.evaluate()
    handle.set_coefficients(1.0)
    unit = objective.evaluate()  # α = 1 everywhere: the uncalibrated adapter, for comparison
    phases["objective_checks_s"] = round(time.perf_counter() - t_phase, 2)
    return alpha, _terms_only(unit), _terms_only(after), history, phases


def _rounded(terms: dict[str, Any]) -> dict[str, float]:
    """Objective terms as the card records them (the KL is small: one more digit)."""
    return {k: round(float(v), 5 if k == "task_kl" else 4) for k, v in terms.items()}
