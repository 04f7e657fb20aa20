"""Typed configuration: YAML -> frozen dataclass trees, with type checks and dotted errors.

Every config of the project (model, data, training, evaluation, demo stages) is a frozen
dataclass with an attribute docstring under each field, built on :class:`YamlConfig`::

    cfg = FlamingoConfig.from_yaml("configs/model/tiny.yaml", overrides=["resampler.depth=2"])
    cfg = cfg.replace({"lm.tokenizer": "runs/x/model"}, frozen_dtype="bfloat16")

Unknown keys and badly typed values raise ``ValueError`` naming the dotted key. Configs are
never changed in place: :meth:`YamlConfig.replace` returns a new, re-validated tree.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")
C = TypeVar("C", bound="YamlConfig")


def _check_value(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a type annotation; returns the (possibly converted) value."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(
            errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {args}"
        )
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping for {annotation.__name__}, got {value!r}")
        return from_dict(annotation, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        if (
            origin is tuple
            and len(args) > 1
            and args[1] is not Ellipsis
            and len(value) != len(args)
        ):
            raise ValueError(f"{key}: expected {len(args)} values, got {len(value)}")
        item = args[0] if args else Any
        items = [_check_value(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        item = args[1] if len(args) == 2 else Any
        return {k: _check_value(v, item, f"{key}.{k}") for k, v in value.items()}
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported annotation {annotation!r}")  # a bug in a config class


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested mapping, rejecting unknown keys and bad types."""
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(prefix + k for k in unknown)
        moved = getattr(cls, "MOVED_KEYS", {})
        hint = "".join(f"; {prefix}{k} is now {prefix}{moved[k]}" for k in unknown if k in moved)
        raise ValueError(f"unknown config key(s) {names}; valid keys here: {sorted(fields)}{hint}")
    missing = [
        prefix + name
        for name, f in fields.items()
        if name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"missing config key(s) {', '.join(missing)}")
    kwargs = {name: _check_value(v, hints[name], prefix + name) for name, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(
            f"{prefix}{e}" if prefix and not str(e).startswith(prefix) else str(e)
        ) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """The inverse of :func:`from_dict`: a plain nested dict, YAML/JSON serialisable."""
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like 'section.key=value'")
        dotted, raw = item.split("=", 1)
        keys: list[Any] = dotted.strip().split(".")
        node: Any = data
        for i, k in enumerate(keys):
            if isinstance(node, list):  # datasets.0.batch_size=4
                if not k.isdigit() or int(k) >= len(node):
                    raise ValueError(
                        f"override {item!r}: {k!r} is not an index of a {len(node)}-item list"
                    )
                keys[i] = k = int(k)
            elif not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {keys[i - 1]!r} is not a section")
            if i < len(keys) - 1:
                node = node.setdefault(k, {}) if isinstance(node, dict) else node[k]
        node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with path.open() as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level of a config must be a mapping")
    return data


def load_config(
    cls: type[T],
    path: str | Path,
    overrides: list[str] | None = None,
    overrides_from: str = "command line",
) -> T:
    """Load config class ``cls`` from YAML plus ``section.key=value`` overrides; errors name
    the dotted key and where the bad value came from: the file, or the override, from
    ``overrides_from`` (the command line, or a key such as ``model_overrides``: :func:`blame`)."""
    overrides = list(overrides or [])
    try:
        data = apply_overrides(load_yaml(path), overrides)
    except ValueError as e:
        raise ValueError(f"{overrides_from}: {e}") from None
    try:
        return from_dict(cls, data)
    except ValueError as e:
        raise ValueError(f"{blame(cls, path, overrides, str(e), overrides_from)}: {e}") from None


def blame(
    cls: type, path: str | Path, overrides: list[str], error: str, overrides_from: str
) -> str:
    """Where the value an error is about came from: the last override whose key the error
    names (``datasets.0.x`` is ``datasets[0].x`` in errors; a section's override answers for
    every key in it); else the file, if it gives the error alone; else the override without
    which the error goes; else the overrides as a whole."""
    named = error.replace("[", ".").replace("]", "")
    for item in reversed(overrides):
        key = item.split("=", 1)[0].strip()
        if re.search(rf"(?<![\w.]){re.escape(key)}(?!\w)", named):
            return f"{overrides_from} {item!r} (over {path})"

    def error_with(items: list[str]) -> str | None:
        try:
            from_dict(cls, apply_overrides(load_yaml(path), items))
        except ValueError as e:
            return str(e)
        return None

    if not overrides or error_with([]) == error:
        return str(path)
    for i, item in reversed(list(enumerate(overrides))):
        if error_with(overrides[:i] + overrides[i + 1 :]) != error:
            return f"{overrides_from} {item!r} (over {path})"
    return f"{overrides_from} {' '.join(overrides)!r} (over {path})"


def positive(key: str, value: int | float) -> None:
    if value <= 0:
        raise ValueError(f"{key} must be > 0, got {value}")


def _merge(data: dict[str, Any], changes: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``data`` with dotted ``changes`` (``lm.tokenizer``) applied, as a new nested dict."""
    out = dict(data)
    for dotted, value in changes.items():
        head, _, rest = dotted.partition(".")
        if head not in out:
            raise ValueError(
                f"unknown config key {prefix + dotted!r}; valid keys here: {sorted(out)}"
            )
        if rest:
            if not isinstance(out[head], dict):
                raise ValueError(f"{prefix + head!r} is not a section: cannot set {rest!r} in it")
            out[head] = _merge(out[head], {rest: value}, f"{prefix}{head}.")
        else:
            out[head] = to_dict(value) if dataclasses.is_dataclass(value) else value
    return out


class YamlConfig:
    """Base of the project's config dataclasses: loading, saving, changing by copy."""

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        return from_dict(cls, data)

    @classmethod
    def from_yaml(
        cls: type[C],
        path: str | Path,
        overrides: list[str] | None = None,
        overrides_from: str = "command line",
    ) -> C:
        """Load from YAML, then apply ``section.key=value`` overrides (``overrides_from`` says
        where they came from, for errors)."""
        return load_config(cls, path, overrides, overrides_from)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def replace(self: C, changes: dict[str, Any] | None = None, **fields: Any) -> C:
        """A copy with fields changed, by name (``frozen_dtype="bfloat16"``) or by dotted key
        (``{"lm.tokenizer": path}``); the result is type-checked and validated like a load."""
        return from_dict(type(self), _merge(to_dict(self), {**(changes or {}), **fields}))
