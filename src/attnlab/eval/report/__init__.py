"""``attnlab report``: loading runs (``run_data``), seed statistics (``stats``), figures (``figures``),
HTML/Markdown rendering (``render``) and the page itself (``build``)."""

from .build import build_report

__all__ = ["build_report"]
