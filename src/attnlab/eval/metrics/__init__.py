"""Scoring a split exactly once per token (``scoring``) and drawing loss curves from a run's events (``curves``)."""

from .scoring import LN2, Score, image_metrics, score_images, score_tokens, text_metrics

__all__ = ["LN2", "Score", "image_metrics", "score_images", "score_tokens", "text_metrics"]
