"""attnlab: a bench for GPT-style transformers with pluggable attention.

``attnlab.load(run_dir)`` and ``attnlab.train(config, **overrides)`` are the Python API (``attnlab.api``);
they are imported on first use, so ``import attnlab`` stays light (no torch).
"""

__version__ = "0.1.0"

__all__ = ["Run", "__version__", "load", "train"]


def __getattr__(name: str):
    if name in ("load", "Run", "train"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'attnlab' has no attribute {name!r}")
