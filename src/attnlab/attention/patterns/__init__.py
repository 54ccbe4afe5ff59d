"""Attention patterns: one module per pattern, each a small pure rule of which keys a query may see.

``base`` defines what a pattern is and what is derived from its rule;
``registry`` lists the patterns (built-ins below, plugins from users' files).
A new pattern is one file: a frozen dataclass with ``param`` fields, a
``rule`` and ``@register_pattern`` (see ``examples/dilated_window.py``).
"""

from .base import (
    KERNEL_BLOCK,
    Component,
    HeadGroup,
    LayerContext,
    Pattern,
    _grid,
    band_layout,
    causal_layout,
    derived_head_groups,
    grouped_causal_layout,
    param,
    rule_block_layout,
    strided_orig_layout,
)
from .block_layout import BlockLayout, load_layout  # noqa: E402

# Built-in patterns register themselves on import.
from .dense import Dense  # noqa: E402  (isort: after the registry)
from .fixed import Fixed  # noqa: E402
from .linear import Linear  # noqa: E402
from .local import Local  # noqa: E402
from .registry import PATTERNS, get_pattern, listing, load_plugin, make_pattern, param_owners, register_pattern
from .sink_window import SinkWindow  # noqa: E402
from .strided import Strided  # noqa: E402


def build_pattern(attn_cfg, layer_idx: int, n_layer: int, n_head: int, context: int | None = None) -> Pattern:
    """The pattern that layer ``layer_idx`` of ``n_layer`` uses, from an attention config (``layer_spec``)."""
    spec, where = attn_cfg.layer_spec(layer_idx)
    return make_pattern(spec, LayerContext(layer_idx, n_layer, n_head, context), where)


__all__ = [
    "KERNEL_BLOCK",
    "Component",
    "HeadGroup",
    "LayerContext",
    "Pattern",
    "_grid",
    "band_layout",
    "causal_layout",
    "derived_head_groups",
    "grouped_causal_layout",
    "param",
    "rule_block_layout",
    "strided_orig_layout",
    "PATTERNS",
    "get_pattern",
    "listing",
    "load_plugin",
    "make_pattern",
    "param_owners",
    "register_pattern",
    "Dense",
    "Local",
    "Strided",
    "Fixed",
    "SinkWindow",
    "BlockLayout",
    "load_layout",
    "Linear",
    "build_pattern",
]
