"""Generation: the cached sampling loop (``loop``), the logit filters and sampling settings (``filters``),
and image samples, completions and grids (``image_samples``)."""

from .filters import SamplingConfig
from .loop import TextStreamer, generate, sample_text

__all__ = ["SamplingConfig", "TextStreamer", "generate", "sample_text"]
