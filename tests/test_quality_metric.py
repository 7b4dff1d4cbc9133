"""Tests of the Fréchet distance, the shipped shapes classifier and the quality report."""

import numpy as np
import pytest
import torch

from aimkit.data.shapes import NUM_CLASSES, make_batch
from aimkit.errors import CheckpointError, ConfigError
from aimkit.eval import frechet as frechet_module
from aimkit.eval.classifier import (
    ClassifierConfig,
    ShapesClassifier,
    load_classifier,
    save_classifier,
)
from aimkit.eval.frechet import feature_statistics, frechet_distance
from aimkit.eval.quality import QualityReport, evaluate_generated, load_default_classifier

TEST_SEED = 777  # an image stream used neither for training nor by the metric's defaults


def _random_spd(rng, dim, rank=None):
    a = rng.standard_normal((dim, rank or dim))
    return a @ a.T / dim + (0.0 if rank else 0.1) * np.eye(dim)


# --- Fréchet distance ---------------------------------------------------------------------------


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    var1, var2 = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    got = frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_frechet_of_sampled_gaussians_matches_independent_formula():
    rng = np.random.default_rng(1)
    dim = 8
    mean1, mean2 = rng.standard_normal(dim), rng.standard_normal(dim)
    cov1, cov2 = _random_spd(rng, dim), _random_spd(rng, dim)
    x1 = rng.multivariate_normal(mean1, cov1, size=20000)
    x2 = rng.multivariate_normal(mean2, cov2, size=20000)
    mu1, s1 = feature_statistics(x1)
    mu2, s2 = feature_statistics(torch.from_numpy(x2))  # tensors are accepted too
    assert mu1.dtype == s1.dtype == np.float64 and s1.shape == (dim, dim)

    # Independent route: Tr((S1 S2)^1/2) = sum sqrt(eig(L1^T S2 L1)), L1 the Cholesky factor.
    chol = np.linalg.cholesky(s1)
    eig = np.linalg.eigvalsh(chol.T @ s2 @ chol)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(eig))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)

    # And the estimate is close to the population value.
    chol_pop = np.linalg.cholesky(cov1)
    eig_pop = np.linalg.eigvalsh(chol_pop.T @ cov2 @ chol_pop)
    population = np.sum((mean1 - mean2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * np.sum(np.sqrt(eig_pop))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(population, rel=0.05)


def test_frechet_identical_statistics_is_zero():
    rng = np.random.default_rng(2)
    mu, sigma = feature_statistics(rng.standard_normal((500, 16)))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_eigh_route_agrees_with_scipy_route_including_singular_covariances():
    rng = np.random.default_rng(3)
    for rank in (None, 3):  # full rank, then rank-deficient (near-singular product)
        s1, s2 = _random_spd(rng, 10, rank), _random_spd(rng, 10, rank)
        via_eigh = frechet_module._trace_sqrt_product_eigh(s1, s2)
        via_scipy = frechet_module._trace_sqrt_product_scipy(s1, s2, eps=1e-6)
        assert via_scipy == pytest.approx(via_eigh, rel=1e-4, abs=1e-4)
    assert frechet_distance(np.zeros(10), s1, np.zeros(10), s1) < 1e-4


def test_frechet_rejects_bad_shapes():
    with pytest.raises(ConfigError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ConfigError):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ConfigError):
        feature_statistics(np.zeros((1, 4)))


# --- classifier -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier():
    torch.set_num_threads(1)
    return load_default_classifier()


def test_shipped_classifier_accuracy(classifier):
    images, labels = make_batch(200, seed=TEST_SEED)
    with torch.no_grad():
        logits = classifier(images)
        features = classifier.features(images)
    assert logits.shape == (200, NUM_CLASSES) and features.shape == (200, classifier.feature_dim)
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.95, accuracy


def test_save_load_roundtrip_and_errors(tmp_path):
    model = ShapesClassifier(ClassifierConfig(widths=(4, 8)))
    path = save_classifier(model, tmp_path / "c.safetensors")
    loaded = load_classifier(path)
    assert loaded.config == model.config
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(loaded(x), model.eval()(x))
    with pytest.raises(CheckpointError, match="not found"):
        load_classifier(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError):
        load_classifier(tmp_path / "other.safetensors")


# --- quality report ---------------------------------------------------------------------------


def test_evaluate_generated_real_vs_noise(classifier):
    n = 216  # six images per class
    real, labels = make_batch(n, seed=TEST_SEED)
    report_real = evaluate_generated(real, labels, classifier=classifier)
    assert isinstance(report_real, QualityReport) and report_real.num_images == n
    assert report_real.conditional_accuracy >= 0.95
    assert report_real.classifier_accuracy_real >= 0.95

    noise = torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    report_noise = evaluate_generated(noise, labels, classifier=classifier)
    assert report_noise.conditional_accuracy <= 0.15  # chance is 1/36
    assert report_noise.frechet_distance > 20 * max(report_real.frechet_distance, 1e-3)
    print(f"\n[quality] real: {report_real}\n[quality] noise: {report_noise}")


def test_evaluate_generated_validates_inputs(classifier):
    images, labels = make_batch(4, seed=TEST_SEED)
    with pytest.raises(ConfigError):
        evaluate_generated(images, labels[:3], classifier=classifier)
    with pytest.raises(ConfigError):
        evaluate_generated(images[:, :2], labels, classifier=classifier)
    report = evaluate_generated(images, labels, classifier=classifier, num_real=8)
    assert report.num_real == 8
