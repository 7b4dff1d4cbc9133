"""What a training run reads: its dataset and, per process, the micro-batches of each step.

Data position: each optimizer step consumes the next ``global_batch_size`` items of a seeded
permutation of the dataset (one permutation per epoch), split across processes and
micro-batches (:class:`StepBatches`). Step ``s`` therefore always sees the same items, which,
with the RNG states saved in every checkpoint, makes a resumed run continue exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler

from ..errors import ConfigError
from .config import TrainConfig

__all__ = ["RandomCodes", "ShapesImages", "StepBatches", "batch_layout", "make_dataset"]


class RandomCodes(Dataset):
    """``size`` items of uniformly random codes (for throughput runs): item i is seeded by i.

    Items are ``(codes (num_tokens,) int64, label () int64)``."""

    def __init__(self, size: int, num_tokens: int, vocab_size: int, num_classes: int, seed: int = 0):
        self.size, self.num_tokens, self.vocab_size = size, num_tokens, vocab_size
        self.num_classes, self.seed = num_classes, seed

    def __len__(self) -> int:
        return self.size

    def set_epoch(self, epoch: int) -> None:
        pass

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        codes = torch.randint(0, self.vocab_size, (self.num_tokens,), generator=g)
        return codes, torch.tensor(int(i) % self.num_classes)


class ShapesImages(Dataset):
    """Procedural shapes images (:mod:`aimkit.data.shapes`), encoded in the loop by the model's
    tokenizer: items are ``(image (3, H, W) float, label () int64)``."""

    def __init__(self, size: int, image_size: int, seed: int = 0):
        from ..data.shapes import ShapesDataset

        self.images = ShapesDataset(size, seed=seed, image_size=image_size)

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __getitem__(self, i: int):
        image, label = self.images[i]
        return image, torch.tensor(label)


class StepBatches(Sampler):
    """The micro-batches one process reads in one epoch, from step ``start_step`` on.

    Optimizer step ``s`` of the epoch uses items ``perm[s * G : (s + 1) * G]`` of a permutation
    seeded by ``(seed, epoch)``, ``G = micro * accum * world``; micro-batch ``a`` of process
    ``r`` is the slice at ``(a * world + r) * micro``. The last incomplete global batch is dropped.
    """

    def __init__(
        self, n: int, *, seed: int, epoch: int, start_step: int, micro: int, accum: int, rank: int, world: int
    ):
        self.n, self.seed, self.epoch, self.start_step = n, seed, epoch, start_step
        self.micro, self.accum, self.rank, self.world = micro, accum, rank, world
        self.global_batch = micro * accum * world
        self.steps = n // self.global_batch

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step) * self.accum

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        for s in range(self.start_step, self.steps):
            block = perm[s * self.global_batch : (s + 1) * self.global_batch]
            for a in range(self.accum):
                offset = (a * self.world + self.rank) * self.micro
                yield block[offset : offset + self.micro].tolist()


def batch_layout(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """``(micro_batch, grad_accum)`` with ``micro_batch * world * grad_accum == global_batch_size``."""
    g = cfg.global_batch_size
    if cfg.batch_size is not None:
        per_step = cfg.batch_size * world
        if g % per_step:
            raise ConfigError(
                f"global_batch_size {g} is not a multiple of batch_size {cfg.batch_size} x {world} process(es)"
            )
        accum = g // per_step
        if cfg.grad_accum is not None and cfg.grad_accum != accum:
            raise ConfigError(
                f"global_batch_size {g} != batch_size {cfg.batch_size} x {world} process(es) "
                f"x grad_accum {cfg.grad_accum}"
            )
        return cfg.batch_size, accum
    accum = cfg.grad_accum or 1
    if g % (world * accum):
        raise ConfigError(f"global_batch_size {g} is not divisible by {world} process(es) x grad_accum {accum}")
    return g // (world * accum), accum


def _shapes_dataset(cfg: TrainConfig, gen) -> ShapesImages:
    from ..data.shapes import NUM_CLASSES

    if gen.tokenizer is None:
        raise ConfigError("data: shapes encodes images with the model's tokenizer, but this model has none")
    side = math.isqrt(gen.num_tokens)
    if gen.num_classes < NUM_CLASSES:
        raise ConfigError(f"data: shapes has {NUM_CLASSES} classes; set model_args.num_classes >= {NUM_CLASSES}")
    return ShapesImages(cfg.data_size, side * gen.tokenizer.downsample, seed=cfg.seed)


def _check_fits(data: str, ds, gen) -> None:
    """The token folder's sizes against the model's, with the override that fixes each mismatch."""
    if ds.num_tokens != gen.num_tokens:
        raise ConfigError(
            f"{data} holds {ds.num_tokens} tokens per image but the model expects {gen.num_tokens} "
            f"(set model_args.num_tokens={ds.num_tokens} or re-tokenize)"
        )
    if ds.codebook_size > gen.vocab_size:
        raise ConfigError(
            f"{data} uses a codebook of {ds.codebook_size} codes but the model's vocab_size is {gen.vocab_size} "
            f"(set model_args.vocab_size={ds.codebook_size})"
        )
    if ds.num_classes > gen.num_classes:
        raise ConfigError(
            f"{data} has {ds.num_classes} classes but the model has {gen.num_classes} "
            f"(set model_args.num_classes={ds.num_classes})"
        )


def make_dataset(cfg: TrainConfig, gen) -> Dataset:
    """The dataset ``cfg.data`` names, checked against the generator ``gen`` it will train."""
    if cfg.data == "random":
        return RandomCodes(cfg.data_size, gen.num_tokens, gen.vocab_size, gen.num_classes, seed=cfg.seed)
    if cfg.data == "shapes":
        return _shapes_dataset(cfg, gen)
    from ..data.provenance import adopt_recorded_tokenizer
    from ..data.tokens import TokenDataset

    ds = TokenDataset(cfg.data, variant=cfg.crop_variant, seed=cfg.seed)
    _check_fits(cfg.data, ds, gen)
    note = adopt_recorded_tokenizer(gen, ds)  # the model saves the tokenizer that made the codes
    if note:
        print(note)
    if len(ds) == 0:
        raise ConfigError(f"{cfg.data} holds no images")
    return ds
