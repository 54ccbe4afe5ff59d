"""Evaluating trained models, by purpose.

- ``metrics``: scoring a split (bits/byte, bits/dim, nats/token) and loss curves.
- ``generation``: the sampling loop with KV caches, the logit filters, image samples and grids.
- ``inspection``: attention maps, attention statistics, the logit lens, pattern pictures.
- ``report``: the offline comparison page of finished runs.

The functions used most from Python are importable from here.
"""

from .generation.filters import SamplingConfig
from .generation.image_samples import complete_images, sample_images
from .generation.loop import generate, sample_text
from .metrics.scoring import image_metrics, score_images, score_tokens, text_metrics

__all__ = [
    "SamplingConfig",
    "complete_images",
    "generate",
    "image_metrics",
    "sample_images",
    "sample_text",
    "score_images",
    "score_tokens",
    "text_metrics",
]
