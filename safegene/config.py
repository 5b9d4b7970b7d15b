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
