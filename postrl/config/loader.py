"""Loading a config: YAML files, mappings and ``Config`` objects, dotted overrides, strict typing.

Loading is strict and fails fast: an unknown key (with a "did you mean" suggestion, or the key's new
place when it moved, see :data:`MOVED_KEYS`), a wrongly typed value or an inconsistent config raises
:class:`ConfigError` before any model is loaded. The schema lives in the section modules; nothing here
knows a particular key except :data:`MOVED_KEYS`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import logging
import math
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from .checks import ConfigError
from .schema import Config, validate

T = TypeVar("T")
NoneType = type(None)

_PREFERENCE_LOSS_KEYS = ("beta", "label_smoothing", "simpo_gamma", "orpo_lambda", "slic_delta", "slic_lambda",
                         "kto_lambda_d", "kto_lambda_u")
MOVED_KEYS: dict[str, str] = {
    "algo.preference_loss": "preference.loss",
    **{f"algo.{key}": f"preference.{key}" for key in _PREFERENCE_LOSS_KEYS},
    "rollout.async": "rollout.async_generation",  # `async` is a Python keyword: the field is async_generation
}
"""Keys that moved to another place (old dotted key -> new one): an old key in a file or an override is
an error that names the new key, rather than a silent default. The saved ``config.yaml`` of a run written by
an earlier postrl is migrated instead when that run is resumed (``load_config(..., migrate=True)``)."""


def migrate_moved_keys(raw: dict[str, Any]) -> list[str]:
    """Move the :data:`MOVED_KEYS` of a config mapping (and of its pipeline stages' ``config``) to their new
    place, in place; returns the keys moved. A key given in both places with different values is an error."""
    moved: list[str] = []

    def move(data: dict[str, Any], where: str) -> None:
        for old, new in MOVED_KEYS.items():
            (section, key), (new_section, new_key) = old.split("."), new.split(".")
            if old in data:  # a dotted key (pipeline stage configs may use them)
                value = data.pop(old)
                if data.get(new, value) != value:
                    raise ConfigError(f"{where}{old}={value!r} and {where}{new}={data[new]!r} disagree; {old} moved "
                                      f"to {new}: keep only {new}")
                data[new] = value
                moved.append(where + old)
            part = data.get(section)
            if isinstance(part, dict) and key in part:
                value = part.pop(key)
                target = data.setdefault(new_section, {})
                if target.get(new_key, value) != value:
                    raise ConfigError(f"{where}{old}={value!r} and {where}{new}={target[new_key]!r} disagree; {old} "
                                      f"moved to {new}: keep only {new}")
                target[new_key] = value
                moved.append(where + old)

    move(raw, "")
    for i, stage in enumerate(raw.get("stages") or []):
        if isinstance(stage, dict) and isinstance(stage.get("config"), dict):
            move(stage["config"], f"stages.{i}.config.")
    return moved


# --------------------------------------------------------------------------- #
# Generic type checking
# --------------------------------------------------------------------------- #


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Resolved field types of a dataclass (works with ``from __future__ import annotations``)."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    """Readable name of a type annotation, e.g. ``str | None`` or ``list[RewardSpec]``."""
    if tp is Any:
        return "Any"
    if tp is NoneType:
        return "None"
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in get_args(tp))
    origin, args = get_origin(tp), get_args(tp)
    if origin is not None:
        inner = ", ".join(_type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]" if args else origin.__name__
    return getattr(tp, "__name__", str(tp))


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_error(path: str, tp: Any, value: Any) -> ConfigError:
    hint = ""
    if isinstance(value, str) and tp in (int, float):
        hint = " (a number, not a string)"
    elif isinstance(value, bool) and tp in (int, float):
        hint = " (booleans are not accepted as numbers)"
    return ConfigError(
        f"Config key '{path or '<root>'}' expects {_type_name(tp)}{hint}, "
        f"got {_short_repr(value)} ({type(value).__name__})."
    )


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against annotation ``tp`` and return it converted.

    Conversions: int -> float, a float-looking string -> float (YAML 1.1 reads
    ``1e-5`` as a string), mappings -> dataclasses, tuples -> lists.
    bool is never accepted as int or float.
    """
    if tp is Any:
        return value
    if _is_union(tp):
        options = [a for a in get_args(tp) if a is not NoneType]
        if value is None and len(options) < len(get_args(tp)):
            return None
        if len(options) == 1 and (
            get_origin(options[0]) is not None or dataclasses.is_dataclass(options[0])
        ):
            return _coerce(value, options[0], path)  # keeps nested error messages
        for option in options:
            try:
                return _coerce(value, option, path)
            except ConfigError:
                pass
        raise _type_error(path, tp, value)
    if dataclasses.is_dataclass(tp):
        if value is None:  # an empty YAML section ("eval:") means all defaults
            return tp()
        if not isinstance(value, Mapping):
            raise _type_error(path, tp, value)
        return from_dict(tp, value, path)
    origin, args = get_origin(tp), get_args(tp)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _type_error(path, tp, value)
        item_tp = args[0] if args else Any
        return [_coerce(v, item_tp, f"{path}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _type_error(path, tp, value)
        key_tp, value_tp = args if args else (Any, Any)
        return {
            _coerce(k, key_tp, f"{path}.{k}"): _coerce(v, value_tp, f"{path}.{k}")
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(path, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(path, tp, value)
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise _type_error(path, tp, value)
        if not math.isfinite(number):  # no setting means anything at inf or nan (train.lr=inf trained NaN weights)
            raise ConfigError(f"{path}: {_short_repr(value)} is not a finite number; give a finite value")
        return number
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _type_error(path, tp, value)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a dataclass tree (lists of dataclasses shown as ``name.0.field``)."""
    keys = []
    for name, tp in _hints(cls).items():
        key = f"{prefix}{name}"
        keys.append(key)
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, key + ".")
        elif get_origin(tp) is list and dataclasses.is_dataclass(get_args(tp)[0]):
            keys += _all_keys(get_args(tp)[0], key + ".0.")
    return keys


def _unknown_key(cls: type, parent: str, key: Any) -> ConfigError:
    """Error for ``key`` not being a field of ``cls`` (at dotted path ``parent``)."""
    full = f"{parent}.{key}" if parent else str(key)
    if full in MOVED_KEYS:
        return ConfigError(f"Config key '{full}' is no longer valid: {full} moved to {MOVED_KEYS[full]}.")
    valid = list(_hints(cls))
    prefix = f"{parent}." if parent else ""
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
    if close:
        suggestion = f"{prefix}{close[0]}"
    else:  # maybe the key exists in another section, e.g. train.n -> rollout.n
        elsewhere = [k for k in _all_keys(Config) if k.rsplit(".", 1)[-1] == str(key)]
        suggestion = elsewhere[0] if elsewhere else None
    message = f"Unknown config key '{full}'."
    if suggestion:
        message += f" Did you mean '{suggestion}'?"
    where = f"in '{parent}'" if parent else "at the top level"
    message += f" Valid keys {where}: {', '.join(valid)}."
    return ConfigError(message)


# --------------------------------------------------------------------------- #
# dict <-> dataclass
# --------------------------------------------------------------------------- #


def from_dict(cls: type[T], data: Mapping[str, Any] | None, path: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping, strictly.

    Missing keys take their defaults; unknown keys and wrongly typed values
    raise :class:`ConfigError` naming the full dotted key (``path`` is the
    dotted prefix of ``data`` within the whole config).
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"Config section '{path or '<root>'}' must be a mapping of {cls.__name__} fields, "
            f"got {_short_repr(data)} ({type(data).__name__})."
        )
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            into = getattr(cls, "_extra_keys_into", None)
            if into is None or not isinstance(key, str):
                raise _unknown_key(cls, path, key)
            extra = dict(data.get(into) or {})
            if key in extra:
                raise ConfigError(f"{path}.{key} is given twice: next to 'name' and in '{into}'")
            extra[key] = value
            data = {**data, into: extra}  # noqa: PLW2901 - folded into the kwargs field below
            continue
        kwargs[key] = _coerce(value, hints[key], f"{path}.{key}" if path else key)
    into = getattr(cls, "_extra_keys_into", None)
    if into is not None and isinstance(data.get(into), Mapping):
        kwargs[into] = _coerce(data[into], hints[into], f"{path}.{into}" if path else into)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict/list copy of a config dataclass (YAML-serialisable)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write ``cfg`` as YAML (readable back by :func:`load_config`); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False))
    return path


# --------------------------------------------------------------------------- #
# Loading and overrides
# --------------------------------------------------------------------------- #


def _accepts_str(tp: Any) -> bool:
    return tp is str or (_is_union(tp) and str in get_args(tp))


def _apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``dotted.key=value`` override to the full config dict in place.

    The value is parsed with ``yaml.safe_load`` (so ``4``, ``true``, ``[1, 2]``,
    ``{a: 1}`` and ``null`` work). For string fields a value that YAML reads
    as a number or bool is kept as the literal text (``run.name=2024``).
    Keys are checked against the schema; free-form dicts (``data.task_kwargs``)
    accept new keys; ``rewards.N`` with N == len(rewards) appends a default entry.
    """
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"Override {override!r} must look like key=value, e.g. train.lr=1e-5.")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"Override {override!r}: cannot parse value {text!r}: {exc}") from None

    node: Any = data
    tp: Any = Config
    parent = ""
    parts = key.split(".")
    for i, part in enumerate(parts):
        here = f"{parent}.{part}" if parent else part
        slot: Any
        if dataclasses.is_dataclass(tp):
            if part not in _hints(tp):
                raise _unknown_key(tp, parent, part)
            if not isinstance(node, dict):
                raise ConfigError(f"Override {override!r}: '{parent}' is not a mapping.")
            slot, child_tp = part, _hints(tp)[part]
        elif get_origin(tp) is list:
            if not isinstance(node, list):
                raise ConfigError(f"Override {override!r}: '{parent}' is not a list.")
            if not part.isdigit() or int(part) > len(node):
                raise ConfigError(
                    f"Override {override!r}: '{part}' is not a valid index into '{parent}' "
                    f"(it has {len(node)} items; use 0..{len(node)} where {len(node)} appends)."
                )
            slot, child_tp = int(part), (get_args(tp) or (Any,))[0]
            if slot == len(node):
                node.append(to_dict(child_tp()) if dataclasses.is_dataclass(child_tp) else None)
        elif get_origin(tp) is dict or tp is Any:
            if not isinstance(node, dict):
                raise ConfigError(f"Override {override!r}: '{parent}' is not a mapping.")
            slot, child_tp = part, (get_args(tp) or (Any, Any))[1]
            if i < len(parts) - 1 and not isinstance(node.get(part), (dict, list)):
                node[part] = {}
        else:
            raise ConfigError(
                f"Override {override!r}: '{parent}' is a {_type_name(tp)} and has no key '{part}'."
            )
        if i == len(parts) - 1:
            if _accepts_str(child_tp) and isinstance(value, (bool, int, float)):
                value = text.strip()
            node[slot] = value
        else:
            node, tp, parent = node[slot], child_tp, here


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last silently)."""


def _no_duplicate_keys(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"key {key!r} is given twice in the same mapping (lines {seen[key]} and "
                              f"{key_node.start_mark.line + 1}); YAML would silently keep the last one — merge them")
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicate_keys)


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping of a YAML config file, with clear errors for a missing path, a directory, a file that is not
    UTF-8 text, malformed YAML, a key given twice, or a document that is not a mapping."""
    if path.is_dir():
        raise ConfigError(f"Config {path} is a directory, not a YAML file (give e.g. {path / 'config.yaml'})")
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"Config {path} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"Cannot read config {path}: {exc.strerror or exc}") from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader)
    except ConfigError as exc:
        raise ConfigError(f"Config {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"Cannot parse YAML config {path}: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"Config {path} must be a mapping of sections (model:, data:, ...), got a "
                          f"{type(raw).__name__}")
    return raw


def load_config(source: str | Path | Mapping[str, Any] | Config | None = None,
                overrides: Sequence[str] = (), migrate: bool = False) -> Config:
    """Build a validated :class:`Config` from ``source``, with ``overrides`` applied.

    ``source`` is a YAML file (str or Path), a nested mapping of sections as YAML gives it (the Python API
    passes dicts), a ``Config`` (copied: the caller's object is never changed) or None (all defaults).
    ``overrides`` are strings like ``"train.lr=1e-5"``, ``"rollout.n=4"``,
    ``"data.task_kwargs.num_terms=2"`` or ``"rewards.0.weight=2"``, applied in order after ``source``.
    ``migrate``: ``source`` is a run's saved config, possibly written by an earlier postrl: keys that moved
    since (:data:`MOVED_KEYS`) are read from their old place, with a warning, instead of refused.
    Raises :class:`ConfigError` on any problem.
    """
    if source is None:
        raw: Any = {}
    elif isinstance(source, Config):
        raw = to_dict(source)  # a deep copy
    elif isinstance(source, Mapping):
        raw = copy.deepcopy(source)  # the config must not share mutable values with the caller's dict
    else:
        raw = read_yaml(Path(source))
    if migrate and isinstance(raw, dict):
        moved = migrate_moved_keys(raw)
        if moved:
            logging.getLogger("postrl.config").warning(
                "%s was written by an earlier postrl: read %s from their new place (%s)", source, ", ".join(moved),
                ", ".join(sorted({MOVED_KEYS[m.rsplit('config.', 1)[-1]] for m in moved})))
    cfg = from_dict(Config, raw)
    if isinstance(overrides, str):
        overrides = [overrides]
    if overrides:
        data = to_dict(cfg)
        for override in overrides:
            _apply_override(data, override)
        cfg = from_dict(Config, data)
    validate(cfg)
    return cfg
