"""Seeing inside a model: attention maps (``attention_maps``), per-head attention statistics
(``attention_stats``), the logit lens (``logit_lens``), pattern pictures (``pattern_viz``) and what the
``viz`` commands share (``viz_inputs``)."""
