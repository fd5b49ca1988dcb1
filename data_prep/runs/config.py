"""One merge path for every stage's settings: defaults < YAML file < `--set key=value` overrides."""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from data_prep.errors import SpinefracError


class ConfigError(SpinefracError, ValueError):
    """A config file or override that does not match the stage's documented defaults."""


class Config(Mapping[str, Any]):
    """A read-only nested config: `cfg.section.key` or `cfg["section"]["key"]`."""

    def __init__(self, data: Mapping[str, Any], name: str = "config") -> None:
        self._data = {k: Config(v, f"{name}.{k}") if isinstance(v, Mapping) else v for k, v in data.items()}
        self._name = name

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        try:
            return self._data[key]
        except KeyError:
            raise AttributeError(f"{self._name} has no key {key!r}{_suggest(key, self._data)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"Config({self.to_dict()!r})"

    def to_dict(self) -> dict[str, Any]:
        """Return a plain nested dict copy (for YAML dumps and sidecars)."""
        return {k: v.to_dict() if isinstance(v, Config) else copy.deepcopy(v) for k, v in self._data.items()}


def default_config_path(stage: str) -> Path:
    """Return the path of the packaged default YAML of a stage (configs/<stage>.yaml)."""
    path = Path(str(resources.files("configs") / f"{stage}.yaml"))
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"no default config for stage {stage!r} at {path}{_suggest(stage, available)}")
    return path


def load_config(stage: str, path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a stage's defaults, merge a user YAML over them, then `key.sub=value` overrides; validate the result.

    Keys and types are checked while merging (unknown keys get a suggestion); then the merged config
    is validated against the stage's schema (configs/schema.py: choices, ranges), naming the
    key, the value, the allowed values and the file or override it came from.
    """
    default_path = default_config_path(stage)
    defaults = _read_yaml(default_path)
    merged = copy.deepcopy(defaults)
    sources: dict[str, str] = {}
    extras = _passthrough(stage)
    if path is not None:
        user = _read_yaml(Path(path))
        _merge(merged, user, defaults, source=str(path), prefix="", sources=sources, extras=extras)
    _apply_overrides(merged, defaults, overrides, sources=sources, extras=extras)
    validate_config(stage, merged, sources=sources, default_source=str(default_path))
    return Config(merged, stage)


def with_overrides(stage: str, config: Config, overrides: Sequence[str]) -> Config:
    """Return a loaded config of `stage` with `key.sub=value` overrides applied, validated again (a variant of it).

    Keys and types are checked as for --set; the config is not read again from YAML (no key=value round trip).
    """
    default_path = default_config_path(stage)
    defaults = _read_yaml(default_path)
    merged = config.to_dict()
    sources: dict[str, str] = {}
    _apply_overrides(merged, defaults, overrides, sources=sources, extras=_passthrough(stage))
    validate_config(stage, merged, sources=sources, default_source=str(default_path))
    return Config(merged, stage)


def _apply_overrides(merged: dict[str, Any], defaults: Mapping[str, Any], overrides: Sequence[str], *,
                     sources: dict[str, str], extras: Mapping[str, frozenset[str]]) -> None:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.epochs=5)")
        value = yaml.safe_load(raw) if raw != "" else None
        nested: dict[str, Any] = {}
        cursor = nested
        parts = key.split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = value
        _merge(merged, nested, defaults, source=f"--set {item}", prefix="", sources=sources, extras=extras)


def validate_config(stage: str, data: Mapping[str, Any], *, sources: Mapping[str, str] | None = None,
                    default_source: str | None = None) -> None:
    """Check a merged config against the stage's schema; raise ConfigError listing every bad key."""
    from pydantic import ValidationError

    from configs.schema import SCHEMAS

    schema = SCHEMAS.get(stage)
    if schema is None:
        return
    try:
        schema.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(err, schema, sources or {}, default_source or f"configs/{stage}.yaml")
                 for err in exc.errors(include_url=False)]
        raise ConfigError("\n".join(lines)) from None

def dump_config(config: Config | Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a resolved config as YAML (atomically) so a run folder records what made it."""
    from data_prep.runs.artifacts import write_text_atomic

    data = config.to_dict() if isinstance(config, Config) else dict(config)
    return write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, found {type(data).__name__}")
    return data


def _merge(target: dict[str, Any], update: Mapping[str, Any], defaults: Mapping[str, Any], *,
           source: str, prefix: str, sources: dict[str, str] | None = None,
           extras: Mapping[str, frozenset[str]] | None = None) -> None:
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in defaults:
            if key in (extras or {}).get(prefix.rstrip("."), frozenset()):   # an explicit pass-through key
                target[key] = value
                if sources is not None:
                    sources[dotted] = source
                continue
            raise ConfigError(f"{source}: unknown key {dotted!r}{_suggest(key, defaults)}")
        default = defaults[key]
        if isinstance(default, Mapping):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: {dotted!r} must be a section (mapping), found {value!r}")
            _merge(target[key], value, default, source=source, prefix=dotted + ".", sources=sources,
                   extras=extras)
        else:
            target[key] = _check_type(value, default, dotted, source)
            if sources is not None:
                sources[dotted] = source


def _check_type(value: Any, default: Any, dotted: str, source: str) -> Any:
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {dotted!r} must be true or false, found {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {dotted!r} must be a list, found {value!r}")
        return list(value)
    if not isinstance(value, type(default)) or isinstance(value, bool):
        raise ConfigError(f"{source}: {dotted!r} must be {type(default).__name__}, found {value!r}")
    return value


def _suggest(key: str, choices: Any) -> str:
    matches = difflib.get_close_matches(str(key), [str(c) for c in choices], n=3)
    return f" (did you mean {', '.join(repr(m) for m in matches)}?)" if matches else ""


def _passthrough(stage: str) -> dict[str, frozenset[str]]:
    """Return, per section, the keys the stage's schema accepts without a default (Ultralytics pass-through)."""
    from configs.schema import SCHEMAS, passthrough_keys

    schema = SCHEMAS.get(stage)
    if schema is None:
        return {}
    return {name: passthrough_keys(stage, name) for name in schema.model_fields}


def _describe(err: Mapping[str, Any], schema: type, sources: Mapping[str, str], default_source: str) -> str:
    """One line for one schema error: where the value came from, the key, the value and what is allowed."""
    loc = tuple(str(p) for p in err["loc"])
    dotted = ".".join(loc)
    inside = sorted({src for key, src in sources.items() if key.startswith(dotted + ".")}) if dotted else []
    source = ", ".join(inside) or default_source   # a check across a section: whoever set keys in it
    for n in range(len(loc), 0, -1):            # the file or --set that last set this key (or its parent)
        if ".".join(loc[:n]) in sources:
            source = sources[".".join(loc[:n])]
            break
    kind, value = err["type"], err.get("input")
    if kind == "extra_forbidden":
        return (f"{source}: key {dotted!r} has no schema entry: add one line for it to its section in "
                "configs/schema.py")
    if kind == "missing":
        return f"{source}: key {dotted!r} is missing (the schema in configs/schema.py expects it)"
    allowed = _literal_choices(schema, err["loc"])
    if allowed is not None:
        return (f"{source}: {dotted!r} = {value!r} is not allowed; choose one of "
                f"{', '.join(repr(a) for a in allowed)}{_suggest(value, allowed)}")
    message = str(err["msg"]).removeprefix("Value error, ")
    if isinstance(value, Mapping):               # a check across the keys of a section
        return f"{source}: section {dotted!r}: {message}"
    return f"{source}: {dotted!r} = {value!r}: {message}"


def _literal_choices(schema: type, loc: Sequence[Any]) -> tuple[Any, ...] | None:
    """Return the allowed values of the Literal field at `loc` in a pydantic schema, or None."""
    from typing import Literal, get_args, get_origin

    from pydantic import BaseModel

    model: Any = schema
    annotation: Any = None
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = annotation

    def literal_args(tp: Any) -> tuple[Any, ...] | None:
        if get_origin(tp) is Literal:
            return get_args(tp)
        for arg in get_args(tp):
            found = literal_args(arg)
            if found is not None:
                return found
        return None

    return literal_args(annotation)
