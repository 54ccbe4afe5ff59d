"""The GPT model and its embeddings."""

from .embeddings import (
    LearnedPositionalEmbedding,
    Rotary,
    SinusoidalPositionalEmbedding,
    apply_rotary,
    build_positional,
    sinusoidal_table,
)
from .gpt import GPT, MLP, Block, SelfAttention, mlp_hidden

__all__ = [
    "GPT",
    "Block",
    "MLP",
    "SelfAttention",
    "mlp_hidden",
    "LearnedPositionalEmbedding",
    "SinusoidalPositionalEmbedding",
    "Rotary",
    "apply_rotary",
    "build_positional",
    "sinusoidal_table",
]
