"""Training: a recipe config, one training step for every caller, a trainer around one loop.

* :mod:`~aimkit.training.config`: :class:`TrainConfig`, YAML recipes and ``key=value`` overrides;
* :mod:`~aimkit.training.data`: datasets and the per-step batch order (exact resume);
* :mod:`~aimkit.training.optim`: :func:`param_groups` (which parameters decay), AdamW, schedule;
* :mod:`~aimkit.training.step`: :class:`TrainStep`, eager, with each sublayer replayed from CUDA
  graphs (:mod:`~aimkit.training.layer_graphs`) or wholly replayed from CUDA graphs, as the
  execution policy's ``train_step`` says (the trainer, the benchmarks and the tests run it);
* :mod:`~aimkit.training.ema`: :class:`EMA`, the moving average of the weights (``ema_decay``),
  updated inside the step;
* :mod:`~aimkit.training.samples`: sample grids every ``sample_every`` steps;
* :mod:`~aimkit.training.checkpoint`: atomic, verified checkpoints and resume;
* :mod:`~aimkit.training.trainer`: :class:`Trainer` and :func:`train`;
* :mod:`~aimkit.training.cli`: ``aimkit train`` / ``python -m aimkit.training``.
"""

from ._guards import TrainingStopped, param_fingerprint
from .checkpoint import find_checkpoint, verify_checkpoint
from .config import TrainConfig, config_to_yaml, execution_policy, find_config, load_config
from .ema import EMA
from .optim import lr_factor, make_optimizer, make_scheduler, param_groups
from .step import EagerStep, GraphedStep, LayerGraphedStep, TrainStep, make_train_step
from .trainer import Trainer, TrainResult, train

__all__ = [
    "EMA",
    "EagerStep",
    "GraphedStep",
    "LayerGraphedStep",
    "TrainConfig",
    "TrainResult",
    "TrainStep",
    "Trainer",
    "TrainingStopped",
    "config_to_yaml",
    "execution_policy",
    "find_checkpoint",
    "find_config",
    "load_config",
    "lr_factor",
    "make_optimizer",
    "make_scheduler",
    "make_train_step",
    "param_fingerprint",
    "param_groups",
    "train",
    "verify_checkpoint",
]
