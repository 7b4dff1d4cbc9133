"""Turning a generator's logits into tokens and images.

* :mod:`.logits`: guidance, temperature, top-k, top-p and the token draw.
* :mod:`.schedules`: how the guidance scale varies over the tokens.
* :mod:`.autoregressive`: the registered ``autoregressive`` sampler (CUDA graphs on GPU).
* :mod:`.api`: :func:`generate`, the one-call entry point, and :func:`generate_batches` (batches of
  their own labels and seeds, each decoded while the next samples); :mod:`.grid`: PNG grids.
"""

from ._cuda_graph import clear_decode_graphs
from .api import OUTPUTS, generate, generate_batches, resolve_labels, to_pil, to_uint8
from .autoregressive import AutoregressiveConfig, AutoregressiveSampler
from .grid import make_grid, save_grid
from .logits import apply_guidance, apply_temperature, check_sampling_args, sample, top_k_filter, top_p_filter
from .schedules import SCHEDULES, GuidanceSchedule, constant, get_schedule, linear

__all__ = [
    "generate",
    "generate_batches",
    "resolve_labels",
    "OUTPUTS",
    "to_uint8",
    "to_pil",
    "AutoregressiveConfig",
    "AutoregressiveSampler",
    "clear_decode_graphs",
    "make_grid",
    "save_grid",
    "check_sampling_args",
    "apply_guidance",
    "apply_temperature",
    "top_k_filter",
    "top_p_filter",
    "sample",
    "GuidanceSchedule",
    "SCHEDULES",
    "constant",
    "linear",
    "get_schedule",
]
