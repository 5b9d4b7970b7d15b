"""The config machinery: dataclass fields that carry their help text, allowed values and flag spellings (`opt`),
validation (`check`, `check_choices`), reading from YAML with dotted overrides (`load_config`) and writing back.

The configs themselves live beside the stage each configures, as peft keeps each tuner's config beside the tuner:
`FinetuneConfig` in `safegene.training`, `SelectConfig` in `safegene.selection`, `BenchConfig` in `safegene.bench`,
and so on. Nested configs are plain dataclass fields; YAML keys mirror field names; the command line is generated
from the same fields (`safegene.cli`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import field, fields
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

C = TypeVar("C")


def opt(default: Any = dataclasses.MISSING, help: str = "", *, choices: tuple[str, ...] | None = None,  # noqa: A002
        aliases: tuple[str, ...] = (), positional: bool = False, cli_only: bool = False, added_later: bool = False,
        earlier_value: Any = dataclasses.MISSING, leaf_flag: bool = True, **kw) -> Any:
    """A dataclass field that carries what the command line needs: help text, allowed values (checked when a config
    is read), extra flag spellings (`aliases`, e.g. "-o"), whether it is a positional argument, and whether it only
    says where the command reads or writes (`cli_only`: not a setting of the computation, left out of `settings`),
    and whether it came after stages were first recorded (`added_later`: left out of `settings` while at its
    default, so that stages finished before it existed still match). `earlier_value` is for a field added later
    whose default is *not* what came before (a new default method): stages recorded before it existed ran with
    `earlier_value`, so the field is left out of `settings` at that value instead, and a default config no longer
    matches them. In a nested config that offers short flags
    (`cli_leaf_flags`), `leaf_flag=False` keeps one field to its dotted flag only, where its short name would mean
    something else to the user (`train.dtype` next to the placement's `--dtype`)."""
    meta = {"help": help, "choices": choices, "aliases": tuple(aliases), "positional": positional,
            "cli_only": cli_only, "added_later": added_later or earlier_value is not dataclasses.MISSING,
            "leaf_flag": leaf_flag}
    if earlier_value is not dataclasses.MISSING:
        meta["earlier_value"] = earlier_value
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: dataclasses.replace(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


class _Null:
    """An override that sets a field to None on purpose (`--threshold none`), unlike None, which means "not set"."""

    def __repr__(self) -> str:
        return "NULL"


NULL = _Null()


def check(cond: bool, msg: str) -> None:
    """Raise a ConfigError with `msg` unless `cond`: the validation of every config's __post_init__."""
    if not cond:
        raise ConfigError(msg)


# --- (de)serialisation ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class AdapterInOut:
    """The folders of a command that turns one adapter into another (`select`, `recalibrate`, `gate`). They only say
    where the command line reads and writes: the library functions take the adapter object and return the new one."""

    adapter: str | None = opt(None, "input adapter folder (command line; the API takes the adapter object)",
                              positional=True, cli_only=True)
    output: str | None = opt(None, "output adapter folder (command line)", aliases=("-o",), cli_only=True)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def settings(cfg: Any) -> dict[str, Any]:
    """What a stage's result depends on: the config without its `cli_only` fields (the command's input and output
    folders). Stage keys use it, so that a command-line field does not invalidate a finished stage."""
    fields_ = cfg.__dataclass_fields__
    default = to_dict(type(cfg)())

    def implicit(k: str, v: Any) -> bool:
        """Is `v` what a stage recorded before field `k` existed ran with (so its record lacks `k`)?"""
        meta = fields_[k].metadata
        if "earlier_value" in meta:
            return v == meta["earlier_value"]
        return bool(meta.get("added_later")) and v == default[k]

    return {k: v for k, v in to_dict(cfg).items() if not fields_[k].metadata.get("cli_only") and not implicit(k, v)}


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
    if v is None or (type(None) in args and isinstance(v, str) and v.lower() in ("none", "null")):
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
        if value is None:  # an override left unset (an absent flag) keeps the file's value or the default
            continue
        if value is NULL:  # asked for explicitly: none
            value = None
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return from_dict(cls, data, where=str(path) if path else cls.__name__)


def dump_yaml(cfg: Any) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
