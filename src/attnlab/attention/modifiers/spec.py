"""Modifier specs: ``name`` or ``name(key=value,...)`` strings, parsed, checked and built in one place."""

from __future__ import annotations

import re
from typing import Any

from ...errors import ConfigError
from .base import MODIFIERS, Modifier, Param, ScoreModifiers

_SPEC = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*$")
KEY = "attention.modifiers"


def join_specs(items: list[str]) -> list[str]:
    """Undo a comma split inside parentheses: ``['relpos(buckets=32', 'max_distance=128)']`` is one spec."""
    out: list[str] = []
    for item in items:
        if out and out[-1].count("(") > out[-1].count(")"):
            out[-1] += "," + item
        else:
            out.append(item)
    return out


def _known() -> str:
    return ", ".join(sorted(MODIFIERS))


def _param_list(cls: type[Modifier]) -> str:
    return ", ".join(p.describe(n) for n, p in cls.params.items()) or "none"


def _value(spec: str, cls: type[Modifier], key: str, raw: str) -> Any:
    p: Param = cls.params[key]
    bad = ConfigError(f"{KEY} entry {spec!r}: {key}={raw!r} is not allowed; {cls.name} takes {_param_list(cls)}")
    try:
        number = float(raw)
    except ValueError:
        raise bad from None
    if p.kind is int:
        if number != int(number):
            raise bad
        number = int(number)
    if (
        (p.lo is not None and number < p.lo)
        or (p.hi is not None and number > p.hi)
        or (p.above is not None and number <= p.above)
        or number != number
    ):
        raise bad
    return number


def parse_spec(spec: str) -> tuple[type[Modifier], dict[str, Any]]:
    """``'softcap(cap=30)'`` -> (the softcap class, {'cap': 30.0}), defaults filled in; a one-line ConfigError
    otherwise."""
    m = _SPEC.match(spec)
    if not m:
        raise ConfigError(f"{KEY} entry {spec!r} is not name or name(key=value,...): write e.g. softcap(cap=30)")
    name, body = m.group(1), m.group(2)
    cls = MODIFIERS.get(name)
    if cls is None:
        raise ConfigError(f"{KEY} entry {spec!r} names unknown modifier {name!r}: use one of {_known()}")
    values = {k: p.default for k, p in cls.params.items()}
    for item in (s.strip() for s in (body or "").split(",")):
        if not item:
            continue
        key, eq, raw = (s.strip() for s in item.partition("="))
        if not eq or key not in cls.params:
            raise ConfigError(
                f"{KEY} entry {spec!r}: {cls.name} has no parameter {key!r}; its parameters are {_param_list(cls)}"
            )
        values[key] = _value(spec, cls, key, raw)
    return cls, values


def modifier_specs(attn_cfg, model_cfg, layer_idx: int = 0) -> list[str]:
    """The modifiers layer ``layer_idx`` applies: its ``attention.layers`` entry's or ``attention.modifiers``, with
    alibi first for ``model.position=alibi`` (unless listed already), so ``position=alibi`` and ``position=none``
    + ``modifiers=[alibi]`` are one model."""
    own = (
        attn_cfg.layer_modifiers(layer_idx)
        if hasattr(attn_cfg, "layer_modifiers")
        else getattr(attn_cfg, "modifiers", None)
    )
    specs = join_specs(list(own or []))
    if getattr(model_cfg, "position", None) == "alibi" and not any(parse_spec(s)[0].name == "alibi" for s in specs):
        specs = ["alibi", *specs]
    return specs


def build_modifiers(specs: list[str], n_head: int) -> ScoreModifiers | None:
    """The layer's ``ScoreModifiers`` for ``specs`` (None when there are none); ConfigError on a bad spec."""
    mods = []
    for spec in join_specs(list(specs)):
        cls, values = parse_spec(spec)
        mod = cls(n_head, **values)
        mod.check()
        mods.append(mod)
    return ScoreModifiers(mods) if mods else None


def check_modifiers(specs: list[str], pattern, n_head: int, layer: int | None = None) -> None:
    """Every spec parses and suits ``pattern``: modifiers change softmax scores, which linear attention has not."""
    build_modifiers(specs, n_head)
    if specs and pattern.mechanism != "softmax":
        where = "" if layer is None else f" (layer {layer})"
        raise ConfigError(
            f"{KEY}={list(specs)} change softmax scores, but pattern {pattern.name!r}{where} is "
            f"{pattern.mechanism} attention, which has none: drop {KEY} or use a softmax pattern"
        )
