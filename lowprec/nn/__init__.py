"""Precision-aware layers: drop-in replacements for nn.Linear and nn.Embedding."""

from .embedding import QEmbedding
from .linear import QLinear

__all__ = ["QLinear", "QEmbedding"]
