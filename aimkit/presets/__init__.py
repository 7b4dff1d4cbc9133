"""Every named generator preset that ships with aimkit, registered when this package is imported.

* :mod:`.aim`: the official AiM models ``aim-b``, ``aim-l``, ``aim-xl``, ``aim-1b`` and
  :data:`PUBLISHED_WEIGHTS`, where their weights are published;
* :mod:`.tiny_shapes`: ``aim-tiny-shapes``, whose trained weights ship inside aimkit;
* :mod:`.testing`: ``aim-test-mamba2``, ``aim-test-transformer``, ``aim-test-vq``, tiny random
  generators for tests.

A preset is a short function of literals returning a :class:`~aimkit.config.GeneratorConfig`;
``aimkit.build(name, **overrides)`` merges the caller's overrides last. :func:`weights_source`
says where a preset's weights come from (``aimkit list`` shows it).
"""

from .aim import PUBLISHED_WEIGHTS, PublishedWeights, aim_1b, aim_b, aim_l, aim_xl
from .testing import aim_test_mamba2, aim_test_transformer, aim_test_vq
from .tiny_shapes import aim_tiny_shapes


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
    "aim_b",
    "aim_l",
    "aim_xl",
    "aim_1b",
    "aim_tiny_shapes",
    "aim_test_mamba2",
    "aim_test_transformer",
    "aim_test_vq",
    "weights_source",
]
