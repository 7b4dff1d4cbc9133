"""aimkit: autoregressive image generation with Mamba (AiM, arXiv 2408.12245) as swappable parts.

Quick start::

    import aimkit
    gen = aimkit.build("aim-tiny-shapes")          # shipped weights, runs on CPU
    images = gen.generate([0, 1, 2], output="pil")

Components register themselves in :mod:`aimkit.registry` when their modules are imported; the
explicit import list below is the whole set that ships with aimkit (plugins add more through the
``aimkit.plugins`` entry-point group). Nothing here imports CUDA-only packages.
"""

__version__ = "0.1.0"

from . import llamagen, official, registry  # checkpoint key maps: AiM's official layout and LlamaGen's
from . import presets as _presets  # noqa: F401  (aim-b/l/xl/1b, llamagen-*, aim-tiny-shapes, aim-test-*)
from .backbones import mamba2 as _mamba2  # noqa: F401  (mamba2)
from .backbones import transformer as _transformer  # noqa: F401  (transformer)
from .build import build, resolve_config
from .conditioning import adaln as _adaln  # noqa: F401  (adaln, adaln-group, adaln-single)
from .conditioning import class_token as _class_token  # noqa: F401  (class-token)
from .config import ComponentSpec, GeneratorConfig, SamplingDefaults
from .errors import AimkitError, CheckpointError, ConfigError, DuplicateNameError, UnknownNameError
from .generator import Generator
from .policy import ExecutionPolicy, default_policy
from .registry import BACKBONES, CONDITIONING, GENERATORS, SAMPLERS, TOKENIZERS, list_models
from .samplers import autoregressive as _autoregressive  # noqa: F401  (autoregressive)

# components: importing a module registers what it defines
from .tokenizers import vq as _vq  # noqa: F401  (vq-f16)
from .tokenizers import vq_tiny as _vq_tiny  # noqa: F401  (vq-f4-tiny)

__all__ = [
    "__version__",
    "build",
    "resolve_config",
    "list_models",
    "Generator",
    "ExecutionPolicy",
    "default_policy",
    "GeneratorConfig",
    "ComponentSpec",
    "SamplingDefaults",
    "registry",
    "official",
    "llamagen",
    "TOKENIZERS",
    "BACKBONES",
    "CONDITIONING",
    "SAMPLERS",
    "GENERATORS",
    "AimkitError",
    "ConfigError",
    "CheckpointError",
    "UnknownNameError",
    "DuplicateNameError",
]
