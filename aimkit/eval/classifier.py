"""A small CNN that classifies procedural shapes images; its features drive the quality metric.

Architecture: four blocks of ``conv3x3 -> BatchNorm -> ReLU -> maxpool2`` (16 -> 32 -> 64 -> 128
channels; 64 px -> 4 px), global average pooling to a 128-d feature, and a linear layer to the
36 class logits. About 100k parameters (~400 KB as float32 safetensors).

Training (:func:`train_classifier`) draws a fresh batch from the procedural generator at every
step: step ``t`` uses items ``[t * B, (t + 1) * B)`` of ``ShapesDataset(.., seed)``. Held-out
evaluation (:func:`evaluate_accuracy`) uses the stream of :data:`HELDOUT_SEED`, disjoint from
the training stream as long as the training seed differs from it (enforced).

Weights are stored as safetensors with the config in the file's metadata, so
:func:`load_classifier` needs nothing but the file.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import config_from_dict, config_to_dict
from ..data.shapes import NUM_CLASSES, make_batch
from ..errors import CheckpointError, ConfigError

__all__ = [
    "HELDOUT_SEED",
    "ClassifierConfig",
    "ShapesClassifier",
    "classifier_from_bytes",
    "evaluate_accuracy",
    "load_classifier",
    "save_classifier",
    "train_classifier",
]

HELDOUT_SEED = 1_000_003  # image stream for held-out accuracy; never used for training
_FORMAT = "aimkit.shapes_classifier/1"


@dataclass(frozen=True)
class ClassifierConfig:
    """Shape of a :class:`ShapesClassifier`.

    Attributes:
        in_channels: Image channels.
        widths: Output channels of the conv blocks; each block halves the resolution.
        num_classes: Number of logits.
        image_size: Resolution the classifier was trained at; other sizes are resized to it.
    """

    in_channels: int = 3  # RGB
    widths: tuple[int, ...] = (16, 32, 64, 128)  # last width is the feature size
    num_classes: int = NUM_CLASSES  # 6 shapes x 6 colours
    image_size: int = 64  # training resolution

    def __post_init__(self) -> None:
        if not self.widths or any(int(w) <= 0 for w in self.widths):
            raise ConfigError(f"widths must be a non-empty tuple of positive ints, got {self.widths}")
        if self.image_size < 2 ** len(self.widths):
            raise ConfigError(f"image_size {self.image_size} too small for {len(self.widths)} blocks")


def _conv_block(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class ShapesClassifier(nn.Module):
    """CNN classifier for shapes images in [-1, 1].

    Args:
        config: Architecture; defaults to :class:`ClassifierConfig()`.
    """

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config or ClassifierConfig()
        channels = (self.config.in_channels,) + tuple(self.config.widths)
        self.blocks = nn.Sequential(*[_conv_block(a, b) for a, b in itertools.pairwise(channels)])
        self.head = nn.Linear(channels[-1], self.config.num_classes)

    @property
    def feature_dim(self) -> int:
        """Size F of :meth:`features`."""
        return self.config.widths[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features.

        Args:
            x: (B, 3, H, W) images in [-1, 1]; resized to ``config.image_size`` if needed.

        Returns:
            (B, F) features, F = ``config.widths[-1]``.
        """
        size = self.config.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        h = self.blocks(x)  # (B, F, H / 2^n, W / 2^n)
        return h.mean(dim=(2, 3))  # (B, F)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes) for images (B, 3, H, W) in [-1, 1]."""
        return self.head(self.features(x))


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mild, seeded corruptions (blur, noise) so the classifier tolerates decoder artefacts.

    Args:
        x: (B, 3, H, W) images in [-1, 1].

    Returns:
        (B, 3, H, W) images, about half of them corrupted.
    """
    b = x.shape[0]
    blur = torch.rand(b, 1, 1, 1, generator=generator) < 0.3
    blurred = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    x = torch.where(blur, 0.5 * (x + blurred), x)
    sigma = torch.rand(b, 1, 1, 1, generator=generator) * 0.1
    noisy = torch.rand(b, 1, 1, 1, generator=generator) < 0.3
    noise = torch.randn(x.shape, generator=generator) * sigma
    return torch.where(noisy, x + noise, x).clamp_(-1.0, 1.0)


def _warmup_cosine(step: int, steps: int, peak: float) -> float:
    """Learning rate at ``step`` of ``steps``: a linear warm-up to ``peak`` over the first 5% of the
    steps, then a cosine decay to zero."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def _train_step(
    model: ShapesClassifier, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor, lr: float
) -> tuple[float, int]:
    """One optimizer step at learning rate ``lr`` on (B, 3, H, W) images and (B,) labels.

    Returns:
        ``(loss summed over the batch, correctly classified images)``.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    logits = model(images)  # (B, num_classes)
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item() * images.shape[0], (logits.argmax(dim=1) == labels).sum().item()


def train_classifier(
    steps: int = 800,
    batch_size: int = 64,
    seed: int = 0,
    lr: float = 3e-3,
    device: str | torch.device = "cpu",
    config: ClassifierConfig | None = None,
    log_every: int = 50,
    augment: bool = True,
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> tuple[ShapesClassifier, list[dict[str, float]]]:
    """Train a classifier on an endless stream of freshly rendered images.

    The learning rate warms up linearly over the first 5% of steps, then follows a cosine
    decay to zero (AdamW, weight decay 1e-4). Everything is determined by ``seed``.

    Args:
        steps: Optimizer steps.
        batch_size: Images per step.
        seed: Seed of the training image stream and of initialisation/augmentation.
        lr: Peak learning rate.
        device: Where to train.
        config: Architecture; defaults to :class:`ClassifierConfig()`.
        log_every: Record the running loss/accuracy every this many steps.
        augment: Apply mild blur/noise corruptions (see :func:`_augment`).
        on_log: Called with each history record as it is made (e.g. to print progress).

    Returns:
        ``(model, history)``: the trained model in eval mode, and a list of
        ``{"step", "loss", "accuracy", "lr", "elapsed_s"}`` records (running means since the
        previous record).
    """
    if steps <= 0 or batch_size <= 0:
        raise ConfigError(f"steps and batch_size must be positive, got {steps}, {batch_size}")
    if seed == HELDOUT_SEED:
        raise ConfigError(f"seed {seed} is reserved for held-out evaluation (HELDOUT_SEED)")
    torch.manual_seed(seed)
    model = ShapesClassifier(config).to(device)
    size = model.config.image_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    loss_sum, correct, seen = 0.0, 0, 0
    start_time = time.perf_counter()
    model.train()
    for step in range(steps):
        images, labels = make_batch(batch_size, seed, image_size=size, start=step * batch_size)
        if augment:
            images = _augment(images, generator)
        step_lr = _warmup_cosine(step, steps, lr)
        batch_loss, batch_correct = _train_step(model, optimizer, images.to(device), labels.to(device), step_lr)
        loss_sum += batch_loss
        correct += batch_correct
        seen += batch_size
        if (step + 1) % log_every == 0 or step + 1 == steps:
            record = {
                "step": step + 1,
                "loss": loss_sum / seen,
                "accuracy": correct / seen,
                "lr": step_lr,
                "elapsed_s": time.perf_counter() - start_time,
            }
            history.append(record)
            if on_log is not None:
                on_log(record)
            loss_sum, correct, seen = 0.0, 0, 0
    return model.eval(), history


@torch.no_grad()
def evaluate_accuracy(
    model: ShapesClassifier,
    num_images: int = 2000,
    seed: int = HELDOUT_SEED,
    batch_size: int = 250,
) -> float:
    """Top-1 accuracy on freshly rendered images (balanced labels).

    Args:
        model: A classifier; evaluated in eval mode (its mode is restored afterwards).
        num_images: Number of images.
        seed: Image stream; the default is disjoint from every training stream.
        batch_size: Images per forward pass.

    Returns:
        Fraction of images whose argmax logit equals their label.
    """
    if num_images <= 0:
        raise ConfigError(f"num_images must be positive, got {num_images}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, num_images, batch_size):
        n = min(batch_size, num_images - start)
        images, labels = make_batch(n, seed, image_size=model.config.image_size, start=start)
        predictions = model(images.to(device)).argmax(dim=1).cpu()
        correct += (predictions == labels).sum().item()
    model.train(was_training)
    return correct / num_images


def save_classifier(model: ShapesClassifier, path: str | Path) -> Path:
    """Write weights and config to a safetensors file, atomically: the file at ``path`` is the old
    one or the new one, never a partial write (see :func:`aimkit.weights.save_safetensors_atomic`).

    Args:
        model: The classifier.
        path: Destination file (parent directories are created).

    Returns:
        The path written.
    """
    from ..weights import save_safetensors_atomic

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": _FORMAT, "config": json.dumps(config_to_dict(model.config))}
    return save_safetensors_atomic(tensors, path, metadata=metadata)


def _read_metadata(data: bytes, source: str) -> dict[str, str]:
    """The ``__metadata__`` dict of a safetensors blob (header: u64 length + JSON)."""
    try:
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{source} is not a safetensors file: {exc}") from exc
    return header.get("__metadata__") or {}


def classifier_from_bytes(data: bytes, source: str = "<bytes>") -> ShapesClassifier:
    """Build a classifier from the bytes of a file written by :func:`save_classifier`.

    Args:
        data: File contents.
        source: Name used in error messages.

    Returns:
        The classifier in eval mode on the CPU.

    Raises:
        CheckpointError: Not a classifier file, or tensors do not fit (strict loading).
    """
    from safetensors.torch import load as load_safetensors

    metadata = _read_metadata(data, source)
    if metadata.get("format") != _FORMAT:
        raise CheckpointError(
            f"{source} is not an aimkit shapes classifier (format {metadata.get('format')!r}, expected {_FORMAT!r})"
        )
    try:
        config = config_from_dict(ClassifierConfig, json.loads(metadata["config"]), "classifier config")
        tensors = load_safetensors(data)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"cannot read {source}: {exc}") from exc
    model = ShapesClassifier(config)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"tensors in {source} do not fit ShapesClassifier: {exc}") from exc
    return model.eval()


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> ShapesClassifier:
    """Load a classifier saved by :func:`save_classifier`.

    Args:
        path: The safetensors file.
        device: Where to put the model.

    Returns:
        The classifier in eval mode.

    Raises:
        CheckpointError: The file is missing, unreadable or does not fit.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"classifier weights not found: {path}")
    return classifier_from_bytes(path.read_bytes(), str(path)).to(device)
