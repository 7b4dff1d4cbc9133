"""Every named generator preset that ships with aimkit, registered when this package is imported.

* :mod:`.aim`: the official AiM models ``aim-b``, ``aim-l``, ``aim-xl``, ``aim-1b`` and
  :data:`AIM_WEIGHTS`, where their weights are published;
* :mod:`.llamagen`: LlamaGen's class-conditional GPTs ``llamagen-b/-l/-xl/-xxl/-3b`` and
  :data:`LLAMAGEN_WEIGHTS`, where LlamaGen publishes their weights;
* :mod:`.tiny_shapes`: ``aim-tiny-shapes``, whose trained weights ship inside aimkit;
* :mod:`.testing`: ``aim-test-mamba2``, ``aim-test-transformer``, ``aim-test-vq``,
  ``llamagen-test``, tiny random generators for tests.

A preset is a short function of literals returning a :class:`~aimkit.config.GeneratorConfig`;
``aimkit.build(name, **overrides)`` merges the caller's overrides last. :func:`weights_source`
says where a preset's weights come from (``aimkit list`` shows it).
"""

from .aim import AIM_WEIGHTS, PublishedWeights, aim_1b, aim_b, aim_l, aim_xl
from .llamagen import LLAMAGEN_WEIGHTS, llamagen_3b, llamagen_b, llamagen_l, llamagen_xl, llamagen_xxl
from .testing import aim_test_mamba2, aim_test_transformer, aim_test_vq, llamagen_test
from .tiny_shapes import aim_tiny_shapes

# every preset whose weights are published somewhere (``pretrained=True`` / ``--pretrained published``)
PUBLISHED_WEIGHTS: dict[str, PublishedWeights] = {**AIM_WEIGHTS, **LLAMAGEN_WEIGHTS}


def weights_source(name: str) -> str:
    """Where the weights of preset ``name`` come from: ``"shipped with aimkit"`` (inside the
    package, :mod:`aimkit.assets`), ``"published: hf-hub:ORG/NAME"`` (downloaded by
    ``pretrained=True`` / ``--pretrained published``) or ``"none"`` (random unless given)."""
    from ..assets import embedded_weights

    if embedded_weights(name) is not None:
        return "shipped with aimkit"
    record = PUBLISHED_WEIGHTS.get(name)
    return f"published: hf-hub:{record.repo_id}" if record is not None else "none"


__all__ = [
    "PublishedWeights",
    "PUBLISHED_WEIGHTS",
    "AIM_WEIGHTS",
    "LLAMAGEN_WEIGHTS",
    "aim_b",
    "aim_l",
    "aim_xl",
    "aim_1b",
    "llamagen_b",
    "llamagen_l",
    "llamagen_xl",
    "llamagen_xxl",
    "llamagen_3b",
    "llamagen_test",
    "aim_tiny_shapes",
    "aim_test_mamba2",
    "aim_test_transformer",
    "aim_test_vq",
    "weights_source",
]
