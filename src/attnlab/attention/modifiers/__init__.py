"""Score modifiers: a second kind of attention plugin, composable with any softmax pattern.

Built-ins, one module each: ``alibi`` (ALiBi's per-head distance penalty),
``softcap`` (cap * tanh(score / cap)) and ``relpos`` (a learned, bucketed
relative-position bias per head). Configure them with ``attention.modifiers``,
a list of specs such as ``[alibi, softcap(cap=30)]``; a new one subclasses
``Modifier`` and registers itself with ``register_modifier(name)``.
"""

from . import alibi, relpos, softcap  # noqa: F401 - registers the built-ins
from .base import MODIFIERS, Modifier, Param, ScoreModifiers, register_modifier
from .spec import build_modifiers, check_modifiers, join_specs, modifier_specs, parse_spec

__all__ = [
    "MODIFIERS",
    "Modifier",
    "Param",
    "ScoreModifiers",
    "register_modifier",
    "build_modifiers",
    "check_modifiers",
    "join_specs",
    "modifier_specs",
    "parse_spec",
]
