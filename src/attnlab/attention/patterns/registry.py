"""The pattern registry: the single list of attention patterns that config, CLI, docs and tests read.

A pattern class registers itself with ``@register_pattern``; a user's file adds
its own through ``attention.plugins=[path/to/file.py]`` (``load_plugin``), with
no edit to attnlab. ``make_pattern`` turns one layer's spec, a dict such as
``{"pattern": "local", "window": 64}``, into a pattern instance.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import ConfigError

if TYPE_CHECKING:
    from .base import LayerContext, Pattern

PATTERNS: dict[str, type[Pattern]] = {}


def register_pattern(cls: type[Pattern]) -> type[Pattern]:
    """Class decorator: add ``cls`` to the registry under ``cls.name`` (once)."""
    if cls.name in PATTERNS and PATTERNS[cls.name] is not cls:
        if PATTERNS[cls.name].__qualname__ == cls.__qualname__ and PATTERNS[cls.name].__module__ == cls.__module__:
            PATTERNS[cls.name] = cls  # the same plugin file loaded again: the newer definition wins
            return cls
        raise ConfigError(
            f"attention pattern {cls.name!r} is registered twice "
            f"({PATTERNS[cls.name].__module__} and {cls.__module__}): give the new one another name"
        )
    PATTERNS[cls.name] = cls
    return cls


def get_pattern(name: str, key: str = "attention.pattern") -> type[Pattern]:
    cls = PATTERNS.get(name)
    if cls is None:
        raise ConfigError(
            f"{key} names unknown pattern {name!r}: use one of {', '.join(sorted(PATTERNS))} "
            f"(or register your own with attention.plugins=[file.py])"
        )
    return cls


def param_owners() -> dict[str, list[type[Pattern]]]:
    """Every parameter name, with the registered patterns that declare it."""
    owners: dict[str, list[type[Pattern]]] = {}
    for cls in PATTERNS.values():
        for name in cls.parameters():
            owners.setdefault(name, []).append(cls)
    return owners


def make_pattern(spec: dict[str, Any], layer: LayerContext, where: str = "attention") -> Pattern:
    """The pattern for one layer from ``{"pattern": name, **params}``; ConfigError naming ``where`` on bad input."""
    spec = dict(spec)
    cls = get_pattern(spec.pop("pattern", "dense"), f"{where}.pattern")
    known = cls.parameters()
    unknown = sorted(set(spec) - set(known))
    if unknown:
        have = ", ".join(known) or "none"
        raise ConfigError(f"{where}: pattern {cls.name!r} has no parameter {unknown[0]!r} (its parameters: {have})")
    try:
        return cls.create(spec, layer)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}" if where != "attention" else str(e)) from None


# Plugins already registered, by the reference the config uses -> sha256 of the source that was loaded.
_LOADED: dict[str, str] = {}


def load_plugin(ref: str) -> str:
    """Import a plugin (a .py file path or an importable module name) so its patterns/modifiers register;
    returns the sha256 of its source. Loading a plugin runs its code: it is the user's own file, named in
    the user's config. A reference already provided (``provide_plugin``: a run's own copy) is not reloaded."""
    if ref in _LOADED:
        return _LOADED[ref]
    path = Path(ref)
    if ref.endswith(".py"):
        if not path.is_file():
            raise ConfigError(
                f"attention.plugins: {ref!r} not found: give a .py file path or an importable module name"
            )
        _LOADED[ref] = _exec_file(ref, path)
        return _LOADED[ref]
    try:
        module = importlib.import_module(ref)
    except ImportError as e:
        raise ConfigError(
            f"attention.plugins: cannot import {ref!r} ({e}): give a .py file path or an importable module"
        ) from None
    file = getattr(module, "__file__", None)
    _LOADED[ref] = hashlib.sha256(Path(file).read_bytes()).hexdigest() if file else ""
    return _LOADED[ref]


def provide_plugin(ref: str, path: str) -> None:
    """Load the file at ``path`` as plugin ``ref`` (a run's copy of it), so configs naming ``ref`` use it."""
    _LOADED[ref] = _exec_file(ref, Path(path))


def _exec_file(ref: str, path: Path) -> str:
    """Execute a plugin file as a module named by its content (the same code loads once); returns its sha256."""
    source = path.read_bytes()
    sha = hashlib.sha256(source).hexdigest()
    name = "attnlab_plugin_" + sha[:16]
    if name in sys.modules:
        return sha
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"attention.plugins: {ref!r} cannot be loaded as a Python module: give a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and typing resolve the module by name
    try:
        spec.loader.exec_module(module)
    except ConfigError:
        del sys.modules[name]
        raise
    except Exception as e:  # a broken plugin: say which file and what, in one line
        del sys.modules[name]
        raise ConfigError(
            f"attention.plugins: {ref!r} failed to load ({type(e).__name__}: {e}): fix the plugin file"
        ) from None
    return sha


def listing() -> str:
    """Every registered pattern with its parameters (type, range, help): for ``attnlab patterns`` and docs."""
    import typing

    lines = []
    for name in sorted(PATTERNS):
        cls = PATTERNS[name]
        lines.append(f"{name}: {(cls.__doc__ or '').strip().splitlines()[0]}")
        hints = typing.get_type_hints(cls)
        for pname, f in cls.parameters().items():
            m = f.metadata
            allowed = (
                ("one of " + ", ".join(map(str, m["choices"])))
                if m.get("choices")
                else " ".join(
                    x
                    for x in (
                        f">= {m['lo']}" if m.get("lo") is not None else "",
                        f"<= {m['hi']}" if m.get("hi") is not None else "",
                    )
                    if x
                )
            )
            tp = getattr(hints[pname], "__name__", str(hints[pname]))
            lines.append(
                f"    {pname} ({tp}, default {f.default!r}{', ' + allowed if allowed else ''}): {m.get('help', '')}"
            )
    return "\n".join(lines)
