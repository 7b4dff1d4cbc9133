"""Class-label embedding with a learned "null" class for classifier-free guidance."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ClassEmbedder"]


class ClassEmbedder(nn.Module):
    """Embeds labels; row ``num_classes`` of the table is the null (unconditional) class.

    During training (``self.training``) each label is replaced by the null class with probability
    ``dropout_prob``. In eval mode labels are never dropped (the official AiM forward drops them even
    in eval mode; aimkit does not).

    Args:
        num_classes: number of real classes C (the table has C + 1 rows).
        d_model: embedding width D.
        dropout_prob: label dropout probability during training.
    """

    def __init__(self, num_classes: int, d_model: int, dropout_prob: float = 0.1, device=None, dtype=None):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, d_model, device=device, dtype=dtype)

    @property
    def null_class(self) -> int:
        """Index of the unconditional class."""
        return self.num_classes

    def forward(self, labels: Tensor, force_drop: Tensor | None = None) -> Tensor:
        """labels (B,) int64 -> (B, D). ``force_drop`` (B,) bool replaces chosen labels by the null class."""
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        if force_drop is not None:
            labels = torch.where(force_drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)
