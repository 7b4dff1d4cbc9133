"""Conditioning: class embedding, the adaLN kinds (per-layer, grouped, single) and the class token."""

from .adaln import AdaLN, AdaLNGroup, AdaLNSingle, InexactConversionError
from .class_token import ClassToken
from .label import ClassEmbedder

__all__ = ["AdaLN", "AdaLNGroup", "AdaLNSingle", "ClassEmbedder", "ClassToken", "InexactConversionError"]
