"""aimkit's generator against an independent float64 re-derivation of the official AiM forward.

The reference below reads tensors by their *official* names (``mamba.backbone...``) and follows
the architecture facts of the official code step by step (sequential Mamba2 recurrence, no
chunking), so a wrong key map, chunk order, group interleaving or norm would show up here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import aimkit
from aimkit.weights import save_safetensors_atomic

TINY = aimkit.resolve_config("aim-test-mamba2")  # the sizes; the official presets give the architecture
D, NL, V, NC, NT = TINY.d_model, 4, TINY.vocab_size, TINY.num_classes, TINY.num_tokens
HEADDIM, DSTATE, DCONV = TINY.backbone.config.headdim, TINY.backbone.config.d_state, TINY.backbone.config.d_conv
DIN = 2 * D
NH = DIN // HEADDIM
CONV = DIN + 2 * DSTATE
# official tensor names, shapes and counts (a copy of shared/reference/official_aim_state_dict.json)
REF_JSON = Path(__file__).resolve().parent / "data" / "official_aim_state_dict.json"


def official_state(groups, seed=0):
    """Random tensors under official names for a tiny model (groups=None: per-layer adaLN)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=0.1: torch.randn(*s, generator=g) * std  # noqa: E731
    sd = {
        "mamba.backbone.embeddings.word_embeddings.weight": r(V, D, std=0.5),
        "mamba.backbone.embeddings.position_embeddings.weight": r(NT + 1, D, std=0.5),
        "mamba.backbone.cls_embed.embedding_table.weight": r(NC + 1, D, std=0.5),
        "mamba.backbone.final_layer.norm_final.weight": 1 + r(D),
        "mamba.backbone.final_layer.adaLN_modulation.1.weight": r(2 * D, D),
        "mamba.backbone.final_layer.adaLN_modulation.1.bias": r(2 * D),
        "mamba.backbone.norm_f.weight": 1 + r(D),
    }
    if groups:
        sd["mamba.backbone.adaln_group.1.weight"] = r(groups * 3 * D, D)
        sd["mamba.backbone.adaln_group.1.bias"] = r(groups * 3 * D)
    for i in range(NL):
        p = f"mamba.backbone.layers.{i}."
        sd[p + "norm.weight"] = 1 + r(D)
        sd[p + "mixer.dt_bias"] = torch.rand(NH, generator=g) - 2.5
        sd[p + "mixer.A_log"] = torch.rand(NH, generator=g) * 2
        sd[p + "mixer.D"] = 1 + r(NH)
        sd[p + "mixer.in_proj.weight"] = r(2 * DIN + 2 * DSTATE + NH, D, std=0.2)
        sd[p + "mixer.conv1d.weight"] = r(CONV, 1, DCONV, std=0.3)
        sd[p + "mixer.conv1d.bias"] = r(CONV)
        sd[p + "mixer.norm.weight"] = 1 + r(DIN)
        sd[p + "mixer.out_proj.weight"] = r(D, DIN, std=0.2)
        if groups:
            sd[p + "scale_shift_table"] = r(1, 3, D)
        else:
            sd[p + "adaLN_modulation.1.weight"] = r(3 * D, D)
            sd[p + "adaLN_modulation.1.bias"] = r(3 * D)
    sd["mamba.lm_head.weight"] = sd["mamba.backbone.embeddings.word_embeddings.weight"]
    return sd


def rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def reference_logits(sd, codes, labels, groups):
    """Official training forward in float64, written from the architecture description."""
    sd = {k: v.double() for k, v in sd.items()}
    b = "mamba.backbone."
    B, N = codes.shape
    c = sd[b + "cls_embed.embedding_table.weight"][labels]  # (B, D)
    tok = sd[b + "embeddings.word_embeddings.weight"][codes[:, :-1]]
    pos = sd[b + "embeddings.position_embeddings.weight"][torch.arange(N - 1)]
    x = torch.cat([c[:, None], tok + pos], 1)  # (B, N, D)
    if groups:
        grp = (F.silu(c) @ sd[b + "adaln_group.1.weight"].T + sd[b + "adaln_group.1.bias"]).view(B, groups * 3, D)
        grp = grp.chunk(groups, dim=1)
    hidden, residual = x, None
    for i in range(NL):
        p = f"{b}layers.{i}."
        residual = hidden if residual is None else hidden + residual
        h = rms(residual, sd[p + "norm.weight"])
        if groups:
            mod = (sd[p + "scale_shift_table"] + grp[i % groups]).unbind(1)
        else:
            mod = (F.silu(c) @ sd[p + "adaLN_modulation.1.weight"].T + sd[p + "adaLN_modulation.1.bias"]).chunk(3, 1)
        shift, scale, gate = mod
        u = h * (1 + scale[:, None]) + shift[:, None]
        zxbcdt = u @ sd[p + "mixer.in_proj.weight"].T
        z, xbc, dt = zxbcdt.split([DIN, CONV, NH], -1)
        w, cb = sd[p + "mixer.conv1d.weight"][:, 0], sd[p + "mixer.conv1d.bias"]
        padded = F.pad(xbc, (0, 0, DCONV - 1, 0))
        conv = sum(padded[:, j : j + N] * w[:, j] for j in range(DCONV)) + cb
        xbc = F.silu(conv)
        xs, Bm, Cm = xbc.split([DIN, DSTATE, DSTATE], -1)
        xs = xs.view(B, N, NH, HEADDIM)
        dt = F.softplus(dt + sd[p + "mixer.dt_bias"])  # (B, N, H)
        A = -torch.exp(sd[p + "mixer.A_log"])
        state = torch.zeros(B, NH, HEADDIM, DSTATE, dtype=torch.float64)
        ys = []
        for t in range(N):
            decay = torch.exp(dt[:, t] * A)  # (B, H)
            update = (dt[:, t, :, None] * xs[:, t])[..., None] * Bm[:, t, None, None, :]
            state = decay[:, :, None, None] * state + update
            ys.append((state * Cm[:, t, None, None, :]).sum(-1) + sd[p + "mixer.D"][:, None] * xs[:, t])
        y = torch.stack(ys, 1).reshape(B, N, DIN)
        y = rms(y * F.silu(z), sd[p + "mixer.norm.weight"])
        out = y @ sd[p + "mixer.out_proj.weight"].T
        hidden = gate[:, None] * out
    residual = hidden + residual
    h = rms(residual, sd[b + "norm_f.weight"])
    shift, scale = (F.silu(c) @ sd[b + "final_layer.adaLN_modulation.1.weight"].T
                    + sd[b + "final_layer.adaLN_modulation.1.bias"]).chunk(2, 1)
    h = rms(h, sd[b + "final_layer.norm_final.weight"]) * (1 + scale[:, None]) + shift[:, None]
    return h @ sd["mamba.lm_head.weight"].T


@pytest.mark.parametrize("preset,groups,extra", [("aim-b", None, {}), ("aim-l", 2, {"num_groups": 2})])
def test_logits_match_official_architecture(tmp_path, preset, groups, extra):
    sd = official_state(groups)
    path = tmp_path / "official.safetensors"
    save_safetensors_atomic(sd, path)
    gen = aimkit.build(preset, pretrained=path, **_tiny_overrides(extra))
    codes = torch.randint(0, V, (3, NT), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 7, NC])  # includes the null class
    got = gen(codes, labels).double()
    ref = reference_logits(sd, codes, labels, groups)
    rel = (got - ref).norm() / ref.norm()
    assert rel < 1e-4, rel


def _tiny_overrides(extra):
    """An official preset at aim-test-mamba2's sizes (its Mamba2 config, 4 layers), plus ``extra``."""
    return dict(d_model=D, n_layer=NL, vocab_size=V, num_classes=NC, num_tokens=NT, tokenizer=None,
                backbone=TINY.backbone, **extra)


def test_official_keys_round_trip(tmp_path):
    from aimkit.official import to_official

    sd = official_state(2)
    path = tmp_path / "official.pt"
    torch.save(sd, path)
    gen = aimkit.build("aim-l", pretrained=path, **_tiny_overrides({"num_groups": 2}))
    back = to_official(gen)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_tied_head_may_appear_once(tmp_path):
    sd = official_state(None)
    del sd["mamba.lm_head.weight"]
    torch.save(sd, tmp_path / "once.bin")
    gen = aimkit.build("aim-b", pretrained=tmp_path / "once.bin", **_tiny_overrides({}))
    assert torch.equal(gen.lm_head.weight, sd["mamba.backbone.embeddings.word_embeddings.weight"])


def test_unknown_and_misshaped_keys_fail_before_loading(tmp_path):
    from aimkit.errors import CheckpointError

    sd = official_state(None)
    sd["mamba.backbone.extra.weight"] = torch.zeros(3)
    sd["mamba.backbone.norm_f.weight"] = torch.zeros(D + 1)
    torch.save(sd, tmp_path / "bad.pt")
    gen = aimkit.build("aim-b", **_tiny_overrides({}))
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        from aimkit.build import load_weights_into

        load_weights_into(gen, tmp_path / "bad.pt")
    msg = str(info.value)
    assert "unexpected" in msg and "mamba.backbone.extra.weight" in msg and "mis-shaped" in msg
    assert all(torch.equal(before[k], v) for k, v in gen.state_dict().items())  # nothing half-loaded


def _meta_count(name):
    cfg = aimkit.resolve_config(name, tokenizer=None)
    gen = aimkit.Generator(cfg, device="meta")
    return gen.num_params()


@pytest.mark.parametrize("name,count", [("aim-b", 147_622_080), ("aim-l", 349_760_000), ("aim-xl", 763_291_392)])
def test_exact_parameter_counts(name, count):
    assert _meta_count(name) == count
    ref = json.loads(REF_JSON.read_text())["models"]
    key = {"aim-b": "AiM-B", "aim-l": "AiM-L", "aim-xl": "AiM-XL"}[name]
    assert ref[key]["generator_params"] == count


@pytest.mark.parametrize("name,key", [("aim-b", "AiM-B"), ("aim-l", "AiM-L"), ("aim-xl", "AiM-XL")])
def test_official_names_and_shapes_match_reference(name, key):
    from aimkit.official import official_key_map

    ref = json.loads(REF_JSON.read_text())["models"][key]["state_dict"]
    gen = aimkit.Generator(aimkit.resolve_config(name), device="meta")
    own = gen.state_dict()
    mapped = {off: tuple(own[k].shape) for k, off in official_key_map(gen).items()}
    mapped["mamba.lm_head.weight"] = tuple(own["tok_embed.weight"].shape)
    mapped.update({f"vqvae.{k}": tuple(v.shape) for k, v in gen.tokenizer.state_dict().items()})
    assert mapped == {k: tuple(v) for k, v in ref.items()}
