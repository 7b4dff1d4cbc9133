"""Sample grids during training: every ``sample_every`` steps the main process draws
``sample_num`` images (labels 0, 1, 2, ... cycling through the classes, the run's seed, the
model's "pretty" sampling settings, the moving average of the weights when the run keeps one)
and writes ``OUT/samples/step-XXXXXXXX.png`` atomically; trackers that take images get it too.

Drawing samples changes nothing the run depends on: the random state of every device is
restored afterwards, the model returns to the modes its modules had, the trained weights are
put back bit for bit (so a resumed run stays exact).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..samplers.grid import make_grid, save_png
from ._trackers import log_image
from .ema import EMA

__all__ = ["SampleGrids", "sample_grid"]


def sample_grid(gen, num: int, seed: int, ema: EMA | None = None) -> np.ndarray:
    """A captioned (H, W, 3) uint8 grid of ``num`` images of ``gen`` (see the module docstring)."""
    labels = torch.arange(num) % gen.num_classes
    modes = {m: m.training for m in gen.modules()}
    devices = [gen.device] if gen.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), ema.swapped_in() if ema is not None else nullcontext():
        gen.eval()
        try:
            with torch.no_grad():
                images = gen.generate(labels, seed=seed, output="uint8", batch_size=num, progress=False,
                                      defaults="pretty")
        finally:
            for module, training in modes.items():
                module.training = training
    return make_grid(images, labels=labels.tolist())


class SampleGrids:
    """The grids of one run.

    Args:
        out: the run's output directory (grids go to ``out/samples``).
        every: steps between grids (0: never).
        num: images per grid.
        seed: the sampling seed (the same for every grid: the grids of a run are comparable).
    """

    def __init__(self, out: Path, every: int, num: int, seed: int):
        self.folder, self.every, self.num, self.seed = Path(out) / "samples", every, num, seed

    @staticmethod
    def check(gen, every: int) -> None:
        """Refuse sample grids for a model that cannot decode pixels, before training starts."""
        if every and gen.tokenizer is None:
            raise ConfigError("sample_every needs a model with a tokenizer to decode images "
                              "(model_args.tokenizer is null); set sample_every=0")

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def write(self, gen, step: int, ema: EMA | None = None, trackers=()) -> Path:
        """Draw, write ``samples/step-XXXXXXXX.png`` and log to ``trackers``; returns the path."""
        grid = sample_grid(gen, self.num, self.seed, ema)
        path = self.folder / f"step-{step:08d}.png"
        save_png(grid, path)
        log_image(trackers, "samples", grid, step)
        return path
