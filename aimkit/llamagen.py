"""Key maps between aimkit's state-dict layout and LlamaGen's class-conditional GPT checkpoints.

LlamaGen (FoundationVision/LlamaGen, ``autoregressive/models/gpt.py``) saves ``{"model": state_dict}``
from DDP training and a bare state dict from FSDP (``consolidated.pth``); its loaders also accept
``"module"`` (DeepSpeed) and ``"state_dict"`` wrappers. The wrappers' key parts are removed here:
DDP's ``module.`` and ``torch.compile``'s ``_orig_mod.`` prefixes, and FSDP's and activation
checkpointing's ``_fsdp_wrapped_module.`` / ``_checkpoint_wrapped_module.`` wherever they occur. Its names::

    tok_embeddings.weight                       -> tok_embed.weight
    cls_embedding.embedding_table.weight        -> class_embed.embedding_table.weight  (C + 1 rows)
    layers.N.attention.wqkv.weight / .wo.weight -> backbone.layers.N.mixer.wqkv / .wo
    layers.N.feed_forward.w1 / w2 / w3.weight   -> backbone.layers.N.mlp.w1 / w2 / w3
    layers.N.attention_norm.weight              -> backbone.layers.N.norm.weight
    layers.N.ffn_norm.weight                    -> backbone.layers.N.norm2.weight
    norm.weight                                 -> backbone.norm_f.weight
    output.weight                               -> lm_head.weight  (untied)

Two kinds of entries are LlamaGen state, not weights, and are checked instead of loaded:

* ``freqs_cis``, the 2-D rotary table ``(1 + G * G, head_dim / 2, 2)`` (or its complex form) that
  versions of LlamaGen kept as a buffer (its samplers still drop it before loading). aimkit computes the table
  from the positions; the file's must be this model's table (same head_dim and rope base) for
  some grid G, else the load is refused. A table of another grid (weights trained at 384 px) loads
  with a warning that names the ``num_tokens`` / ``grid_size`` to build for sampling as trained.
* ``layers.N.attention.kv_cache.k_cache`` / ``v_cache``, the buffers of LlamaGen's KV cache in a
  state dict taken after ``setup_caches``: decoding scratch of shape (B, n_head, S, head_dim).

Only generators of LlamaGen's architecture take these names (the ``transformer`` backbone with
2-D rotary positions, ``class-token`` conditioning, no position table, an untied head: the
``llamagen-*`` presets). Every rename is explicit; a key the map does not know is kept and then
reported as unexpected (as is a ``freqs_cis`` or cache entry of another head layout).
"""

from __future__ import annotations

import re
import warnings

import torch
from torch import Tensor

from .errors import CheckpointError

__all__ = ["llamagen_key_map", "is_llamagen", "from_llamagen", "to_llamagen", "describe_misfit"]

_MARKERS = ("tok_embeddings.weight", "cls_embedding.embedding_table.weight")
_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
_INFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")  # FSDP / activation checkpointing
_ROTARY_TABLE = "freqs_cis"
_KV_CACHE = re.compile(r"layers\.(\d+)\.attention\.kv_cache\.[kv]_cache")
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")
_LAYER_NAMES = {
    "attention.wqkv.weight": "mixer.wqkv.weight",
    "attention.wo.weight": "mixer.wo.weight",
    "feed_forward.w1.weight": "mlp.w1.weight",
    "feed_forward.w2.weight": "mlp.w2.weight",
    "feed_forward.w3.weight": "mlp.w3.weight",
    "attention_norm.weight": "norm.weight",
    "ffn_norm.weight": "norm2.weight",
}


def _check_architecture(gen) -> None:
    config = gen.config
    problems = []
    if config.backbone.name != "transformer":
        problems.append(f"backbone {config.backbone.name!r} (LlamaGen: 'transformer')")
    elif getattr(config.backbone.config, "rope", None) != "2d":
        problems.append(f"{config.backbone.config.rope!r} rotary positions (LlamaGen: '2d', rows and columns)")
    if config.conditioning.name != "class-token":
        problems.append(f"conditioning {config.conditioning.name!r} (LlamaGen: 'class-token')")
    if config.pos_embed:
        problems.append("a learned position table (LlamaGen: rotary positions only)")
    if config.tie_head:
        problems.append("a tied head (LlamaGen: its own output.weight)")
    if problems:
        raise CheckpointError("LlamaGen checkpoints fit LlamaGen's architecture (the llamagen-* presets); this "
                              "generator has " + "; ".join(problems))


def llamagen_key_map(gen) -> dict[str, str]:
    """aimkit key -> LlamaGen key for the generator part of ``gen`` (LlamaGen's architecture only)."""
    _check_architecture(gen)
    out = {
        "tok_embed.weight": "tok_embeddings.weight",
        "class_embed.embedding_table.weight": "cls_embedding.embedding_table.weight",
        "backbone.norm_f.weight": "norm.weight",
        "lm_head.weight": "output.weight",
    }
    for i in range(gen.config.n_layer):
        for theirs, ours in _LAYER_NAMES.items():
            out[f"backbone.layers.{i}.{ours}"] = f"layers.{i}.{theirs}"
    return out


def _strip_wrappers(key: str) -> str:
    for infix in _INFIXES:
        key = key.replace(infix, "")
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def is_llamagen(state: dict[str, Tensor]) -> bool:
    """True when the keys look like a LlamaGen GPT checkpoint (``tok_embeddings``, ``cls_embedding``
    or a layer's ``attention.wqkv``)."""
    for key in state:
        name = _strip_wrappers(key)
        layer = _LAYER_KEY.fullmatch(name)
        if name in _MARKERS or (layer is not None and layer.group(2) == "attention.wqkv.weight"):
            return True
    return False


def _heads(gen) -> tuple[int, int, float, int]:
    """``(n_head, head_dim, rope_base, grid_size)`` of a LlamaGen-architecture generator."""
    backbone = gen.config.backbone.config
    n_head, _ = backbone.head_counts(gen.config.d_model)
    return n_head, gen.config.d_model // n_head, backbone.rope_base, backbone.grid_size


def _table_grid(gen, table: Tensor) -> int | None:
    """The grid side G when ``table`` has the shape of this model's rotary table for some grid, else
    None: ``(1 + G * G, head_dim / 2, 2)`` cos and sin, or ``(1 + G * G, head_dim / 2)`` complex
    (``cos + i sin``; a header-only read does not know the dtype, the load checks it)."""
    _, head_dim, _, _ = _heads(gen)
    pair = table.dim() == 3 and table.shape[2] == 2
    complex_form = table.dim() == 2 and (table.is_complex() or table.is_meta)
    if not (pair or complex_form) or table.shape[1] != head_dim // 2 or table.shape[0] < 2:
        return None
    grid = round((table.shape[0] - 1) ** 0.5)
    return grid if grid * grid == table.shape[0] - 1 else None


def _check_rotary_table(gen, table: Tensor, grid: int, source: str) -> None:
    """Refuse a ``freqs_cis`` whose values are not this model's 2-D rotary table at ``grid``; warn
    when that grid is not the model's (meta tensors: the shape alone was checked)."""
    from .kernels.rotary import rotary_angles_2d

    if table.is_meta:
        return
    if table.is_complex():
        table = torch.view_as_real(table)  # (1 + G * G, head_dim / 2, 2)
    _, head_dim, base, own_grid = _heads(gen)
    cos, sin = rotary_angles_2d(torch.arange(table.shape[0]), head_dim, base, grid)
    want = torch.stack((cos, sin), dim=-1).to(table.dtype).double()  # (1 + G * G, head_dim / 2, 2)
    real = table.is_floating_point() and table.dim() == 3
    tol = max(8 * torch.finfo(table.dtype).eps, 1e-4) if real else 0.0
    error = (table.double() - want).abs().max().item() if real else float("inf")
    if not error <= tol:
        raise CheckpointError(
            f"{source}: its freqs_cis is not this model's 2-D rotary table (head_dim {head_dim}, rope_base {base:g}, "
            f"class token first; largest difference {error:.3g}): the checkpoint was trained with other positions")
    if grid != own_grid:
        warnings.warn(
            f"{source} was trained on a {grid} x {grid} token grid (its freqs_cis), this model samples "
            f"{own_grid} x {own_grid}; the weights load, build with num_tokens={grid * grid}, grid_size={grid} "
            "to sample as trained", stacklevel=2)


def _is_kv_cache(gen, name: str, value: Tensor) -> bool:
    """True for a buffer of LlamaGen's KV cache that fits this model's layers and heads."""
    found = _KV_CACHE.fullmatch(name)
    if found is None or int(found.group(1)) >= gen.config.n_layer or value.dim() != 4:
        return False
    n_head, head_dim, _, _ = _heads(gen)
    return value.shape[1] == n_head and value.shape[3] == head_dim


def from_llamagen(gen, state: dict[str, Tensor], source: str = "checkpoint") -> dict[str, Tensor]:
    """Rename a LlamaGen state dict to aimkit keys; unknown keys are kept (and later reported).

    ``freqs_cis`` and KV-cache buffers are checked and left out (module docstring)."""
    reverse = {v: k for k, v in llamagen_key_map(gen).items()}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        name = _strip_wrappers(key)
        grid = _table_grid(gen, value) if name == _ROTARY_TABLE else None
        if grid is not None:
            _check_rotary_table(gen, value, grid, source)
            continue
        if _is_kv_cache(gen, name, value):
            continue
        target = reverse.get(name, name)
        if target in out:
            raise CheckpointError(f"LlamaGen checkpoint holds {name!r} twice (with and without a wrapper prefix)")
        out[target] = value
    return out


def to_llamagen(gen) -> dict[str, Tensor]:
    """The generator as a LlamaGen-layout state dict (what LlamaGen's ``GPT.load_state_dict`` takes)."""
    own = gen.state_dict()
    return {theirs: own[ours] for ours, theirs in llamagen_key_map(gen).items()}


def _file_model(state: dict[str, Tensor]) -> dict[str, int]:
    """Sizes a LlamaGen state dict's shapes reveal: d_model, n_layer, vocab_size, class rows."""
    shapes = {_strip_wrappers(k): tuple(v.shape) for k, v in state.items()}
    sizes = {}
    if len(shapes.get("tok_embeddings.weight", ())) == 2:
        sizes["vocab_size"], sizes["d_model"] = shapes["tok_embeddings.weight"]
    if len(shapes.get("cls_embedding.embedding_table.weight", ())) == 2:
        sizes["class_rows"] = shapes["cls_embedding.embedding_table.weight"][0]
    layers = [int(m.group(1)) for m in map(_LAYER_KEY.fullmatch, shapes) if m is not None]
    if layers:
        sizes["n_layer"] = max(layers) + 1
    return sizes


def describe_misfit(gen, state: dict[str, Tensor]) -> str | None:
    """Why a LlamaGen state dict that does not fit ``gen`` is another model, in one sentence (or None).

    Names the file's width and depth (and the ``llamagen-*`` preset of those sizes), a class table
    without the null-class row, another class count or vocabulary, and a rotary table of other heads."""
    from .presets.llamagen import LLAMAGEN_WEIGHTS
    from .registry import GENERATORS

    config, sizes, notes = gen.config, _file_model(state), []
    d_model, n_layer = sizes.get("d_model", config.d_model), sizes.get("n_layer", config.n_layer)
    if (d_model, n_layer) != (config.d_model, config.n_layer):
        presets = [n for n, c in ((n, GENERATORS.get(n)()) for n in LLAMAGEN_WEIGHTS)
                   if (c.d_model, c.n_layer) == (d_model, n_layer)]
        which = f" (the {presets[0]} preset)" if presets else ""
        notes.append(f"the file holds a LlamaGen GPT of d_model {d_model} and {n_layer} layers{which}, "
                     f"this model has d_model {config.d_model} and {config.n_layer} layers")
    rows = sizes.get("class_rows", config.num_classes + 1)
    if rows == config.num_classes:
        notes.append(f"its class table has {rows} rows and no null-class row (trained with class_dropout_prob 0), "
                     f"but aimkit's has num_classes + 1 = {rows + 1}, the last for classifier-free guidance")
    elif rows != config.num_classes + 1:
        notes.append(f"its class table has {rows} rows: {rows - 1} classes and the null class "
                     f"(build with num_classes={rows - 1})")
    if sizes.get("vocab_size", config.vocab_size) != config.vocab_size:
        notes.append(f"its codebook has {sizes['vocab_size']} entries (build with vocab_size={sizes['vocab_size']})")
    table = next((v for k, v in state.items() if _strip_wrappers(k) == _ROTARY_TABLE), None)
    if table is not None and _table_grid(gen, table) is None and table.dim() == 3:
        n_head, head_dim, _, _ = _heads(gen)
        notes.append(f"its freqs_cis is a rotary table for heads of {2 * table.shape[1]} channels, this model's "
                     f"{n_head} heads have {head_dim}")
    return "; ".join(notes) or None
