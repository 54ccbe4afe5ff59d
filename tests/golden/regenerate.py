"""Retrain the golden loss curves and rewrite tests/golden/<name>.json on purpose.

    python tests/golden/regenerate.py                 # both curves
    python tests/golden/regenerate.py strided         # one curve
    python tests/golden/regenerate.py --check         # only print what moved, write nothing

Run it when a change is meant to alter training numbers (a new init, a fixed bug), and commit
the JSON files with that change; the summary it prints belongs in the commit message.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from curves import SPECS, differences, golden_path, load, record  # noqa: E402


def summarize(name: str, old: dict | None, new: dict) -> str:
    if old is None:
        return f"{name}: new golden file, {len(new['losses'])} losses, final loss {new['losses'][-1]:.6f}"
    moved = differences(old, new, rtol=0.0)
    if not moved:
        return f"{name}: unchanged"
    worst = max((abs(b - a) / abs(a) for a, b in zip(old["losses"], new["losses"])), default=0.0)
    lines = [f"{name}: {len(moved)} value(s) changed, largest relative loss change {worst:.2e}"]
    lines += [f"  {m}" for m in moved[:5]] + ([f"  ... {len(moved) - 5} more"] if len(moved) > 5 else [])
    if old.get("torch") != new["torch"]:
        lines.append(f"  torch {old.get('torch')} -> {new['torch']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"curves to regenerate: {', '.join(SPECS)} (default: all)")
    ap.add_argument("--check", action="store_true", help="print the differences, write nothing")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.names) - set(SPECS))
    if unknown:
        ap.error(f"unknown golden curve(s) {', '.join(unknown)}: choose from {', '.join(SPECS)}")
    for name in args.names or list(SPECS):
        path = golden_path(name)
        old = load(name) if path.exists() else None
        new = record(name)
        print(summarize(name, old, new))
        if not args.check:
            path.write_text(json.dumps(new, indent=1) + "\n", encoding="utf-8")
            print(f"  wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
