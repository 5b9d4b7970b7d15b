"""The product path: `safegene family build` once per model family, `safegene protect` after every fine-tune.

    family build:  A --degrade--> D;  A − D --extract--> adapter;  --select--> the layers that matter
                   -> FAMILY_DIR (self-contained: protect never needs D again)
    protect:       T + FAMILY_DIR + your task data
                   -> split the data into few-shot shots and held-out check items
                   -> measure T; recalibrate the family's adapter on T; measure T + adapter on the same prompts
                   -> OUT/adapter (PEFT folder), OUT/model with --merge, results.json, report.html, README.md
                   -> --fail-if limits: a distinct exit status for CI
    eval:          the same measurement for any model, with or without an adapter

Everything is written into a temporary folder that becomes OUT only when the run succeeds.
"""

from __future__ import annotations

import functools
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .adapter import SafetyAdapter, extract_adapter
from .adapter.extract import ExtractConfig
from .apply import merge_to_folder
from .config import check, opt, settings, to_dict
from .data import harmful_prompts
from .data.records import TaskExample
from .errors import ConfigError, FamilyMismatchError, SafegeneError
from .generation import GenerationConfig, generate
from .io import atomic_dir, check_output_path, write_json
from .models import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model_path
from .models.placement import PlacementConfig
from .recalibration import RecalibrateConfig, recalibrate
from .runcard import input_digest, library_versions
from .selection import SelectConfig, plot_layer_scores, select_layers
from .stages import adapter_stage, read_card, trained_or_reused
from .training import DegradeConfig, LoraTrainConfig, degrade

FAMILY_FORMAT = 1
FAMILY_FILE = "family.json"
#: what `protect` reads from a family folder; D (under work/) is not among them
FAMILY_FILES = ("selected/adapter_config.json", "selected/adapter_model.safetensors",
                "selected/safegene_factors.safetensors", "selected/safegene.json")
#: exit status of a run whose --fail-if limits failed (2 is a usage or input error, 1 an unexpected one)
LIMITS_FAILED = 3


# --- family build -------------------------------------------------------------------------------------------------


@dataclass
class FamilyConfig:
    """Once per model family: degrade the aligned model A into D, extract A − D as a low-rank safety adapter, and
    select the layers that matter. The folder holds everything `protect` needs on any machine."""

    aligned: str = opt(DEFAULT_MODEL, "aligned model A: embedded name, HF folder, .gguf file or hub id")
    output: str | None = opt(None, "family folder (a re-run with the same inputs reuses what is done)",
                             aliases=("-o",))
    degrade_data: str = opt("harmful-pairs", "harmful (request, compliant answer) pairs for D: built-in name or file")
    degrade_examples: int = opt(160, "pairs drawn from degrade_data")
    train: LoraTrainConfig = opt(LoraTrainConfig(), "LoRA settings of the degrade fine-tune")
    rank: int = opt(8, "rank of the adapter's factors per module")
    select_prompts: int = opt(32, "harmful and benign prompts that score the layers")
    top_k: int = opt(8, "layers kept")
    seed: int = opt(0, "seed of every sample")
    placement: PlacementConfig = opt(PlacementConfig(), "where A and D run and train, in what dtype (--device, "
                                     "--dtype; --device-map for the layer selection)", added_later=True)

    def __post_init__(self) -> None:
        check(self.degrade_examples >= 1 and self.select_prompts >= 2, "degrade_examples >= 1 and select_prompts "
              ">= 2 are needed")
        check(self.top_k >= 1 and self.rank >= 1, "top_k and rank must be >= 1")


def build_family(cfg: FamilyConfig, progress: bool = True) -> dict[str, Any]:
    """Build (or complete) a family folder; returns its `family.json` content."""
    from .training import portable_ref

    if not cfg.output:
        raise ConfigError("family build needs an output folder: -o FAMILY_DIR")
    out = check_output_path(cfg.output, inputs=[cfg.aligned], overwrite=True)
    if out.is_dir() and any(out.iterdir()) and not (out / FAMILY_FILE).is_file() and not (out / "work").is_dir():
        raise ConfigError(f"{out} exists and is not a family folder; pick a new folder for the family")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    aligned = input_digest(resolve_model_path(cfg.aligned))
    previous = read_card(out / FAMILY_FILE)
    # the card goes first and comes back last: a folder whose rebuild was interrupted is not taken for a family
    (out / FAMILY_FILE).unlink(missing_ok=True)
    degraded = out / "work" / "degraded"
    if previous and previous.get("inputs", {}).get("aligned", {}).get("hash") != aligned.get("hash"):
        import shutil

        print(f"[family] the aligned model changed since {out} was built: building it again")
        for stale in (degraded, out / "adapter", out / "selected"):
            shutil.rmtree(stale, ignore_errors=True)
    dcfg = DegradeConfig(model=cfg.aligned, data=cfg.degrade_data, n_examples=cfg.degrade_examples,
                         output=str(degraded), train=cfg.train, placement=cfg.placement)
    d_card, _ = trained_or_reused("degrade", degraded, dcfg, functools.partial(degrade, progress=progress))
    d_digest = input_digest(degraded)
    ecfg = ExtractConfig(aligned=cfg.aligned, degraded=str(degraded), output=str(out / "adapter"), rank=cfg.rank,
                         seed=cfg.seed)
    # keyed on what A and D hold, not on how D was trained: a retrained D gives a new adapter; no placement (the SVD
    # runs on the CPU, distillation is not run here), and `settings` keeps the default one out of the key, so that
    # families built before it existed still match
    adapter, extract_s, _ = adapter_stage(
        "extract", out / "adapter", {"extract": settings(ecfg), "aligned": aligned.get("hash"),
                                     "degraded": d_digest["hash"]},
        lambda: extract_adapter(ecfg, overwrite=True, save=False, progress=progress))
    scfg = SelectConfig(model=str(degraded), n_harmful=cfg.select_prompts, n_benign=cfg.select_prompts,
                        top_k=cfg.top_k, seed=cfg.seed, placement=cfg.placement)
    selected, select_s, fresh = adapter_stage(
        "select", out / "selected", {"select": settings(scfg), "adapter": adapter.card.get("bench")},
        lambda: select_layers(adapter, scfg))
    if fresh:
        plot_layer_scores(selected, out / "layer_scores.png")
    family = {
        "format": FAMILY_FORMAT,
        "aligned": portable_ref(cfg.aligned),
        "fingerprint": selected.fingerprint.to_dict() if selected.fingerprint else None,
        "selected_layers": selected.layers,
        "layer_scores": (selected.card.get("selection") or {}).get("scores"),
        "inputs": {"aligned": aligned, "degraded": d_digest},
        "degrade_data": d_card.get("data"),
        "config": to_dict(cfg),
        "timings": {"degrade_s": d_card["training"]["seconds"], "extract_s": extract_s, "select_s": select_s,
                    "total_s": round(time.perf_counter() - t0, 1)},
        "versions": library_versions(),
    }
    write_json(out / FAMILY_FILE, family)
    return family


def hub_id(ref: str | None) -> str | None:
    """The Hugging Face hub id of a model reference, where it has one: an embedded model's source repository, or
    the reference itself when it names no local path."""
    from .models.registry import EMBEDDED_MODELS

    if not ref:
        return None
    if ref in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[ref].source.split(",")[0].strip()
    return None if Path(ref).expanduser().exists() or ref.startswith((".", "/", "~")) else ref


def load_family(folder: str | Path) -> tuple[SafetyAdapter, dict[str, Any]]:
    """(the family's selected adapter, its family.json), after checking the folder is whole and of this version."""
    p = Path(folder)
    fix = f"rebuild it with `safegene family build --aligned <A> -o {p}`"
    if not (p / FAMILY_FILE).is_file():
        raise SafegeneError(f"{p} is not a family folder (no {FAMILY_FILE}); build one with "
                            f"`safegene family build --aligned <A> -o {p}`")
    try:
        family = json.loads((p / FAMILY_FILE).read_text())
    except (OSError, ValueError) as e:
        raise SafegeneError(f"{p / FAMILY_FILE} is unreadable ({e}); {fix}") from None
    if not isinstance(family, dict) or family.get("format") != FAMILY_FORMAT:
        found = family.get("format") if isinstance(family, dict) else None
        raise SafegeneError(f"{p} is a family folder of format {found}, this safegene reads format {FAMILY_FORMAT}; "
                            f"{fix}")
    missing = [f for f in FAMILY_FILES if not (p / f).is_file()]
    if missing:
        raise SafegeneError(f"family folder {p} is incomplete: {', '.join(missing)} missing; {fix}")
    return SafetyAdapter.load(p / "selected"), family


def _check_task_model(model_ref: str, family: dict[str, Any]) -> None:
    """Before loading T (minutes for a large model): a model folder must be of the family's structure, and a PEFT
    adapter folder must sit on the family's aligned model itself: same structure, same reference tensors (a
    same-shape model of another lineage would load, and the adapter would not transfer)."""
    from .models.fingerprint import FamilyFingerprint, fingerprint_folder
    from .models.loading import adapter_base

    if not family.get("fingerprint"):
        return
    ours = FamilyFingerprint.from_dict(family["fingerprint"])
    reference = f"the family's aligned model {family.get('aligned')}"
    folder = Path(resolve_model_path(model_ref))
    if not folder.is_dir():
        return  # a hub id: checked after loading (adapter.check_model), as nothing is local to read before
    if not (folder / "adapter_config.json").is_file():
        ours.check_compatible(fingerprint_folder(folder), what=f"task model {model_ref}", reference=reference)
        return
    base = adapter_base(folder)
    theirs = fingerprint_folder(base)
    what = f"the base of the PEFT adapter {folder} ({base})"
    ours.check_compatible(theirs, what=what, reference=reference)
    drift = {n: d for n, d in ours.lineage_drift(theirs).items() if d > 1e-3}
    if drift:
        name, d = max(drift.items(), key=lambda kv: kv[1])
        raise FamilyMismatchError(f"{what} is not the family's aligned model {family.get('aligned')} ({name} differs "
                                  f"by {d:.1%}); protect a model fine-tuned from that model, or build a family for "
                                  "this base")


# --- measuring ----------------------------------------------------------------------------------------------------


@dataclass
class CheckConfig:
    """What the before/after measurement reads: held-out harmful prompts, benign-but-sensitive prompts, judges."""

    harmful: str = opt("advbench", "held-out harmful prompts (disjoint from every shot set)")
    n_harmful: int = opt(64, "harmful prompts")
    over_refusal: str = opt("auto", "benign-but-sensitive prompts; auto: shared:xstest-safe when present, else "
                            "benign-sensitive")
    n_over_refusal: int = opt(32, "benign-but-sensitive prompts")
    judges: list[str] = opt(["refusal-phrase", "content-classifier"], "judges of harmful answers")
    max_new_tokens: int = opt(64, "tokens generated per answer")
    batch_size: int = opt(16, "prompts per generation batch")
    seed: int = opt(0, "seed of every sample")

    def __post_init__(self) -> None:
        check(self.n_harmful >= 1 and self.n_over_refusal >= 0, "n_harmful >= 1 and n_over_refusal >= 0")
        check(bool(self.judges), "judges must name at least one judge")
        check(self.max_new_tokens >= 1 and self.batch_size >= 1, "max_new_tokens and batch_size must be >= 1")


@dataclass
class _Checker:
    """The prompts, judges and decoding one before/after comparison shares."""

    sets: Any
    judges: list[Any]
    gen: GenerationConfig
    responses: Path

    @classmethod
    def build(cls, cfg: CheckConfig, responses: Path, placement: PlacementConfig | None = None) -> "_Checker":
        """`placement`: where an llm:<model> judge runs (the command's, where the measured model runs)."""
        from .evaluation.harness import EvalSets, over_refusal_prompts
        from .evaluation.judges import get_judge

        over, source = over_refusal_prompts(cfg.over_refusal, cfg.n_over_refusal, cfg.seed)
        sets = EvalSets(harmful=harmful_prompts(cfg.harmful, n=cfg.n_harmful, seed=cfg.seed), over_refusal=over,
                        over_refusal_source=source, n_task=0, seed=cfg.seed)
        gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
        return cls(sets, [get_judge(j, placement) for j in cfg.judges], gen, responses)

    def safety(self, name: str, model: Any, tok: Any, method: str) -> dict[str, Any]:
        from .evaluation.harness import evaluate_model

        row = evaluate_model(name, model, tok, self.sets, self.judges, self.gen, self.responses)
        row.method = method
        return row.to_dict()

    def refusals(self, name: str) -> list[bool] | None:
        """Per benign-but-sensitive prompt, whether row `name` refused it (its stored answers, the phrase judge the
        over-refusal rate uses), for the paired test."""
        from .evaluation.harness import slug
        from .evaluation.judges import RefusalPhraseJudge
        from .generation import read_jsonl_rows

        path = self.responses / f"{slug(name)}.over_refusal.jsonl"
        if not path.is_file():
            return None
        judge = RefusalPhraseJudge()
        return [judge.is_refusal(r["response"]) for r in read_jsonl_rows(path)]

    def eval_info(self, cfg: CheckConfig) -> dict[str, Any]:
        return {"harmful": cfg.harmful, "n_harmful": len(self.sets.harmful),
                "over_refusal": self.sets.over_refusal_source, "n_over_refusal": len(self.sets.over_refusal),
                "max_new_tokens": cfg.max_new_tokens}


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().casefold()).strip(" .!,;:")


def matches_answer(response: str, answer: str) -> bool:
    """The response is the reference answer, or opens with it as a whole word ("Positive." for "positive")."""
    r, a = _normalise(response), _normalise(answer)
    return r == a or (r.startswith(a) and not r[len(a):len(a) + 1].isalnum())


def response_loglik(model: Any, tok: Any, examples: Sequence[TaskExample], max_length: int = 256) -> float:
    """Mean per-token log-probability of the data's reference responses (teacher-forced), over all check items."""
    from .data.records import PromptResponse
    from .objectives import encode_batch, sequence_logprob

    pairs = [PromptResponse(e.prompt, e.meta.get("response", e.answer), system=e.system) for e in examples]
    total, tokens = 0.0, 0
    for i in range(0, len(pairs), 8):
        batch = encode_batch(tok, pairs[i:i + 8], max_length)
        total += float(sequence_logprob(model, batch).sum())
        tokens += int(batch.target_mask.sum())
    return total / max(tokens, 1)


def task_answers(model: Any, tok: Any, examples: Sequence[TaskExample], gen: GenerationConfig) -> list[str]:
    return generate(model, tok, [e.chat() for e in examples], gen, desc="task check")


def paired_tests(before: dict[str, Any], after: dict[str, Any], util: dict[str, Any] | None,
                 refusals: tuple[list[bool] | None, list[bool] | None] = (None, None)) -> dict[str, Any]:
    """Exact McNemar tests of the before/after changes on the same items: harmful verdicts per judge, refusals of
    benign-but-sensitive prompts, and task correctness where the data has answers."""
    from .evaluation.metrics import mcnemar_exact
    from .evaluation.significance import verdict_bits as bits

    out = {f"harmful, {j}": mcnemar_exact(bits(before["verdicts"][j]), bits(after["verdicts"][j]))
           for j in before["verdicts"] if j in after["verdicts"]}
    if refusals[0] is not None and refusals[1] is not None:
        out["over-refusal"] = mcnemar_exact(*refusals)
    if util and util.get("correct_before") is not None:
        out["utility"] = mcnemar_exact(util["correct_before"], util["correct_after"])
    return out


def utility_summary(examples: Sequence[TaskExample], before: list[str] | None, after: list[str],
                    loglik_before: float | None, loglik_after: float) -> dict[str, Any]:
    """Task utility on the held-out check items: exact-match accuracy where the data has answers; otherwise how
    often the protected model answers what T answered (T agrees with itself: 1.0 before)."""
    from .evaluation.metrics import Rate

    has_answer = all(e.meta.get("has_answer") for e in examples)
    if has_answer:
        correct = lambda answers: [matches_answer(r, e.answer) for r, e in zip(answers, examples)]  # noqa: E731
        right_before = correct(before) if before is not None else None
        right_after = correct(after)
        b = Rate(sum(right_before), len(examples)).to_dict() if right_before is not None else None
        a = Rate(sum(right_after), len(examples)).to_dict()
        drop = None if b is None else round(b["rate"] - a["rate"], 4)
        kind = "exact-match"
    else:
        b, right_before, right_after = None, None, None
        a = Rate(sum(_normalise(x) == _normalise(y) for x, y in zip(before or [], after)), len(after)).to_dict() \
            if before is not None else None
        drop = None if a is None else round(1 - a["rate"], 4)
        kind = "agreement"
    return {"kind": kind, "n": len(examples), "before": b, "after": a, "drop": drop,
            "loglik_before": None if loglik_before is None else round(loglik_before, 4),
            "loglik_after": round(loglik_after, 4),
            "loglik_change": None if loglik_before is None else round(loglik_after - loglik_before, 4),
            "correct_before": right_before, "correct_after": right_after,
            "samples": [{"prompt": e.prompt[-160:], "reference": e.meta.get("response", e.answer)[:160],
                         "before": (before or [None] * len(after))[i], "after": after[i]}
                        for i, e in enumerate(examples[:3])]}


# --- limits (--fail-if) ---------------------------------------------------------------------------------------------

#: metrics a limit may name, read from a results dict (the first judge's harmful rate is `harmful`)
LIMIT_METRICS = ("harmful", "over_refusal", "utility_drop", "loglik_drop", "harmful_before")


def parse_limits(spec: str | None) -> list[tuple[str, str, float]]:
    """'harmful>0.10,over_refusal>0.30' -> [(metric, op, limit)]; a metric may be `harmful:<judge>`."""
    if not spec:
        return []
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        m = re.fullmatch(r"([a-z_]+(?::[^<>=]+)?)\s*(>=|<=|>|<)\s*([0-9.eE+-]+)", part)
        metric = m.group(1).split(":")[0] if m else None
        if not m or metric not in LIMIT_METRICS:
            raise ConfigError(f"--fail-if: cannot read '{part}'; write METRIC>VALUE with METRIC one of "
                              f"{', '.join(LIMIT_METRICS)} (harmful:<judge> for a given judge), e.g. "
                              "harmful>0.10,over_refusal>0.30,utility_drop>0.02")
        try:
            out.append((m.group(1), m.group(2), float(m.group(3))))
        except ValueError:
            raise ConfigError(f"--fail-if: '{m.group(3)}' in '{part}' is not a number") from None
    return out


def _check_limit_judges(spec: str | None, judges: Sequence[str]) -> None:
    for metric, _, _ in parse_limits(spec):
        judge = metric.partition(":")[2]
        check(not judge or judge in judges, f"--fail-if names judge '{judge}', which this run does not use; "
              f"judges: {', '.join(judges)}")


def _metric(results: dict[str, Any], name: str) -> float | None:
    rows = results["rows"]
    after, before = rows[-1], rows[0]
    metric, _, judge = name.partition(":")
    judge = judge or results["judges"][0]
    if metric in ("harmful", "harmful_before"):
        row = after if metric == "harmful" else before
        if judge not in row["harmful"]:
            raise ConfigError(f"--fail-if: no judge '{judge}' in this run; judges: {', '.join(row['harmful'])}")
        return row["harmful"][judge]["overall"]["rate"]
    if metric == "over_refusal":
        return (after.get("over_refusal") or {}).get("rate")
    u = results.get("utility") or {}
    if metric == "utility_drop":
        return u.get("drop")
    if metric == "loglik_drop":
        return None if u.get("loglik_change") is None else -u["loglik_change"]
    return None


def check_limits(results: dict[str, Any], spec: str | None) -> dict[str, Any] | None:
    limits = parse_limits(spec)
    if not limits:
        return None
    ops = {">": float.__gt__, ">=": float.__ge__, "<": float.__lt__, "<=": float.__le__}
    checked, failed = [], []
    for metric, op, limit in limits:
        value = _metric(results, metric)
        # a figure the run could not measure fails its limit: a release gate must not pass on a missing number
        bad = value is None or ops[op](float(value), limit)
        checked.append({"metric": metric, "op": op, "limit": limit, "value": value, "failed": bad})
        if bad:
            failed.append(f"{metric}{op}{limit:g} ({'not measured' if value is None else f'{value:.3f}'})")
    return {"spec": spec, "checked": checked, "failed": failed}


# --- protect ------------------------------------------------------------------------------------------------------


@dataclass
class ProtectConfig(CheckConfig):
    """After every fine-tune: recalibrate the family's safety adapter on your task model T with a few of your own
    task rows, measure T before and after on the same prompts, and write the adapter, a report and a model card."""

    model: str | None = opt(None, "task model T: merged HF folder, PEFT adapter folder on the family's A, or an "
                            "embedded/hub name")
    family: str | None = opt(None, "family folder from `safegene family build`")
    task_data: str | None = opt(None, "your task data: JSONL/JSON/CSV rows of prompt + response (or a chat "
                                "`messages` list), optional `answer`; or hf:NAME[:SPLIT]")
    output: str | None = opt(None, "output folder (written whole, or not at all)", aliases=("-o",))
    merge: bool = opt(False, "also write the merged model to OUT/model (a merged T is streamed tensor by tensor into "
                      "shards; a PEFT T is merged in memory first)")
    attach_only: bool = opt(False, "write the adapter and the report only (no merged model; refuses --merge)")
    n_shots: int = opt(32, "task rows used as recalibration shots (at most half of the rows)")
    n_check: int = opt(64, "held-out task rows for the utility check")
    harmful_shots: str = opt("harmful-pairs", "harmful prompts of the recalibration shots (disjoint from `harmful`)")
    n_harmful_shots: int = opt(32, "harmful recalibration shots")
    recal_steps: int = opt(20, "recalibration optimizer steps")
    sensitive: str | None = opt(None, "benign-but-sensitive prompts whose answers recalibration keeps (T's own), "
                                "against over-refusal: sensitive-shots (built in) or a prompt file; never an "
                                "over-refusal evaluation set")
    n_sensitive: int = opt(32, "benign-but-sensitive shots (with --sensitive)")
    fail_if: str | None = opt(None, "limits that fail the run with exit status 3, e.g. "
                              "harmful>0.10,over_refusal>0.30,utility_drop>0.02 (harmful: the first judge's rate "
                              "after, harmful:<judge> another's; utility_drop: exact-match accuracy lost where the "
                              "data has answers, else the share of check answers that changed at all)")
    placement: PlacementConfig = opt(PlacementConfig(), "where T runs and in what dtype (--device, --dtype, "
                                     "--device-map for a T larger than one device)", added_later=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(not (self.merge and self.attach_only), "--merge and --attach-only contradict each other; pick one")
        check(self.n_shots >= 4 and self.n_check >= 4, "n_shots and n_check must be >= 4")
        _check_limit_judges(self.fail_if, self.judges)


def _command_line(argv: Sequence[str] | None, cfg: Any, name: str) -> str:
    """The command that reproduces the run: the one given, else the config's non-default fields as flags."""
    import shlex

    if argv is not None:
        return "safegene " + shlex.join(argv)
    default = type(cfg)()
    flags = [f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in to_dict(cfg).items()
             if v != to_dict(default).get(k) and not isinstance(v, (dict, list))]
    return f"safegene {name} " + " ".join(flags)


def _check_disjoint(checked: str, n: int, shots: str, n_shots: int, seed: int) -> None:
    """The held-out harmful prompts must not be among the recalibration shots (or the measurement flatters)."""
    from .data import harmful_prompt_texts

    overlap = {p.prompt for p in harmful_prompts(checked, n=n, seed=seed)} & set(
        harmful_prompt_texts(shots, n_shots, seed))
    check(not overlap, f"{len(overlap)} of the checked harmful prompts ({checked}) are also recalibration shots "
          f"({shots}); check on a set the shots do not come from (e.g. --harmful advbench)")


def protect(cfg: ProtectConfig, overwrite: bool = False, progress: bool = True,
            argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Protect one task model; returns the results (also in OUT/results.json). Raises before writing anything when
    an input is wrong."""
    from .data import load_task_data, split_task_data, write_shots_jsonl
    from .evaluation.protect_report import write_protect_outputs

    missing = [f"--{n.replace('_', '-')}" for n in ("model", "family", "task_data", "output") if not getattr(cfg, n)]
    if missing:
        raise ConfigError(f"protect needs {', '.join(missing)}: safegene protect --model T --family FAMILY_DIR "
                          "--task-data my.jsonl -o OUT")
    t0 = time.perf_counter()
    out = check_output_path(cfg.output, inputs=[cfg.model, cfg.family, cfg.task_data], overwrite=overwrite)
    if cfg.merge and not Path(resolve_model_path(cfg.model)).is_dir():
        raise ConfigError(f"--merge needs the task model as a local folder, and {cfg.model} is not one; download it "
                          "first, or leave out --merge (the adapter folder applies to it as it is)")
    _check_disjoint(cfg.harmful, cfg.n_harmful, cfg.harmful_shots, cfg.n_harmful_shots, cfg.seed)
    adapter, family = load_family(cfg.family)
    examples = load_task_data(cfg.task_data)
    shots, held_out = split_task_data(examples, cfg.n_shots, cfg.n_check, cfg.seed)
    _check_task_model(cfg.model, family)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    model, tok = load_model(cfg.model, cfg.placement), load_tokenizer(cfg.model)
    adapter.check_model(model, what=f"task model {cfg.model}")
    timings["load_s"] = round(time.perf_counter() - t, 1)

    with atomic_dir(out, overwrite=overwrite) as tmp:
        checker = _Checker.build(cfg, tmp / "responses", cfg.placement)
        t = time.perf_counter()
        before = checker.safety("T", model, tok, "undefended")
        answers_before = task_answers(model, tok, held_out, checker.gen)
        loglik_before = response_loglik(model, tok, held_out)
        timings["eval_before_s"] = round(time.perf_counter() - t, 1)

        shots_file = tmp / "shots.jsonl"
        write_shots_jsonl(shots, shots_file)
        rcfg = RecalibrateConfig(task_model=cfg.model, harmful=cfg.harmful_shots, task=str(shots_file),
                                 n_harmful=cfg.n_harmful_shots, n_task=len(shots), steps=cfg.recal_steps,
                                 sensitive=cfg.sensitive, n_sensitive=cfg.n_sensitive, seed=cfg.seed,
                                 placement=cfg.placement)
        t = time.perf_counter()
        calibrated = recalibrate(adapter, rcfg, model=model, tokenizer=tok, progress=progress)
        timings["recalibrate_s"] = round(time.perf_counter() - t, 1)
        final = Path(out)
        # the card records where the shots stay, not the temporary folder they were read from
        calibrated.card["recalibration"]["config"]["task"] = str(final / "shots.jsonl")
        calibrated.card["protect"] = {"family": str(cfg.family), "task_data": str(cfg.task_data),
                                      "n_shots": len(shots)}
        # the calibrated adapter belongs on T, not on the family's A: that is what PEFT tools should load it onto
        calibrated.card["base_model"] = resolve_model_path(cfg.model)
        calibrated.save(tmp / "adapter")

        t = time.perf_counter()
        with calibrated.attach(model, check=False):
            after = checker.safety("T + SafeGene", model, tok, "safegene")
            answers_after = task_answers(model, tok, held_out, checker.gen)
            loglik_after = response_loglik(model, tok, held_out)
        timings["eval_after_s"] = round(time.perf_counter() - t, 1)
        if cfg.merge:
            t = time.perf_counter()
            merge_to_folder(calibrated, cfg.model, tmp / "model", progress=progress, placement=cfg.placement)
            timings["merge_s"] = round(time.perf_counter() - t, 1)
        timings["total_s"] = round(time.perf_counter() - t0, 1)

        results: dict[str, Any] = {
            "kind": "protect", "model": str(cfg.model), "adapter": str(final / "adapter"),
            "merged": str(final / "model") if cfg.merge else None, "family": str(cfg.family),
            "base_model": family.get("aligned"), "base_model_hub": hub_id(family.get("aligned")),
            "judges": [j.name for j in checker.judges],
            "eval": checker.eval_info(cfg),
            "split": {"data": str(cfg.task_data), "n_rows": len(examples), "n_shots": len(shots),
                      "n_check": len(held_out), "seed": cfg.seed},
            "rows": [before, after],
            "utility": utility_summary(held_out, answers_before, answers_after, loglik_before, loglik_after),
            "layers": calibrated.layers,
            "coefficients": {str(layer): round(calibrated.coefficients[layer], 4) for layer in calibrated.layers},
            "timings": timings, "config": to_dict(cfg),
            "inputs": {"model": input_digest(resolve_model_path(cfg.model)),
                       # what protect read of the family: its selected adapter (D and the rest are not inputs)
                       "family": input_digest(Path(cfg.family) / "selected"),
                       "task_data": input_digest(cfg.task_data)},
            "command": _command_line(argv, cfg, "protect"), "versions": library_versions(),
        }
        results["paired"] = paired_tests(before, after, results["utility"],
                                         (checker.refusals("T"), checker.refusals("T + SafeGene")))
        results["limits"] = check_limits(results, cfg.fail_if)
        write_protect_outputs(results, tmp)
    return results


# --- eval ---------------------------------------------------------------------------------------------------------


@dataclass
class EvalConfig(CheckConfig):
    """The same measurement as `protect`, for any model: alone, and with an adapter when one is given."""

    model: str | None = opt(None, "model to evaluate: HF folder, PEFT adapter folder, embedded or hub name")
    adapter: str | None = opt(None, "a safety adapter folder to evaluate the model with (a second row)")
    task_data: str | None = opt(None, "optional task data (as for protect): utility on up to n_check rows")
    n_check: int = opt(64, "task rows for the utility check")
    output: str | None = opt(None, "output folder (written whole, or not at all)", aliases=("-o",))
    fail_if: str | None = opt(None, "limits that fail the run with exit status 3 (read on the last row)")
    placement: PlacementConfig = opt(PlacementConfig(), "where the model runs and in what dtype (--device, --dtype, "
                                     "--device-map for a model larger than one device)", added_later=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_limit_judges(self.fail_if, self.judges)


def evaluate(cfg: EvalConfig, overwrite: bool = False, progress: bool = True,
             argv: Sequence[str] | None = None) -> dict[str, Any]:
    from .data import load_task_data
    from .evaluation.protect_report import write_protect_outputs

    if not cfg.model or not cfg.output:
        raise ConfigError("eval needs --model and -o OUT: safegene eval --model M [--adapter A] -o OUT")
    t0 = time.perf_counter()
    out = check_output_path(cfg.output, inputs=[cfg.model, cfg.adapter, cfg.task_data], overwrite=overwrite)
    adapter = SafetyAdapter.load(cfg.adapter) if cfg.adapter else None
    from .data.resolve import sample

    rows = load_task_data(cfg.task_data) if cfg.task_data else []
    examples = sample(rows, cfg.n_check, cfg.seed)
    model, tok = load_model(cfg.model, cfg.placement), load_tokenizer(cfg.model)
    if adapter is not None:
        adapter.check_model(model, what=f"model {cfg.model}")
    timings = {"load_s": round(time.perf_counter() - t0, 1)}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        checker = _Checker.build(cfg, tmp / "responses", cfg.placement)
        t = time.perf_counter()
        rows = [checker.safety("model", model, tok, "undefended")]
        answers = task_answers(model, tok, examples, checker.gen) if examples else None
        loglik = response_loglik(model, tok, examples) if examples else None
        timings["eval_s"] = round(time.perf_counter() - t, 1)
        utility = None
        if adapter is not None:
            t = time.perf_counter()
            with adapter.attach(model, check=False):
                rows.append(checker.safety("model + adapter", model, tok, "safegene"))
                if examples:
                    utility = utility_summary(examples, answers, task_answers(model, tok, examples, checker.gen),
                                              loglik, response_loglik(model, tok, examples))
            timings["eval_adapter_s"] = round(time.perf_counter() - t, 1)
        elif examples:
            utility = utility_summary(examples, None, answers or [], None, loglik or 0.0)
        timings["total_s"] = round(time.perf_counter() - t0, 1)
        results: dict[str, Any] = {
            "kind": "eval", "model": str(cfg.model), "adapter": str(cfg.adapter) if cfg.adapter else None,
            "merged": None, "family": None, "base_model": None, "judges": [j.name for j in checker.judges],
            "eval": checker.eval_info(cfg), "split": None if not examples else {
                "data": str(cfg.task_data), "n_rows": len(rows), "n_shots": 0, "n_check": len(examples),
                "seed": cfg.seed},
            "rows": rows, "utility": utility,
            "layers": adapter.layers if adapter else [],
            "coefficients": {str(layer): round(adapter.coefficients[layer], 4) for layer in adapter.layers}
            if adapter else {},
            "timings": timings, "config": to_dict(cfg),
            "inputs": {k: input_digest(v) for k, v in (("model", resolve_model_path(cfg.model)),
                                                       ("adapter", cfg.adapter), ("task_data", cfg.task_data)) if v},
            "command": _command_line(argv, cfg, "eval"), "versions": library_versions(),
        }
        if len(rows) == 2:
            results["paired"] = paired_tests(rows[0], rows[1], utility,
                                             (checker.refusals("model"), checker.refusals("model + adapter")))
        results["limits"] = check_limits(results, cfg.fail_if)
        write_protect_outputs(results, tmp)
    return results
