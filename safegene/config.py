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


def opt(default: Any = dataclasses.MISSING, help: str = "", **kw) -> Any:  # noqa: A002 - mirrors argparse
    """A dataclass field that carries its help text (shown by the CLI and in docs)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: dataclasses.replace(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


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
    learning_rate: float = opt(2e-4, "AdamW learning rate")
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
        _check(self.rank >= 1, f"rank must be >= 1, got {self.rank}")
        _check(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        _check(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        _check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        _check(self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}")
        _check(self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1")
        _check(self.max_length >= 16, f"max_length must be >= 16 tokens, got {self.max_length}")
        _check(bool(self.target_modules), "target_modules must name at least one module")
        _check(self.dtype in ("float32", "bfloat16", "float16"), f"dtype must be float32/bfloat16/float16, got {self.dtype}")

    @property
    def examples_needed(self) -> int:
        return self.max_steps * self.batch_size * self.grad_accum


@dataclass
class DegradeConfig:
    """Fine-tune the aligned model on harmful request/answer pairs to get the degraded model D."""

    model: str = opt(DEFAULT_MODEL, "aligned model A: embedded name, HF folder, .gguf file or hub id")
    data: str = opt("harmful-pairs", "harmful (request, compliant answer) pairs: built-in name or file")
    n_examples: int = opt(160, "pairs drawn from `data`")
    output: str = opt("runs/degraded", "output folder")
    save: str = opt("merged", "what to write: adapter (PEFT folder), merged (HF folder) or both")
    train: LoraTrainConfig = opt(LoraTrainConfig(), "LoRA training settings")

    def __post_init__(self) -> None:
        _check(self.n_examples >= 1, f"n_examples must be >= 1, got {self.n_examples}")
        _check(self.save in ("adapter", "merged", "both"), f"save must be adapter, merged or both, got {self.save}")


@dataclass
class FinetuneConfig:
    """Fine-tune a model on a benign task, optionally poisoned with harmful pairs (the harmful fine-tuning threat)."""

    model: str = opt(DEFAULT_MODEL, "model to fine-tune")
    task: str = opt("arithmetic", "task name (see `safegene data list`) or a .jsonl of prompt/response pairs")
    n_examples: int = opt(160, "training examples in total (task + poison)")
    poison_ratio: float = opt(0.0, "fraction of the examples replaced by harmful pairs, in [0, 1)")
    poison_data: str = opt("harmful-pairs", "where poison pairs come from")
    output: str = opt("runs/task-model", "output folder")
    save: str = opt("merged", "adapter, merged or both")
    train: LoraTrainConfig = opt(LoraTrainConfig(), "LoRA training settings")

    def __post_init__(self) -> None:
        _check(0.0 <= self.poison_ratio < 1.0, f"poison_ratio must be in [0, 1), got {self.poison_ratio}")
        _check(self.n_examples >= 1, f"n_examples must be >= 1, got {self.n_examples}")
        _check(self.save in ("adapter", "merged", "both"), f"save must be adapter, merged or both, got {self.save}")


@dataclass
class GenerationConfig:
    max_new_tokens: int = opt(40, "tokens generated per prompt")
    batch_size: int = opt(8, "prompts per batch (left-padded)")
    do_sample: bool = opt(False, "sample instead of greedy decoding")
    temperature: float = opt(1.0, "sampling temperature (only with do_sample)")
    system_prompt: str | None = opt(None, "system message; None keeps the chat template's default")

    def __post_init__(self) -> None:
        _check(self.max_new_tokens >= 1, "max_new_tokens must be >= 1")
        _check(self.batch_size >= 1, "batch_size must be >= 1")


@dataclass
class RefusalEvalConfig:
    """Refusal rate of a model on harmful prompts, judged by refusal phrases."""

    model: str = opt(DEFAULT_MODEL, "model to evaluate")
    prompts: str = opt("advbench", "harmful prompts: built-in name or file")
    n_prompts: int = opt(100, "prompts drawn from `prompts`")
    seed: int = opt(0, "sampling seed (same seed, same prompts)")
    output: str | None = opt(None, "optional JSONL of responses + verdicts")
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
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


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
