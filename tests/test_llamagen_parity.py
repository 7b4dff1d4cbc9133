"""LlamaGen c2i parity: ``llamagen-*`` presets against an independent float64 re-derivation.

The reference below is written from LlamaGen's ``autoregressive/models/gpt.py`` (commit 5a50452),
in plain torch over a LlamaGen-layout state dict, and shares no code with aimkit:

* input ``[cls_embedding(label) ; tok_embeddings(codes[:, :-1])]``; position k predicts code k;
* per layer ``h = x + wo(attn(attention_norm(x)))``, ``out = h + w2(silu(w1 n) * w3 n)``, n = ffn_norm(h);
* RMSNorm ``x * rsqrt(mean(x^2) + 1e-5) * weight``; SwiGLU width ``find_multiple(int(8 * dim / 3), 256)``;
* ``wqkv`` rows are q, k, v; causal softmax attention, scale ``head_dim ** -0.5``;
* 2-D rotary on interleaved channel pairs (2i, 2i+1): the first head_dim/4 pairs turn with the grid
  row, the last head_dim/4 with the column, frequencies ``base ** (-2j / (head_dim / 2))``; the class
  token's table row is all zeros (cos = sin = 0), so its q and k are zero;
* final ``norm`` then the untied ``output`` head.
"""

from __future__ import annotations

import re

import pytest
import torch

import aimkit
from aimkit.errors import CheckpointError

# llamagen-test: d_model 64, 2 layers, 4 heads of 16, vocab 64, 10 classes (+ null class 10), 4 x 4 grid
DIM, N_LAYER, N_HEAD, VOCAB, N_CLASS, GRID = 64, 2, 4, 64, 10, 4
N_TOK = GRID * GRID


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def ffn_hidden(dim: int) -> int:
    return find_multiple(int(2 * 4 * dim / 3), 256)


def random_llamagen_sd(seed: int, std: float = 0.1, dim: int = DIM) -> dict[str, torch.Tensor]:
    """A seeded random state dict in LlamaGen's c2i key layout (no buffers: LlamaGen keeps
    ``freqs_cis`` and ``causal_mask`` as plain attributes, so neither is in its state_dict).

    ``std`` is 0.1 rather than LlamaGen's 0.02 init: at 0.02 the attention scores are ~0.03, the
    softmax is almost uniform and a wrong rotary moves the logits by less than 1e-2, so neither
    the parity nor the sensitivity tests would see attention. Norm weights are 1 + 0.1 * noise."""
    g = torch.Generator().manual_seed(seed)
    hid = ffn_hidden(dim)

    def w(*shape):
        return torch.randn(*shape, generator=g) * std

    def norm():
        return 1.0 + 0.1 * torch.randn(dim, generator=g)

    sd = {
        "cls_embedding.embedding_table.weight": w(N_CLASS + 1, dim),
        "tok_embeddings.weight": w(VOCAB, dim),
    }
    for i in range(N_LAYER):
        p = f"layers.{i}."
        sd[p + "attention.wqkv.weight"] = w(3 * dim, dim)
        sd[p + "attention.wo.weight"] = w(dim, dim)
        sd[p + "feed_forward.w1.weight"] = w(hid, dim)
        sd[p + "feed_forward.w3.weight"] = w(hid, dim)
        sd[p + "feed_forward.w2.weight"] = w(dim, hid)
        sd[p + "attention_norm.weight"] = norm()
        sd[p + "ffn_norm.weight"] = norm()
    sd["norm.weight"] = norm()
    sd["output.weight"] = w(VOCAB, dim)
    return sd


def rotary_table(n_pos: int, head_dim: int, *, base=10000.0, swap_axes=False, rotate_cls=False):
    """cos, sin of shape (n_pos, head_dim // 2): row 0 is the class token, row 1 + k grid cell k.

    swap_axes: rows and columns exchanged (wrong); rotate_cls: the class row is the identity
    rotation of grid cell 0 (wrong: LlamaGen's class row is zeros)."""
    quarter = head_dim // 4
    freqs = 1.0 / base ** (torch.arange(0, 2 * quarter, 2, dtype=torch.float64) / (2 * quarter))
    k = torch.arange(n_pos - 1)
    row, col = (k // GRID).double(), (k % GRID).double()
    if swap_axes:
        row, col = col, row
    angles = torch.cat([row[:, None] * freqs, col[:, None] * freqs], dim=1)  # (n_pos - 1, head_dim // 2)
    cls = torch.zeros(1, head_dim // 2, dtype=torch.float64)
    cos = torch.cat([cls + rotate_cls, angles.cos()])
    sin = torch.cat([cls, angles.sin()])
    return cos, sin


def rotate(x, cos, sin, half_split=False):
    """x (B, T, H, hd); pairs (2i, 2i+1) as LlamaGen, or (i, i + hd/2) with half_split (wrong)."""
    cos, sin = cos[None, :, None], sin[None, :, None]
    if half_split:
        a, b = x.chunk(2, dim=-1)
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)


def reference_logits(sd, codes, labels, *, n_head=N_HEAD, n_kv_head=None, swap_axes=False, rotate_cls=False,
                     half_split=False):
    """LlamaGen's c2i teacher-forced forward in float64 (eval mode: no dropout, labels as given)."""
    p = {k: v.double() for k, v in sd.items()}
    rms = lambda x, wt: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * wt  # noqa: E731
    x = torch.cat([p["cls_embedding.embedding_table.weight"][labels][:, None],
                   p["tok_embeddings.weight"][codes[:, :-1]]], dim=1)
    B, T, D = x.shape
    hd, n_kv_head = D // n_head, n_kv_head or n_head
    cos, sin = rotary_table(T, hd, swap_axes=swap_axes, rotate_cls=rotate_cls)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(sum(k.endswith("attention.wo.weight") for k in sd)):
        L = f"layers.{i}."
        n = rms(x, p[L + "attention_norm.weight"])
        q, k, v = (n @ p[L + "attention.wqkv.weight"].T).split([D, n_kv_head * hd, n_kv_head * hd], dim=-1)
        q = rotate(q.view(B, T, n_head, hd), cos, sin, half_split).transpose(1, 2)
        k = rotate(k.view(B, T, n_kv_head, hd), cos, sin, half_split).transpose(1, 2)
        v = v.view(B, T, n_kv_head, hd).transpose(1, 2)
        k, v = (t.repeat_interleave(n_head // n_kv_head, dim=1) for t in (k, v))
        scores = (q @ k.transpose(-1, -2)) / hd ** 0.5
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        h = x + att.transpose(1, 2).reshape(B, T, D) @ p[L + "attention.wo.weight"].T
        n = rms(h, p[L + "ffn_norm.weight"])
        ff = torch.nn.functional.silu(n @ p[L + "feed_forward.w1.weight"].T) * (n @ p[L + "feed_forward.w3.weight"].T)
        x = h + ff @ p[L + "feed_forward.w2.weight"].T
    return rms(x, p["norm.weight"]) @ p["output.weight"].T


def rel_err(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def inputs(seed: int, batch: int):
    g = torch.Generator().manual_seed(1000 + seed)
    codes = torch.randint(0, VOCAB, (batch, N_TOK), generator=g)
    labels = torch.randint(0, N_CLASS, (batch,), generator=g)
    labels[-1] = N_CLASS  # the null (unconditional) class always takes part
    return codes, labels


def load(tmp_path, obj, name="w.pt", **overrides):
    path = tmp_path / name
    torch.save(obj, path)
    return aimkit.build("llamagen-test", pretrained=str(path), dtype=torch.float32, **overrides)


@pytest.mark.parametrize("seed,batch,dim,n_head", [(0, 1, DIM, N_HEAD), (1, 3, DIM, N_HEAD), (2, 5, DIM, N_HEAD),
                                                  (3, 2, 200, 2)])  # head_dim 100: GPT-3B's odd 25-pair quarters
def test_logits_match_float64_reference(tmp_path, seed, batch, dim, n_head):
    """Random LlamaGen-layout weights in ``{"model": sd}`` load into ``llamagen-test`` and its float32
    teacher-forced logits match the float64 re-derivation of LlamaGen's forward (null class included)."""
    sd = random_llamagen_sd(seed, dim=dim)
    gen = load(tmp_path, {"model": sd}, d_model=dim, n_head=n_head).eval()
    codes, labels = inputs(seed, batch)
    with torch.no_grad():
        out = gen(codes, labels)
    assert out.shape == (batch, N_TOK, VOCAB) and out.dtype == torch.float32
    assert rel_err(out, reference_logits(sd, codes, labels, n_head=n_head)) <= 1e-5


@pytest.mark.parametrize("wrong", ["swap_axes", "rotate_cls", "half_split"])
def test_wrong_references_are_far(tmp_path, wrong):
    """The comparison sees rotary mistakes: references with rows and columns swapped, the class
    token rotated like grid cell 0 instead of zeroed, or half-split (i, i + hd/2) pairs all miss the
    model's logits by far more than the 1e-5 parity tolerance (while the right one matches)."""
    for seed in range(2):
        sd = random_llamagen_sd(seed)
        gen = load(tmp_path, {"model": sd}, name=f"w{seed}.pt")
        codes, labels = inputs(seed, 3)
        with torch.no_grad():
            out = gen(codes, labels)
        assert rel_err(out, reference_logits(sd, codes, labels)) <= 1e-5
        assert rel_err(out, reference_logits(sd, codes, labels, **{wrong: True})) > 5e-2


def test_class_position_sees_only_its_label(tmp_path):
    """Position 0 (predicting code 0) depends on the label alone; every position depends on the label."""
    sd = random_llamagen_sd(3)
    gen = load(tmp_path, sd)
    codes, labels = inputs(3, 2)
    other = codes.clone()
    other[:, :-1] = (other[:, :-1] + 1) % VOCAB
    with torch.no_grad():
        a, b = gen(codes, labels), gen(other, labels)
        c = gen(codes, torch.full_like(labels, N_CLASS))
    assert torch.allclose(a[:, 0], b[:, 0], rtol=1e-6, atol=1e-7) and not torch.allclose(a[:, 1:], b[:, 1:])
    assert not torch.allclose(a[0, 0], c[0, 0]) and not torch.allclose(a[0, -1], c[0, -1])  # row 0: a real class


def test_checkpoint_wrappers_load_identically(tmp_path):
    """``{"model": sd}`` (DDP training), ``{"module": sd}``, ``{"state_dict": sd}`` and a bare sd
    (FSDP ``consolidated.pth`` / ``--from-fsdp``) give bit-identical logits."""
    sd = random_llamagen_sd(4)
    codes, labels = inputs(4, 2)
    outs = []
    for i, obj in enumerate([{"model": sd}, {"module": sd}, {"state_dict": sd}, sd]):
        with torch.no_grad():
            outs.append(load(tmp_path, obj, name=f"w{i}.pt")(codes, labels))
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape"])
def test_bad_checkpoints_name_the_key(tmp_path, case):
    """Strict loading: a missing key, an unexpected key and a mis-shaped tensor each raise
    CheckpointError whose message names the offending key."""
    sd = random_llamagen_sd(5)
    if case == "missing":
        key = "layers.1.feed_forward.w3.weight"
        del sd[key]
    elif case == "unexpected":
        key = "layers.0.attention.wz.weight"
        sd[key] = torch.zeros(DIM, DIM)
    else:
        key = "tok_embeddings.weight"
        sd[key] = torch.zeros(VOCAB + 1, DIM)
    with pytest.raises(CheckpointError, match=re.escape(key)):
        load(tmp_path, {"model": sd})


def llamagen_params(dim: int, n_layer: int, vocab: int = 16384, num_classes: int = 1000) -> int:
    """LlamaGen c2i parameter count: per layer wqkv + wo (4 dim^2, no GQA), SwiGLU 3 * dim * hidden,
    two RMSNorms; token embedding, untied output head, (num_classes + 1) class rows, final norm."""
    per_layer = 4 * dim * dim + 3 * dim * ffn_hidden(dim) + 2 * dim
    return n_layer * per_layer + 2 * vocab * dim + (num_classes + 1) * dim + dim


# name: (dim, n_layer, n_head, parameters); B / L / XL counts are the issue's, XXL / 3B the formula's
PRESETS = {
    "llamagen-b": (768, 12, 12, 110_888_448),
    "llamagen-l": (1024, 24, 16, 342_910_976),
    "llamagen-xl": (1280, 36, 20, 774_699_520),
    "llamagen-xxl": (1536, 48, 24, 1_410_972_672),
    "llamagen-3b": (3200, 24, 32, 3_096_659_200),
}


def test_param_formula_matches_tiny_state_dict():
    """The count formula agrees with the tensors of the hand-built LlamaGen state dict."""
    sd = random_llamagen_sd(0)
    assert sum(v.numel() for v in sd.values()) == llamagen_params(DIM, N_LAYER, VOCAB, N_CLASS) == 140_288


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_counts(name):
    """Each preset's config has LlamaGen's sizes and its meta-device build has exactly LlamaGen's
    parameter count (tied weights once); nothing is allocated."""
    dim, n_layer, n_head, count = PRESETS[name]
    assert llamagen_params(dim, n_layer) == count
    cfg = aimkit.resolve_config(name)
    assert (cfg.d_model, cfg.n_layer, cfg.vocab_size, cfg.num_classes) == (dim, n_layer, 16384, 1000)
    assert getattr(cfg.backbone.config, "n_head", n_head) == n_head
    gen = aimkit.build(name, device="meta", pretrained=False)
    assert gen.num_params() == count
