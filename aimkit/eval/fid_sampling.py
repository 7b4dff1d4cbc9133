"""Sampling many images for FID into resumable shards, then one ADM-layout ``.npz``.

The ``num`` images are cut into global shards of ``shard_size`` images. Everything about a
shard is fixed by its index ``s`` alone: its label slice, and the seed of each of its batches
(derived from ``(seed, s, batch)``). Process ``p`` of ``P`` generates the shards
``s ≡ p (mod P)``, so the packed result is the same whatever the number of processes, and a
shard that is already on disk (and verified) is never generated again (the shard folder:
:mod:`aimkit.eval._fid_shards`).

Every file is written atomically (temporary file, fsync, rename), so an interrupted run loses
only the shards in flight. Each shard's record is written by the process that wrote the shard,
right after it, so processes never write the same file. A shard counts as done only when it
matches its record (size, SHA-256, the run it belongs to, its index, count, and labels equal to the
planned labels of that shard); on a rerun a shard that does not is generated again (one line says
why), and :func:`pack_npz` refuses to pack one. Shard files, records, the manifest and label files
are read without executing anything (``np.load(allow_pickle=False)``, JSON).

:func:`pack_npz` concatenates the shards in order into the layout of the ADM evaluator
(``openai/guided-diffusion`` ``evaluations/``): ``arr_0`` (N, H, W, 3) uint8 images and ``arr_1``
(N,) int64 labels, streamed so that 50,000 images never sit in memory at once. The archive's
bytes depend only on the images and labels (fixed zip timestamps), so an interrupted and resumed
run packs a file bit-identical to an uninterrupted one.

:func:`sample_to_shards` and :func:`pack_npz` hold :class:`~aimkit._lock.FolderLock` on the shard
folder while they run (in process 0 only; with several processes the caller's main process holds it
for the whole run, see ``aimkit sample``), so a second run into the same folder is refused at once.

This module is the public entry: :func:`sample_to_shards` lives here, and the names of the plan
(``_fid_plan``: labels, seeds, shard partition), of the folder format (``_fid_shards``: manifest,
shard files, records, verification) and :func:`pack_npz` (``_fid_packing``) are re-exported.
``aimkit sample`` is the command line around it.

Example::

    model = aimkit.build("aim-xl", pretrained=True, device="cuda")
    sample_to_shards(model, "samples.shards", 50_000, labels="balanced", seed=0)
    pack_npz("samples.shards", "samples.npz")
"""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._lock import FolderLock
from ..errors import ConfigError
from ..samplers.api import progress_bar
from ._fid_packing import pack_npz
from ._fid_plan import (
    MAX_NUM,
    balanced_labels,
    check_num,
    is_int,
    num_shards,
    resolve_sample_labels,
    shard_seed,
    shards_of_process,
)
from ._fid_shards import (
    LABELS_NAME,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    PathLike,
    holding_lock,
    labels_digest,
    prepare_dir,
    record_name,
    run_digest,
    say,
    shard_name,
    verify_shard,
    write_shard,
)

__all__ = [
    "MANIFEST_NAME",
    "LABELS_NAME",
    "MAX_NUM",
    "ShardRun",
    "balanced_labels",
    "resolve_sample_labels",
    "shard_name",
    "record_name",
    "shard_seed",
    "num_shards",
    "shards_of_process",
    "verify_shard",
    "sample_to_shards",
    "pack_npz",
]

log = logging.getLogger(__name__)

_SAMPLING_KEYS = ("cfg_scale", "temperature", "top_k", "top_p")
_JSON_SCALARS = (bool, int, float, str, type(None))
_FINGERPRINT_ELEMENTS = 4096  # leading elements of every tensor that enter the weights fingerprint


def _as_uint8_nhwc(images: Any, count: int) -> np.ndarray:
    """The generator's ``output="uint8"`` result as a (count, H, W, 3) uint8 numpy array."""
    if torch.is_tensor(images):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != count or images.shape[-1] != 3:
        raise ConfigError(
            f"the generator returned {images.dtype} images of shape {images.shape}; "
            f"expected uint8 ({count}, H, W, 3)"
        )
    return np.ascontiguousarray(images)


@dataclass(frozen=True)
class ShardRun:
    """What one call of :func:`sample_to_shards` did in this process.

    Attributes:
        total_shards: global shards of the run (all processes).
        written: shards this process generated now.
        skipped: shards of this process already on disk.
        images: images generated now.
    """

    total_shards: int
    written: tuple[int, ...]
    skipped: tuple[int, ...]
    images: int


def _weights_fingerprint(model) -> str | None:
    """A cheap hash of a module's weights (names, shapes, dtypes, leading values of each tensor).

    Stored in the manifest so that resuming with other weights (a path overwritten with another
    checkpoint, say) is refused. None for objects that are not modules.
    """
    if not isinstance(model, torch.nn.Module):
        return None
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        head = tensor.detach().flatten()[:_FINGERPRINT_ELEMENTS].cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(head.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _sampling_settings(model, sampling: dict[str, Any]) -> dict[str, Any]:
    """The preset's FID settings (``model.config.fid_sampling``) overridden by non-None ``sampling``."""
    settings: dict[str, Any] = {}
    preset = getattr(getattr(model, "config", None), "fid_sampling", None)
    if preset is not None:
        settings.update({k: getattr(preset, k) for k in _SAMPLING_KEYS if hasattr(preset, k)})
    settings.update({k: v for k, v in sampling.items() if v is not None})
    if all(key in settings for key in ("cfg_scale", "temperature", "top_k", "top_p")):
        from ..samplers.logits import check_sampling_args  # before the manifest records a bad value

        check_sampling_args(*(settings[key] for key in ("cfg_scale", "temperature", "top_k", "top_p")))
    return settings


def _check_run_args(num, batch_size, shard_size, process_index, num_processes, seed, sampling) -> None:
    check_num(num)
    for name, value, low in (("batch_size", batch_size, 1), ("shard_size", shard_size, 1),
                             ("num_processes", num_processes, 1), ("seed", seed, 0)):
        if not is_int(value) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    if seed >= 2**63:
        raise ConfigError(f"seed must be below 2**63, got {seed}")
    if not is_int(process_index) or not 0 <= process_index < num_processes:
        raise ConfigError(f"process_index must be in [0, {num_processes}), got {process_index!r}")
    for key in ("output", "seed", "labels", "num_images", "progress", "batch_size"):
        if key in sampling:
            raise ConfigError(f"{key!r} is set by sample_to_shards and cannot be passed as a sampling option")


def _pending_shards(out_dir: Path, mine: list[int], run: str, labels: np.ndarray, num: int,
                    shard_size: int) -> list[int]:
    """This process's shards that are not verified done; each rejected file gets one line saying why."""
    pending = []
    for s in mine:
        shard_file, record_file = out_dir / shard_name(s), out_dir / record_name(s)
        if not shard_file.exists() and not record_file.exists():
            pending.append(s)
            continue
        why = verify_shard(out_dir, s, run, labels[s * shard_size:min((s + 1) * shard_size, num)])
        if why:
            say(f"{shard_name(s)} in {out_dir} is not usable ({why}); generating it again")
            pending.append(s)
    return pending


def _batch_plan(label_array: np.ndarray, pending: list[int], shard_size: int, num: int, batch_size: int,
                seed: int) -> list[tuple[int, np.ndarray, int]]:
    """``(shard, labels, seed)`` of every batch of the ``pending`` shards, in order."""
    plan = []
    for s in pending:
        labels = label_array[s * shard_size:min((s + 1) * shard_size, num)]
        plan += [(s, labels[b0:b0 + batch_size], shard_seed(seed, s, j))
                 for j, b0 in enumerate(range(0, len(labels), batch_size))]
    return plan


def _one_generate_per_batch(model, plan, settings, bar):
    """Each batch's uint8 images from one ``model.generate`` call (a model without
    ``generate_batches``); ``bar`` advances by token steps where that generate drives it, else by
    whole batches."""
    for _, labels, batch_seed in plan:
        done = bar.n + len(labels)
        images = model.generate(torch.from_numpy(labels.copy()), seed=batch_seed, output="uint8",
                                batch_size=len(labels), progress=False if bar.disable else bar, **settings)
        if bar.n < done:  # a generate that does not drive the bar
            bar.update(done - bar.n)
        bar.n = done
        yield images


def _shard_images(model, plan, settings, bar, between_batches):
    """``(shard, images)`` for each shard of ``plan`` in order. A generator's ``generate_batches``
    samples the batches as one stream (each decoded while the next samples); other models get one
    ``generate`` call per batch. ``between_batches()`` runs before each batch's images are taken
    (it raises a failed background write)."""
    stream = getattr(model, "generate_batches", None)
    if stream is not None:
        outputs = stream([(torch.from_numpy(labels.copy()), batch_seed) for _, labels, batch_seed in plan],
                         output="uint8", progress=False if bar.disable else bar, **settings)
    else:
        outputs = _one_generate_per_batch(model, plan, settings, bar)
    parts = []
    for i, (s, labels, _) in enumerate(plan):
        between_batches()
        parts.append(_as_uint8_nhwc(next(outputs), len(labels)))
        if i + 1 == len(plan) or plan[i + 1][0] != s:
            yield s, np.concatenate(parts)
            parts = []
    next(outputs, None)  # the stream's end: an error raised after the last batch still reaches the caller


class _BackgroundWrites:
    """Each shard written by one background thread while the next one is sampled.

    At most one write is in flight (about three shards in memory at the peak: the one being
    written, the next one's batches and their concatenation); a write's error is raised before the
    next batch (:meth:`raise_if_failed`), at the next :meth:`submit` or when the block ends.
    Leaving the block waits for the write in flight: every shard is written atomically with its
    record. When sampling fails or is interrupted, the shard whose last batch was already sampled
    is still handed over and written (:func:`~aimkit.samplers._decode_behind.outputs_in_order`),
    so a run loses only the shard it was sampling, which a resumed run generates again."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aimkit-shard-writer")
        self._pending: Future | None = None

    def submit(self, fn, *args) -> None:
        self.wait()
        self._pending = self._pool.submit(fn, *args)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def raise_if_failed(self) -> None:
        """Raise the error of a write that has already failed (between batches: no wait)."""
        if self._pending is not None and self._pending.done() and self._pending.exception() is not None:
            self.wait()

    def __enter__(self) -> _BackgroundWrites:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.wait()
            self._pool.shutdown(wait=True)
            return
        while True:  # the run failed: the write in flight still lands before the folder is unlocked
            try:
                failed = self._pending.exception() if self._pending is not None else None
                self._pool.shutdown(wait=True)
                break
            except KeyboardInterrupt:  # a second Ctrl-C must not release the lock under a running write
                continue
        if failed is not None:
            log.error("writing a shard also failed: %s: %s", type(failed).__name__, failed)


def _manifest_of(model, num, shard_size, batch_size, seed, label_source, label_array, settings, metadata):
    return {
        "format": MANIFEST_FORMAT,
        "num": num,
        "shard_size": shard_size,
        "batch_size": batch_size,
        "seed": seed,
        "labels": label_source,
        "labels_sha256": labels_digest(label_array),
        "sampling": {k: (v if isinstance(v, _JSON_SCALARS) else repr(v)) for k, v in settings.items()},
        "weights_fingerprint": _weights_fingerprint(model),
        "metadata": metadata or {},
    }


def sample_to_shards(
    model,
    out_dir: PathLike,
    num: int,
    *,
    labels: Any = "balanced",
    seed: int = 0,
    batch_size: int = 64,
    shard_size: int = 1000,
    process_index: int = 0,
    num_processes: int = 1,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
    lock: FolderLock | None = None,
    **sampling: Any,
) -> ShardRun:
    """Generate this process's share of ``num`` images into ``out_dir``, skipping finished shards.

    Args:
        model: a :class:`~aimkit.generator.Generator` with a tokenizer (anything with
            ``num_classes`` and ``generate(labels, *, seed, output="uint8", batch_size, ...)``
            returning (B, H, W, 3) uint8 images).
        out_dir: the shard directory (created).
        num: total number of images of the run (all processes), at most :data:`MAX_NUM`.
        labels: ``"balanced"`` (default: ``num / num_classes`` per class in a seeded order),
            ``None`` / ``"random"`` (uniform random classes), a label file (``.npy`` or one int
            per line), or ``num`` labels; see :func:`resolve_sample_labels`.
        seed: seed of the whole run; with the same settings the images are the same.
        batch_size: images per ``generate`` call; part of the seeding, so a resumed run must
            use the same value.
        shard_size: images per shard file (the resume granularity).
        process_index: this process, in ``[0, num_processes)``.
        num_processes: processes sharing the run (``accelerate launch``).
        progress: show a tqdm bar on process 0: images, advanced at every token step of a batch,
            with rate and ETA (off a terminal redrawn every 10 s).
        metadata: JSON-serialisable facts stored in the manifest and checked on resume
            (the command line stores the model name, weights and dtype).
        lock: a :class:`~aimkit._lock.FolderLock` on ``out_dir`` that the caller holds for longer
            (``aimkit sample`` holds it in its main process from start to packing). None: process 0
            takes the lock for this call; other processes take none (their main process holds it).
        **sampling: ``cfg_scale``, ``temperature``, ``top_k``, ``top_p`` (None = the preset's
            FID settings from ``model.config.fid_sampling``) and any other keyword of
            ``generate`` (e.g. ``schedule="linear"``).

    Returns:
        A :class:`ShardRun` summary of this process's work.

    Raises:
        ConfigError: bad arguments, or ``out_dir`` holds a run with other settings.
        FolderBusyError: another run holds ``out_dir``.
    """
    _check_run_args(num, batch_size, shard_size, process_index, num_processes, seed, sampling)
    label_array, label_source = resolve_sample_labels(labels, num, model.num_classes, seed)
    settings = _sampling_settings(model, sampling)
    manifest = _manifest_of(model, num, shard_size, batch_size, seed, label_source, label_array, settings, metadata)
    out_dir, run = Path(out_dir), run_digest(manifest)
    with holding_lock(out_dir, lock, take=process_index == 0):
        prepare_dir(out_dir, manifest, label_array)
        total = num_shards(num, shard_size)
        mine = shards_of_process(total, process_index, num_processes)
        pending = _pending_shards(out_dir, mine, run, label_array, num, shard_size)
        skipped = tuple(sorted(set(mine) - set(pending)))
        todo = sum(min(shard_size, num - s * shard_size) for s in pending)

        desc = "sampling" if num_processes == 1 else f"sampling (process 0 of {num_processes})"
        bar = progress_bar(todo, desc, bool(progress) and process_index == 0)
        if skipped and process_index == 0:
            log.info("%d of this process's %d shards are already done; skipping them", len(skipped), len(mine))
        with bar, torch.no_grad(), _BackgroundWrites() as writes:
            plan = _batch_plan(label_array, pending, shard_size, num, batch_size, seed)
            for s, images in _shard_images(model, plan, settings, bar, writes.raise_if_failed):
                # shard s is written while shard s + 1 is sampled
                writes.submit(write_shard, out_dir, s, images, label_array[s * shard_size:(s + 1) * shard_size], run)
    return ShardRun(total, tuple(pending), skipped, todo)
