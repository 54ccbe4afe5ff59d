"""The pattern zoo: parameter sets for every registered attention pattern (plugins in examples/ included).

Backend, cache, causality, viz and statistics tests are parametrised from ``ZOO``; ``test_zoo`` fails
when a registered pattern has no entry here. Parameters are chosen to be sparse at ``CONTEXT`` tokens
with ``N_HEAD`` heads, and valid for any context that ``STRIDE`` divides.
"""

from pathlib import Path

import numpy as np
import torch

from attnlab.attention.documents import documents
from attnlab.attention.patterns import LayerContext, load_plugin, make_pattern

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = [str(ROOT / "examples" / "dilated_window.py")]
for _plugin in PLUGINS:
    load_plugin(_plugin)

CONTEXT, N_HEAD, STRIDE = 24, 4, 8

ZOO: dict[str, dict] = {
    "dense": {"pattern": "dense"},
    "local": {"pattern": "local", "window": 5},
    "strided_split": {"pattern": "strided", "local_attn_ctx": 4, "strided_mode": "split"},
    "strided_interleave": {"pattern": "strided", "local_attn_ctx": 4, "strided_mode": "interleave"},
    "strided_union": {"pattern": "strided", "local_attn_ctx": 4, "strided_mode": "union"},
    "fixed_v1": {"pattern": "fixed", "local_attn_ctx": 8, "blocksize": 2, "vertsize": 1, "num_verts": 1},
    "fixed_v2": {"pattern": "fixed", "local_attn_ctx": 8, "blocksize": 2, "vertsize": 1, "num_verts": 2},
    "sink_window": {"pattern": "sink_window", "sinks": 2, "window": 5},
    "block_layout": {"pattern": "block_layout", "layout_block": 4},
    "linear": {"pattern": "linear"},
    "dilated_window": {"pattern": "dilated_window", "window": 3, "dilation": 2},
}
SOFTMAX = [k for k in ZOO if k != "linear"]

# Score modifiers, each composable with every softmax pattern above.
MODIFIER_ZOO: dict[str, list[str]] = {
    "alibi": ["alibi"],
    "softcap": ["softcap(cap=2)"],
    "relpos": ["relpos(buckets=8,max_distance=20)"],
}


def document_ids(T: int, seed: int = 0) -> torch.Tensor:
    """Document ids [2, T] for document-masking checks: a row that starts with <eos> (id 0) and is cut by more,
    one of them right after another, and a row that is one document longer than T."""
    idx = torch.randint(1, 9, (2, T), generator=torch.Generator().manual_seed(seed))
    cuts = [0, *torch.randint(1, T, (max(1, T // 8),), generator=torch.Generator().manual_seed(seed + 1)).tolist()]
    idx[0, cuts] = 0
    idx[0, min(cuts[-1] + 1, T - 1)] = 0
    return documents(idx, 0).ids


def layout_file(folder: Path, context: int = 192, block: int = 4, n_head: int = N_HEAD) -> str:
    """A random per-head block layout covering ``context`` tokens (the diagonal kept, so no query is empty)."""
    nb = -(-context // block)
    layout = (np.random.default_rng(0).random((n_head, nb, nb)) < 0.5) | np.eye(nb, dtype=bool)
    path = Path(folder) / f"layout-{nb}-{n_head}.npy"
    np.save(path, layout)
    return str(path)


def spec(label: str, folder: Path | None = None) -> dict:
    """The zoo entry as an attention spec; block_layout gets a layout file written into ``folder``."""
    s = dict(ZOO[label])
    if s["pattern"] == "block_layout":
        s["layout"] = layout_file(folder, block=s["layout_block"])
    return s


def attention_kwargs(label: str, folder: Path | None = None) -> dict:
    """Keyword arguments of ``AttentionConfig`` for the zoo entry (plugins included)."""
    return {**spec(label, folder), "plugins": PLUGINS}


def pattern(label: str, folder: Path | None = None, n_head: int = N_HEAD, layer_idx: int = 0):
    return make_pattern(spec(label, folder), LayerContext(layer_idx, 2, n_head, None))
