"""JSON that every reader accepts: NaN and Infinity (which Python's json writes by default) become null.

A dict that had such a value gets ``null_reasons``: for each nulled key (dotted
for nested ones) why it is null, either the reason the caller gave or the
value it replaced ("nan", "inf", "-inf").
"""

from __future__ import annotations

import json
import math


def finite(obj, reasons: dict[str, str] | None = None):
    """``obj`` with every non-finite float replaced by None; see the module docstring for ``null_reasons``."""
    nulled: dict[str, str] = {}
    out = _walk(obj, "", nulled)
    if nulled and isinstance(out, dict):
        given = reasons or {}
        out["null_reasons"] = {**out.get("null_reasons", {}), **{k: given.get(k, v) for k, v in nulled.items()}}
    return out


def _walk(obj, where: str, nulled: dict[str, str]):
    if isinstance(obj, float) and not math.isfinite(obj):
        nulled[where or "value"] = str(obj)
        return None
    if isinstance(obj, dict):
        return {k: _walk(v, f"{where}.{k}" if where else str(k), nulled) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_walk(v, f"{where}[{i}]", nulled) for i, v in enumerate(obj)]
    return obj


def dumps(obj, reasons: dict[str, str] | None = None, **kw) -> str:
    """``json.dumps`` of ``finite(obj)``; it can never write NaN or Infinity."""
    return json.dumps(finite(obj, reasons), allow_nan=False, **kw)
