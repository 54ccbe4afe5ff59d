"""Attention: patterns (which keys each query may see), backends (how it is computed), one interface."""

from .backends import BACKENDS, BackendFn, reference, register_backend, sdpa, select_backend
from .interface import Attention
from .patterns import (
    PATTERNS,
    BlockLayout,
    Dense,
    Fixed,
    Linear,
    Local,
    Pattern,
    SinkWindow,
    Strided,
    build_pattern,
    register_pattern,
)

__all__ = [
    "Attention",
    "Pattern",
    "Dense",
    "Local",
    "Strided",
    "Fixed",
    "SinkWindow",
    "BlockLayout",
    "Linear",
    "PATTERNS",
    "build_pattern",
    "register_pattern",
    "BACKENDS",
    "BackendFn",
    "reference",
    "sdpa",
    "register_backend",
    "select_backend",
]
