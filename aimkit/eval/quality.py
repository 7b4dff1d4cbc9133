"""Quality of class-conditional samples of the shapes dataset.

Two numbers, both computed with the shipped shapes classifier (:mod:`aimkit.eval.classifier`):

* conditional accuracy: the fraction of generated images that the classifier assigns to the
  class they were generated for (chance is 1/36);
* Fréchet distance between the classifier's 128-d features of the generated images and of
  freshly rendered real images with the same label distribution (an FID computed in the
  feature space of a domain-specific network; 0 for identical distributions).

Example:
    >>> images, labels = generator_samples()           # (N, 3, 64, 64) in [-1, 1], (N,)
    >>> report = evaluate_generated(images, labels)
    >>> report.conditional_accuracy, report.frechet_distance
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import torch

from ..data.shapes import make_batch
from ..errors import CheckpointError, ConfigError
from .classifier import ShapesClassifier, classifier_from_bytes
from .frechet import feature_statistics, frechet_distance

__all__ = ["DEFAULT_CLASSIFIER_FILE", "REAL_SEED", "QualityReport", "evaluate_generated", "load_default_classifier"]

REAL_SEED = 2_000_003  # image stream of the real reference images; disjoint from training/held-out
DEFAULT_CLASSIFIER_FILE = "shapes_classifier.safetensors"  # inside the aimkit/assets package data


@dataclass(frozen=True)
class QualityReport:
    """Result of :func:`evaluate_generated`.

    Attributes:
        conditional_accuracy: Fraction of generated images classified as their label.
        frechet_distance: Fréchet distance between generated and real classifier features.
        num_images: Number of generated images.
        classifier_accuracy_real: Classifier accuracy on the real reference images (a ceiling
            for ``conditional_accuracy``; should be ~1).
        num_real: Number of real reference images.
    """

    conditional_accuracy: float
    frechet_distance: float
    num_images: int
    classifier_accuracy_real: float
    num_real: int = 0


def load_default_classifier(device: str | torch.device = "cpu") -> ShapesClassifier:
    """Load the classifier shipped in ``aimkit/assets`` (works from an installed wheel).

    Args:
        device: Where to put the model.

    Returns:
        The classifier in eval mode.

    Raises:
        CheckpointError: The packaged weights are missing or unreadable.
    """
    resource = resources.files("aimkit").joinpath("assets", DEFAULT_CLASSIFIER_FILE)
    if not resource.is_file():
        raise CheckpointError(
            f"the packaged shapes classifier is missing ({resource}); reinstall aimkit or train one "
            "with recipes/train_shapes_classifier.py"
        )
    return classifier_from_bytes(resource.read_bytes(), f"aimkit/assets/{DEFAULT_CLASSIFIER_FILE}").to(device)


@torch.no_grad()
def _features_and_predictions(
    classifier: ShapesClassifier, images: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, F) float64 and predicted labels (N,) on the CPU."""
    device = next(classifier.parameters()).device
    feats, preds = [], []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device=device, dtype=torch.float32)
        f = classifier.features(x)  # (b, F)
        feats.append(f.double().cpu())
        preds.append(classifier.head(f).argmax(dim=1).cpu())
    return torch.cat(feats), torch.cat(preds)


def evaluate_generated(
    images: torch.Tensor,
    labels: torch.Tensor,
    classifier: ShapesClassifier | None = None,
    real_seed: int = REAL_SEED,
    num_real: int | None = None,
    batch_size: int = 250,
) -> QualityReport:
    """Score generated images against their conditioning labels and against real images.

    Args:
        images: (N, 3, H, W) generated images in [-1, 1]; N >= 2.
        labels: (N,) class each image was generated for.
        classifier: Defaults to :func:`load_default_classifier`.
        real_seed: Image stream of the real reference images.
        num_real: Number of real images (default N). Their labels repeat ``labels`` cyclically,
            so the label distribution matches exactly when ``num_real`` is a multiple of N.
        batch_size: Images per classifier forward pass.

    Returns:
        A :class:`QualityReport`.
    """
    images = torch.as_tensor(images)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ConfigError(f"images must have shape (N, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():  # uint8 pixels would be scored as if in [-1, 1]
        raise ConfigError(f"images must be float in [-1, 1] (generate(output='tensor')), got {images.dtype}; "
                          "convert uint8 pixels with x.float() / 127.5 - 1")
    labels = torch.as_tensor(labels).reshape(-1).long().cpu()
    n = images.shape[0]
    if labels.shape[0] != n:
        raise ConfigError(f"got {n} images but {labels.shape[0]} labels")
    if n < 2:
        raise ConfigError("need at least 2 generated images for a Fréchet distance")
    num_real = n if num_real is None else int(num_real)
    if num_real < 2:
        raise ConfigError(f"num_real must be >= 2, got {num_real}")
    if images.shape[-1] != images.shape[-2]:
        raise ConfigError(f"images must be square, got {tuple(images.shape[-2:])}")

    model = classifier if classifier is not None else load_default_classifier()
    was_training = model.training
    model.eval()
    try:
        gen_features, gen_preds = _features_and_predictions(model, images, batch_size)
        real_labels = labels[torch.arange(num_real) % n]
        real_images, _ = make_batch(num_real, real_seed, image_size=images.shape[-1], labels=real_labels)
        real_features, real_preds = _features_and_predictions(model, real_images, batch_size)
    finally:
        model.train(was_training)

    distance = frechet_distance(*feature_statistics(gen_features), *feature_statistics(real_features))
    return QualityReport(
        conditional_accuracy=(gen_preds == labels).double().mean().item(),
        frechet_distance=distance,
        num_images=n,
        classifier_accuracy_real=(real_preds == real_labels).double().mean().item(),
        num_real=num_real,
    )
