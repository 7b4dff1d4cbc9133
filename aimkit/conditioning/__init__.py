"""Conditioning: class embedding and the adaLN kinds (per-layer, grouped, single)."""

from .adaln import AdaLN, AdaLNGroup, AdaLNSingle, InexactConversionError
from .label import ClassEmbedder

__all__ = ["AdaLN", "AdaLNGroup", "AdaLNSingle", "ClassEmbedder", "InexactConversionError"]
