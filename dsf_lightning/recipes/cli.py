"""Typed dataclass configs to and from the command line and YAML: class defaults, then ``--config FILE``, then flags.

A config is a (nested, frozen) dataclass whose defaults are the only defaults: every flag uses
``default=argparse.SUPPRESS``, so the parsed namespace holds just what the user typed, and ``--help``
shows the dataclass default. Resolution order, later wins:

1. the config class's defaults (``dataclasses`` fields, nested sections included);
2. ``--config FILE.yaml``: a nested mapping deep-merged over them (unknown keys are an error);
3. the flags, each setting one or more dotted paths (``--seed`` -> ``run.seed`` and ``prune.seed``).

The merged data is type-checked against the field annotations and built into the dataclasses, whose
``__post_init__`` validate the values. ``--print-config`` prints the result as YAML, which ``--config``
reads back to an equal config.

stdlib ``argparse`` rather than a config CLI library: the recipes keep their dashed flags
(``--calibration-batches``, ``--no-progress-bar``, ``--dense-milestones 80 120``).
"""

from __future__ import annotations

import argparse
import copy
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Generic, Literal, Self, TypeVar

import yaml

__all__ = ["Config", "ConfigParser", "Flag", "flag", "from_data", "group", "load_yaml", "overlay", "to_data"]

C = TypeVar("C", bound="Config")


class Config:
    """Mixin of a top-level dataclass config: plain data, YAML, and back."""

    def to_dict(self) -> dict[str, Any]:
        """The nested config as plain data (dicts, lists, numbers, strings; for loggers and YAML)."""
        return to_data(self)

    def to_yaml(self) -> str:
        """The config as YAML, in field order (loadable with ``--config``)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """The config of ``data`` (a possibly partial nested mapping) over the class defaults."""
        return from_data(cls, data)


# ------------------------------------------------------------------------------------------------
# dataclasses <-> plain data
# ------------------------------------------------------------------------------------------------
def to_data(value: Any) -> Any:
    """Dataclasses as dicts (field order), mappings as dicts, tuples and lists as lists; recursively."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_data(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_data(v) for v in value]
    return value


def from_data(cls: type[C], data: Mapping[str, Any], flag_names: Mapping[str, Sequence[str]] | None = None) -> C:
    """Build ``cls`` from ``data`` merged over its defaults.

    Raises:
        ValueError: an unknown key, a value of the wrong type, or one its dataclass rejects (the message
            names the dotted field and, from ``flag_names`` (path -> flags), the flags that set it).
    """
    return _build(cls, overlay(cls, to_data(cls()), data), "", flag_names or {})


def overlay(cls: type, base: dict[str, Any], update: Any, path: str = "") -> dict[str, Any]:
    """``base`` (the plain data of ``cls``) with ``update`` deep-merged over it, section by section.

    Only dataclass sections overlay key by key; any other value (a dict-valued option included) is
    replaced whole.
    """
    where = f"{path!r}" if path else "the top level"
    if not isinstance(update, Mapping):
        raise ValueError(f"{path or 'the config'} must be a mapping with keys {list(base)}, got {update!r}")
    unknown = sorted(str(k) for k in update if k not in base)
    if unknown:
        raise ValueError(f"unknown key(s) {[_join(path, k) for k in unknown]}; valid keys at {where}: {list(base)}")
    hints = typing.get_type_hints(cls)
    out = dict(base)
    for key, value in update.items():
        section = _section(hints[key])
        out[key] = overlay(section, base[key], value, _join(path, key)) if section else copy.deepcopy(value)
    return out


def _build(cls: type[C], data: Mapping[str, Any], path: str, flag_names: Mapping[str, Sequence[str]]) -> C:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        if not f.init or f.name not in data:
            continue
        sub, at = _section(hints[f.name]), _join(path, f.name)
        if sub:
            kwargs[f.name] = _build(sub, data[f.name], at, flag_names)
            continue
        try:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], at)
        except ValueError as e:
            raise ValueError(f"{e}{_see(flag_names.get(at, ()))}") from None
    try:
        return cls(**kwargs)
    except ValueError as e:
        # the dataclass names its own fields: add the section and the flags of the fields it names
        named = [n for f in fields(cls) if re.search(rf"\b{f.name}\b", str(e))
                 for n in flag_names.get(_join(path, f.name), ())]
        raise ValueError(f"{path + ': ' if path else ''}{e}{_see(list(dict.fromkeys(named)))}") from e


def _see(names: Sequence[str]) -> str:
    return f" (see {', '.join(names)})" if names else ""


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _section(tp: Any) -> type | None:
    return tp if isinstance(tp, type) and is_dataclass(tp) else None


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """``value`` checked against the annotation ``tp`` (converted where YAML and JSON lose the type:
    lists to tuples, ints to floats, ``1e-4`` read as a string to a float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, path)
            except ValueError:
                pass
    elif origin is Literal:
        if value in args:
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):  # precision: 32
            return str(value)
    elif origin in (tuple, list, Sequence):
        if isinstance(value, (list, tuple)):
            item = args[0] if args else Any
            items = [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
            return items if origin is list else tuple(items)
    elif origin in (dict, Mapping) or tp is dict:
        if isinstance(value, Mapping):
            return dict(value)
    else:
        return value
    raise ValueError(f"{path} must be {_describe(tp)}, got {value!r}")


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if tp is type(None):
        return "None"
    if origin is not None:
        return f"a {getattr(origin, '__name__', origin)}"
    return f"a {getattr(tp, '__name__', tp)}"


# ------------------------------------------------------------------------------------------------
# YAML files
# ------------------------------------------------------------------------------------------------
def load_yaml(path: str) -> dict[str, Any]:
    """The mapping in the YAML file ``path`` (empty for an empty file).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not YAML, or not a mapping at the top.
    """
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"--config: no such file {path!r}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path!r} must hold a mapping of config sections, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------------------------
# flags
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Flag:
    """One command-line flag and the config path(s) it sets.

    Attributes:
        names: option strings, e.g. ``("--density",)``.
        paths: dotted config paths its value goes to, e.g. ``("run.seed", "prune.seed")``.
        help: help text (argparse-formatted: ``%%`` for a percent sign); the config default is appended.
        options: further ``add_argument`` keywords (``type``, ``choices``, ``action``, ``nargs``), never ``default``.
        group: title of the ``--help`` section listing it.
    """

    names: tuple[str, ...]
    paths: tuple[str, ...]
    help: str
    options: Mapping[str, Any] = field(default_factory=dict)
    group: str = "options"


def flag(*names: str, to: str | Sequence[str], help: str, **options: Any) -> Flag:
    """A :class:`Flag` setting the path(s) ``to``; ``options`` go to ``add_argument``."""
    if "default" in options:
        raise ValueError(f"flag {names[0]}: defaults live in the config dataclass, not in the flag")
    return Flag(tuple(names), (to,) if isinstance(to, str) else tuple(to), help, options)


def group(title: str, *flags: Flag) -> list[Flag]:
    """``flags`` listed under ``title`` in ``--help``."""
    return [replace(f, group=title) for f in flags]


class ConfigParser(Generic[C]):
    """The command line of a config class: its flags plus ``--config FILE.yaml`` and ``--print-config``.

    Args:
        config_cls: a dataclass whose every field has a default (nested sections included).
        flags: the flags, in ``--help`` order.
        **parser_options: of ``argparse.ArgumentParser`` (``prog``, ``description``, ``epilog``).
    """

    def __init__(self, config_cls: type[C], flags: Sequence[Flag], **parser_options: Any) -> None:
        self.config_cls = config_cls
        self.defaults: dict[str, Any] = to_data(config_cls())
        self.parser = argparse.ArgumentParser(formatter_class=argparse.RawDescriptionHelpFormatter, **parser_options)
        g = self.parser.add_argument_group("config file")
        g.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS,
                       help="YAML file of config values (the layout --print-config shows); flags given too override it")
        g.add_argument("--print-config", action="store_true", default=argparse.SUPPRESS,
                       help="print the resolved config as YAML (loadable with --config) and exit")
        self.flags: dict[str, Flag] = {}  # argparse dest -> flag
        self.flag_names: dict[str, list[str]] = {}  # config path -> its flags
        groups: dict[str, Any] = {}  # title -> argparse argument group
        for f in flags:
            default = self._default(f)
            g = groups.get(f.group) or groups.setdefault(f.group, self.parser.add_argument_group(f.group))
            shown = str(default).replace("%", "%%")
            action = g.add_argument(*f.names, default=argparse.SUPPRESS, help=f"{f.help} (default: {shown})",
                                    **f.options)
            self.flags[action.dest] = f
            for p in f.paths:
                self.flag_names.setdefault(p, []).append(f.names[0])

    def _default(self, f: Flag) -> Any:
        values = []
        for p in f.paths:
            node: Any = self.defaults
            for key in p.split("."):
                if not isinstance(node, dict) or key not in node:
                    raise ValueError(f"flag {f.names[0]}: {self.config_cls.__name__} has no field {p!r}")
                node = node[key]
            values.append(node)
        return values[0]

    def parse(self, argv: Sequence[str] | None = None) -> C:
        """The config of ``argv`` (``sys.argv[1:]`` when ``None``); prints it and exits 0 for ``--print-config``.

        Raises:
            SystemExit: bad flags (argparse prints the usage), ``--help``, ``--print-config``.
            FileNotFoundError, ValueError: a bad ``--config`` file or config value.
        """
        given = vars(self.parser.parse_args(argv))
        data = copy.deepcopy(self.defaults)
        if "config" in given:
            path = given["config"]
            update = load_yaml(path)
            try:
                data = overlay(self.config_cls, data, update)
            except ValueError as e:
                raise ValueError(f"--config {path!r}: {e}") from None
        for dest, value in given.items():
            if dest in self.flags:
                for p in self.flags[dest].paths:
                    *parents, key = p.split(".")
                    node = data
                    for k in parents:
                        node = node[k]
                    node[key] = copy.deepcopy(value)
        config = _build(self.config_cls, data, "", self.flag_names)
        if given.get("print_config"):
            print(config.to_yaml(), end="")
            self.parser.exit(0)
        return config
