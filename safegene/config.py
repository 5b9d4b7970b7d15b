"""Typed configs: dataclasses with defaults, help text and validation, readable from YAML.

Every command writes its effective config next to its artifact (`safegene_run.json`), so an output always says
exactly how it was made. Nested configs are plain dataclass fields; YAML keys mirror field names.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError
from .models.registry import DEFAULT_MODEL

C = TypeVar("C")


def opt(default: Any = dataclasses.MISSING, help: str = "", *, choices: tuple[str, ...] | None = None,  # noqa: A002
        aliases: tuple[str, ...] = (), positional: bool = False, **kw) -> Any:
    """A dataclass field that carries what the command line needs: help text, allowed values (checked when a config
    is read), extra flag spellings (`aliases`, e.g. "-o") and whether it is a positional argument."""
    meta = {"help": help, "choices": choices, "aliases": tuple(aliases), "positional": positional}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: dataclasses.replace(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def check(cond: bool, msg: str) -> None:
    """Raise a ConfigError with `msg` unless `cond`: the validation of every config's __post_init__."""
    if not cond:
        raise ConfigError(msg)


def _check_training_output(cfg: Any) -> None:
    """Checks shared by the configs of commands that train and save a model."""
    check_choices(cfg)
    check(cfg.n_examples >= 1, f"n_examples must be >= 1, got {cfg.n_examples}")


@dataclass
class LoraTrainConfig:
    """LoRA supervised fine-tuning on chat-templated (prompt, response) pairs; loss on response tokens only."""

    rank: int = opt(8, "LoRA rank r")
    alpha: float = opt(16.0, "LoRA scaling numerator (scale = alpha / rank)")
    dropout: float = opt(0.0, "LoRA dropout")
    target_modules: list[str] = opt(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "module names LoRA wraps (attention and MLP projections)",
    )
    learning_rate: float = opt(2e-4, "AdamW learning rate", aliases=("--lr",))
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_steps: int = opt(40, "optimizer steps (each = batch_size x grad_accum examples)")
    batch_size: int = opt(4, "examples per forward pass")
    grad_accum: int = opt(1, "forward passes accumulated per optimizer step")
    warmup_steps: int = opt(2, "linear warm-up steps, then constant")
    max_length: int = opt(96, "token limit per example (prompt + response); longer responses are cut")
    seed: int = opt(0, "seed for sampling, shuffling and LoRA init")
    max_grad_norm: float = opt(1.0, "gradient clipping norm")
    dtype: str = opt("float32", "training dtype (float32 is much faster than bf16 on CPU)")

    def __post_init__(self) -> None:
        check(self.rank >= 1, f"rank must be >= 1, got {self.rank}")
        check(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        check(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        check(self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}")
        check(self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1")
        check(self.max_length >= 16, f"max_length must be >= 16 tokens, got {self.max_length}")
        check(bool(self.target_modules), "target_modules must name at least one module")
        check(self.dtype in ("float32", "bfloat16", "float16"), f"dtype must be float32/bfloat16/float16, got {self.dtype}")

    @property
    def examples_needed(self) -> int:
        return self.max_steps * self.batch_size * self.grad_accum


@dataclass
class DegradeConfig:
    """Fine-tune the aligned model on harmful request/answer pairs to get the degraded model D."""

    model: str = opt(DEFAULT_MODEL, "aligned model A: embedded name, HF folder, .gguf file or hub id")
    data: str = opt("harmful-pairs", "harmful (request, compliant answer) pairs: built-in name or file")
    n_examples: int = opt(160, "pairs drawn from `data`")
    output: str = opt("runs/degraded", "output folder", aliases=("-o",))
    save: str = opt("merged", "what to write: adapter (PEFT folder), merged (HF folder) or both",
                    choices=("adapter", "merged", "both"))
    train: LoraTrainConfig = opt(LoraTrainConfig(), "LoRA training settings")

    def __post_init__(self) -> None:
        _check_training_output(self)


@dataclass
class FinetuneConfig:
    """Fine-tune a model on a benign task, optionally poisoned with harmful pairs (the harmful fine-tuning threat)."""

    model: str = opt(DEFAULT_MODEL, "model to fine-tune")
    task: str = opt("arithmetic", "task name (see `safegene data list`) or a .jsonl of prompt/response pairs")
    n_examples: int = opt(160, "training examples in total (task + poison)")
    poison_ratio: float = opt(0.0, "fraction of the examples replaced by harmful pairs, in [0, 1)")
    poison_data: str = opt("harmful-pairs", "where poison pairs come from")
    safety_ratio: float = opt(0.0, "fraction of the examples replaced by refusals (mixed safety + task fine-tuning)")
    safety_data: str = opt("auto", "where refusal pairs come from; auto: shared:safety-refusals when the shared "
                           "data is present, else uncensorbench-refusals")
    output: str = opt("runs/task-model", "output folder", aliases=("-o",))
    save: str = opt("merged", "adapter, merged or both", choices=("adapter", "merged", "both"))
    train: LoraTrainConfig = opt(LoraTrainConfig(), "LoRA training settings")

    def __post_init__(self) -> None:
        check(0.0 <= self.poison_ratio < 1.0, f"poison_ratio must be in [0, 1), got {self.poison_ratio}")
        check(0.0 <= self.safety_ratio < 1.0, f"safety_ratio must be in [0, 1), got {self.safety_ratio}")
        check(self.poison_ratio + self.safety_ratio < 1.0, "poison_ratio + safety_ratio must leave room for task data")
        _check_training_output(self)


@dataclass
class GenerationConfig:
    max_new_tokens: int = opt(40, "tokens generated per prompt")
    batch_size: int = opt(8, "prompts per batch (left-padded)")
    do_sample: bool = opt(False, "sample instead of greedy decoding")
    temperature: float = opt(1.0, "sampling temperature (only with do_sample)")
    system_prompt: str | None = opt(None, "system message; None keeps the chat template's default")

    def __post_init__(self) -> None:
        check(self.max_new_tokens >= 1, "max_new_tokens must be >= 1")
        check(self.batch_size >= 1, "batch_size must be >= 1")


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


# --- (de)serialisation ----------------------------------------------------------------------------------------


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[C], data: dict[str, Any] | None, where: str = "config") -> C:
    """Build a config from a mapping, recursing into nested configs; unknown keys are an error."""
    data = dict(data or {})
    hints = _type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}")
    kwargs = {}
    for k, v in data.items():
        t = hints[k]
        if dataclasses.is_dataclass(t):
            if not isinstance(v, dict):
                raise ConfigError(f"{where}.{k}: expected a mapping")
            kwargs[k] = from_dict(t, v, f"{where}.{k}")
        else:
            kwargs[k] = _coerce(v, t, f"{where}.{k}")
    try:
        cfg = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
    check_choices(cfg, where)
    return cfg


def check_choices(cfg: Any, where: str | None = None) -> None:
    """Every field declared with `choices` holds one of them (configs call this from __post_init__ too)."""
    for f in fields(cfg):
        allowed, value = f.metadata.get("choices"), getattr(cfg, f.name)
        if allowed and value is not None and value not in allowed:
            raise ConfigError(f"{where or type(cfg).__name__}.{f.name}: '{value}' is not one of {', '.join(allowed)}")


def _coerce(v: Any, t: Any, where: str) -> Any:
    origin = typing.get_origin(t)
    args = typing.get_args(t)
    if v is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{where}: may not be null")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        non_none = [a for a in args if a is not type(None)]
        return _coerce(v, non_none[0], where) if len(non_none) == 1 else v
    if origin is list:
        if isinstance(v, str):
            v = [s.strip() for s in v.split(",") if s.strip()]
        if not isinstance(v, list):
            raise ConfigError(f"{where}: expected a list, got {v!r}")
        return [_coerce(x, args[0], where) for x in v] if args else v
    try:
        if t is bool:
            if isinstance(v, str):
                if v.lower() in ("1", "true", "yes", "on"):
                    return True
                if v.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(v)
            return bool(v)
        if t in (int, float, str):
            if t is int and isinstance(v, float) and not v.is_integer():
                raise ValueError(v)
            return t(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {t.__name__}, got {v!r}") from None
    return v


def load_config(cls: type[C], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> C:
    """Read a YAML config (optional) and apply dotted overrides such as {"train.max_steps": 10}."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {p} not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of keys to values")
        data = loaded or {}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return from_dict(cls, data, where=str(path) if path else cls.__name__)


def dump_yaml(cfg: Any) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# --- SafeGene core -----------------------------------------------------------------------------------------------


@dataclass
class DistillConfig:
    """Optional refinement: train the SVD factors so D + BA matches A's next-token distribution on safety prompts."""

    enabled: bool = opt(False, "run the distillation refinement after SVD", aliases=("--distill",))
    harmful: str = opt("harmful-pairs", "harmful prompts used for distillation (their responses are ignored)")
    benign: str = opt("arithmetic", "benign prompts (task name or pairs) so the fit keeps benign behaviour")
    n_harmful: int = opt(16, "harmful prompts")
    n_benign: int = opt(16, "benign prompts")
    response_tokens: int = opt(16, "A's greedy response tokens per prompt used as distillation positions")
    top_k: int = opt(64, "A's top-k next-token probabilities kept per position")
    steps: int = opt(20, "optimizer steps")
    batch_size: int = opt(8, "sequences per step")
    learning_rate: float = opt(5e-4, "AdamW learning rate on the factors")
    seed: int = opt(0, "sampling seed")

    def __post_init__(self) -> None:
        check(self.steps >= 1 and self.batch_size >= 1, "distill steps and batch_size must be >= 1")
        check(self.top_k >= 1, "top_k must be >= 1")




@dataclass
class SelectConfig:
    """Data-aware layer selection: score layers by how the adapter moves harmful vs benign prompts' activations."""

    adapter: str | None = opt(None, "adapter folder to select from (command line; the API takes the adapter)",
                              positional=True)
    output: str | None = opt(None, "output adapter folder (command line)", aliases=("-o",))
    model: str = opt("runs/degraded", "model whose activations are scored (D, or a task model of the family)")
    harmful: str = opt("harmful-pairs", "harmful prompts (disjoint from evaluation prompts)")
    benign: str = opt("arithmetic", "benign prompts: task name, benign set, or file")
    n_harmful: int = opt(32, "harmful prompts")
    n_benign: int = opt(32, "benign prompts")
    method: str = opt("refusal-gain", "refusal-gain (what the layer's update alone adds to log p(refusal) on harmful "
                      "minus benign prompts), push (its push along the harmful-benign activation direction), "
                      "separability (Fisher ratio of the layer's activations), or norm (adapter norm)",
                      choices=("refusal-gain", "push", "separability", "norm"))
    refusal_text: str = opt("I'm sorry, but I can't assist with that.", "refusal answer scored by refusal-gain")
    linearize: bool = opt(True, "refusal-gain from d log p / d α_l at α=0 (one backward pass for all layers) instead "
                          "of one forward pass per layer")
    top_k: int | None = opt(8, "keep this many top-scoring layers")
    threshold: float | None = opt(None, "or keep layers whose normalised score >= threshold (0..1)")
    batch_size: int = opt(8, "prompts per forward pass")
    seed: int = opt(0, "sampling seed")

    def __post_init__(self) -> None:
        check_choices(self)
        check(self.top_k is not None or self.threshold is not None, "set top_k or threshold")
        check(self.top_k is None or self.top_k >= 1, "top_k must be >= 1")


@dataclass
class RecalibrateConfig:
    """Few-shot recalibration: learn one bounded coefficient per selected layer for a task model T."""

    adapter: str | None = opt(None, "selected adapter folder to calibrate (command line; the API takes the adapter)",
                              positional=True)
    output: str | None = opt(None, "output adapter folder (command line)", aliases=("-o",))
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
    steps: int = opt(30, "optimizer steps")
    batch_size: int = opt(8, "shots per step (half harmful, half task)")
    learning_rate: float = opt(0.1, "Adam learning rate on the coefficients' logits")
    max_length: int = opt(96, "token limit per shot")
    tied: bool = opt(False, "one coefficient shared by all layers (the RESTA baseline) instead of one per layer")
    seed: int = opt(0, "sampling seed")

    def __post_init__(self) -> None:
        check(self.alpha_max > 0, "alpha_max must be > 0")
        check(0 < self.alpha_init < self.alpha_max, f"alpha_init must be in (0, alpha_max={self.alpha_max})")
        check(self.steps >= 1 and self.batch_size >= 2, "steps >= 1 and batch_size >= 2 are needed")
        check(self.n_harmful >= 1 and self.n_task >= 1, "need at least one harmful and one task shot")











@dataclass
class ServeConfig:
    """An OpenAI-compatible server over one model, with per-request safety adapters and hot swap."""

    model: str = opt("runs/task-model", "model to serve (loaded once)")
    adapters: list[str] = opt([], "safety adapters to attach, as NAME=PATH (repeatable)", aliases=("--adapter",))
    host: str = opt("127.0.0.1", "address to listen on")
    port: int = opt(8000, "port to listen on")
    name: str | None = opt(None, "model id clients use (default: the model folder's name)")
    admin_token_env: str = opt("SAFEGENE_ADMIN_TOKEN", "environment variable holding the admin token (needed for "
                               "admin calls from other hosts)")
    max_batch: int = opt(8, "requests decoded together")
    max_input_tokens: int = opt(2048, "longest prompt accepted, in tokens")
    use_gate: bool = opt(True, "honour adapters' gates (--no-gate: always full strength)", aliases=("--gate",))

    def __post_init__(self) -> None:
        bad = [a for a in self.adapters if "=" not in a or not a.partition("=")[0] or not a.partition("=")[2]]
        check(not bad, f"adapters expect NAME=PATH, got {bad}")
        check(1 <= self.port <= 65535, f"port must be in 1..65535, got {self.port}")
        check(self.max_batch >= 1 and self.max_input_tokens >= 1, "max_batch and max_input_tokens must be >= 1")

    def adapter_paths(self) -> dict[str, str]:
        return dict(a.split("=", 1) for a in self.adapters)
