"""Sequence backbones: the block stack with its inference-cache contract (see :mod:`.base`)."""

from .base import Backbone, Block, InferenceParams, modulate

__all__ = ["Backbone", "Block", "InferenceParams", "modulate"]
