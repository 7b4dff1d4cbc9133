"""Tests of the ``vq-f16`` tokenizer (aimkit.tokenizers) and of strict weight loading (aimkit.weights).

The acceptance check compares :class:`VQModel` with an independent functional re-implementation
of LlamaGen's VQ-16 maths (written below with plain torch ops over the state dict) on the same
random weights: all codes equal and decoded pixels within 1e-5 in float32.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aimkit.errors import CheckpointError, ConfigError
from aimkit.registry import TOKENIZERS
from aimkit.tokenizers.base import Tokenizer
from aimkit.tokenizers.vq import VQConfig, VQModel
from aimkit.weights import (
    check_state_dict,
    load_strict,
    read_state_dict,
    save_safetensors_atomic,
    select_prefix,
    strip_prefix,
)

REFERENCE_JSON = Path(__file__).resolve().parent / "data" / "official_aim_state_dict.json"  # copy of shared/reference
N_PARAMS = 71_883_403
TINY = VQConfig(
    codebook_size=64,
    codebook_embed_dim=4,
    z_channels=32,
    ch=32,
    ch_mult=(1, 2),
    encoder_res_blocks=1,
    decoder_res_blocks=1,
    image_size=32,
)

# Derived once from the functional reference below (seed 0 weights, seed 2 images, 32x32).
PINNED_CODES = [[13785, 4994, 8605, 438], [62, 8022, 10611, 16089]]
PINNED_PIXELS = {  # (image, channel, row, col) -> value
    (0, 0, 0, 0): -0.021603785455226898,
    (0, 1, 31, 17): -0.2438536137342453,
    (1, 2, 31, 31): 0.07462212443351746,
    (1, 0, 5, 20): -0.2571633458137512,
}


# --------------------------------------------------------------------------------------------
# independent functional reference (LlamaGen's VQ-16 maths over a state dict)
# --------------------------------------------------------------------------------------------


def _gn(sd, p, x):
    return F.group_norm(x, 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)


def _conv(sd, p, x, stride=1):
    w = sd[p + ".weight"]
    pad = 0 if stride == 2 else w.shape[-1] // 2
    return F.conv2d(x, w, sd[p + ".bias"], stride=stride, padding=pad)


def _swish(x):
    return x * torch.sigmoid(x)


def _res(sd, p, x):
    h = _conv(sd, p + ".conv1", _swish(_gn(sd, p + ".norm1", x)))
    h = _conv(sd, p + ".conv2", _swish(_gn(sd, p + ".norm2", h)))
    if p + ".nin_shortcut.weight" in sd:
        x = _conv(sd, p + ".nin_shortcut", x)
    return x + h


def _attn(sd, p, x):
    b, c, hh, ww = x.shape
    y = _gn(sd, p + ".norm", x)
    q = _conv(sd, p + ".q", y).reshape(b, c, hh * ww)
    k = _conv(sd, p + ".k", y).reshape(b, c, hh * ww)
    v = _conv(sd, p + ".v", y).reshape(b, c, hh * ww)
    weights = torch.softmax(torch.bmm(q.permute(0, 2, 1), k) * c**-0.5, dim=2)  # (b, query, key)
    out = torch.bmm(v, weights.permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + _conv(sd, p + ".proj_out", out)


def _count(sd, prefix):
    """Number of i such that some key starts with f'{prefix}{i}.'."""
    i = 0
    while any(k.startswith(f"{prefix}{i}.") for k in sd):
        i += 1
    return i


def _levels(sd, side, x):
    for i in range(_count(sd, f"{side}.conv_blocks.")):
        p = f"{side}.conv_blocks.{i}"
        for j in range(_count(sd, p + ".res.")):
            x = _res(sd, f"{p}.res.{j}", x)
            if f"{p}.attn.{j}.q.weight" in sd:
                x = _attn(sd, f"{p}.attn.{j}", x)
        if p + ".downsample.conv.weight" in sd:
            x = _conv(sd, p + ".downsample.conv", F.pad(x, (0, 1, 0, 1)), stride=2)
        if p + ".upsample.conv.weight" in sd:
            x = _conv(sd, p + ".upsample.conv", x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    return x


def _mid(sd, side, x):
    x = _res(sd, f"{side}.mid.0", x)
    x = _attn(sd, f"{side}.mid.1", x)
    return _res(sd, f"{side}.mid.2", x)


def _l2(x):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def ref_encode(sd, images):
    h = _conv(sd, "encoder.conv_in", images)
    h = _mid(sd, "encoder", _levels(sd, "encoder", h))
    h = _conv(sd, "encoder.conv_out", _swish(_gn(sd, "encoder.norm_out", h)))
    z = _conv(sd, "quant_conv", h)  # (B, 8, h, w)
    b, d, hh, ww = z.shape
    z = _l2(z.permute(0, 2, 3, 1).reshape(b, hh * ww, d))
    book = _l2(sd["quantize.embedding.weight"])
    dist = ((z[:, :, None, :] - book[None, None]) ** 2).sum(-1)  # (B, N, K)
    return dist.argmin(-1)


def ref_decode(sd, codes):
    b, n = codes.shape
    side = math.isqrt(n)
    z = _l2(sd["quantize.embedding.weight"])[codes]  # (B, N, 8)
    z = z.reshape(b, side, side, -1).permute(0, 3, 1, 2).contiguous()  # NCHW layout, as LlamaGen
    h = _conv(sd, "post_quant_conv", z)
    h = _conv(sd, "decoder.conv_in", h)
    h = _levels(sd, "decoder", _mid(sd, "decoder", h))
    return _conv(sd, "decoder.conv_out", _swish(_gn(sd, "decoder.norm_out", h)))


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


def _randomised(config: VQConfig | None = None, seed: int = 0) -> VQModel:
    """Seeded model whose GroupNorm affines are perturbed too, so every tensor matters."""
    torch.manual_seed(seed)
    model = VQModel(config or VQConfig())
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return _randomised()


@pytest.fixture(scope="module")
def blank():
    """A second full-size model whose weights each loading test overwrites."""
    return VQModel().eval()


@pytest.fixture(scope="module")
def images():
    gen = torch.Generator().manual_seed(2)
    return torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1


@pytest.fixture(scope="module")
def small_images():
    gen = torch.Generator().manual_seed(3)
    return torch.rand(3, 3, 32, 32, generator=gen) * 2 - 1


def _zero(module):
    with torch.no_grad():
        for t in module.state_dict().values():
            t.zero_()


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------------------------


def test_registered():
    assert TOKENIZERS.get("vq-f16") is VQModel
    assert VQModel.config_cls is VQConfig
    assert issubclass(VQModel, Tokenizer)


def test_names_and_shapes_match_official_checkpoint(model):
    sd = json.loads(REFERENCE_JSON.read_text())["models"]["AiM-B"]["state_dict"]
    official = {k: tuple(v) for k, v in select_prefix(sd, "vqvae.").items()}
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official
    assert list(ours) == list(official)  # same order as the file, too
    check_state_dict({k: torch.Size(v) for k, v in official.items()}, model.state_dict(), "vq-f16")


def test_param_count_and_sizes(model):
    assert sum(p.numel() for p in model.parameters()) == N_PARAMS  # parameters only
    assert model.quantize.codebook_used.shape == (65536,)  # the buffer is extra
    assert (model.codebook_size, model.downsample, model.embed_dim, model.in_channels) == (16384, 16, 8, 3)
    assert model.grid_size(256) == 16 and model.grid_size(384) == 24
    with pytest.raises(ConfigError, match="multiple of 16"):
        model.grid_size(100)


# --------------------------------------------------------------------------------------------
# numerics against the functional reference
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def test_matches_functional_reference(model, images):
    sd = {k: v.float() for k, v in model.state_dict().items()}
    ref_codes = ref_encode(sd, images)
    ref_pixels = ref_decode(sd, ref_codes)

    codes = model.encode(images)
    assert codes.dtype == torch.int64 and codes.shape == (2, 4)
    assert torch.equal(codes, ref_codes)
    assert len(set(codes.flatten().tolist())) > 4  # codes differ across positions
    pixels = model.decode(codes)
    assert pixels.shape == (2, 3, 32, 32)
    assert (pixels - ref_pixels).abs().max().item() < 1e-5

    # values pinned from the reference once (looser tolerance: other CPUs round differently)
    assert ref_codes.tolist() == PINNED_CODES
    for (b, c, y, x), value in PINNED_PIXELS.items():
        assert abs(pixels[b, c, y, x].item() - value) < 1e-4, (b, c, y, x)


@torch.no_grad()
def test_round_trip_batches(model, small_images):
    for batch, size, clamp in ((1, 32, False), (3, 16, True)):
        x = small_images[:batch, :, :size, :size]
        codes = model.encode(x)
        assert codes.shape == (batch, (size // 16) ** 2) and codes.dtype == torch.int64
        assert 0 <= codes.min() and codes.max() < 16384
        out = model.decode(codes, clamp=clamp)
        assert out.shape == x.shape and out.dtype == torch.float32
        if clamp:
            assert out.abs().max() <= 1.0


@torch.no_grad()
def test_bfloat16(model, small_images):
    half = copy.deepcopy(model).to(torch.bfloat16)
    codes = half.encode(small_images[:2, :, :16, :16])  # float32 input is cast to the module dtype
    assert codes.dtype == torch.int64 and 0 <= codes.min() and codes.max() < 16384
    out = half.decode(codes)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 16, 16)
    assert torch.isfinite(out.float()).all()


@torch.no_grad()
def test_tiny_variant_channels_last_and_non_square():
    tiny = _randomised(TINY, seed=4)
    assert tiny.downsample == 2 and tiny.grid_size(32) == 16
    x = torch.rand(2, 3, 8, 12, generator=torch.Generator().manual_seed(5)) * 2 - 1
    codes = tiny.encode(x)
    assert codes.shape == (2, 24)
    out = tiny.decode(codes, grid=(4, 6))
    assert out.shape == x.shape
    assert torch.equal(tiny(x), out)
    assert tiny.decode(codes, grid=(4, 6), clamp=True).abs().max() <= 1.0
    with pytest.raises(ConfigError, match="square"):
        tiny.decode(codes)
    tiny.channels_last()
    assert tiny.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(tiny.encode(x), codes)
    assert torch.allclose(tiny.decode(codes, grid=(4, 6)), out, atol=1e-4)  # other kernels, other rounding


# --------------------------------------------------------------------------------------------
# input errors
# --------------------------------------------------------------------------------------------


def test_image_errors(model):
    with pytest.raises(ConfigError, match="multiple of 16"):
        model.encode(torch.zeros(1, 3, 40, 40))
    with pytest.raises(ConfigError, match="1 channels .* expects 3"):
        model.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ConfigError, match=r"\(B, C, H, W\)"):
        model.encode(torch.zeros(3, 32, 32))
    with pytest.raises(ConfigError, match="float"):
        model.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_code_errors(model):
    with pytest.raises(ConfigError, match="code 16384 is out of range"):
        model.decode(torch.full((1, 4), 16384))
    with pytest.raises(ConfigError, match="code -1 is out of range"):
        model.decode(torch.tensor([[0, 1, -1, 2]]))
    with pytest.raises(ConfigError, match="15 codes .* square"):
        model.decode(torch.zeros(2, 15, dtype=torch.long))
    with pytest.raises(ConfigError, match="integer"):
        model.decode(torch.zeros(1, 4))
    with pytest.raises(ConfigError, match=r"\(B, N\)"):
        model.decode(torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ConfigError, match="grid"):
        model.decode(torch.zeros(1, 4, dtype=torch.long), grid=(3, 2))


def test_config_errors():
    with pytest.raises(ConfigError, match="multiple of 32"):
        VQConfig(ch=48)
    with pytest.raises(ConfigError, match="codebook_size"):
        VQConfig(codebook_size=0)


# --------------------------------------------------------------------------------------------
# weight files
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def test_load_all_layouts(model, blank, tmp_path):
    sd = model.state_dict()

    llamagen = tmp_path / "vq_ds16_c2i.pt"
    torch.save({"model": sd, "steps": 10}, llamagen)
    aim = tmp_path / "aim" / "model.safetensors"  # a whole AiM checkpoint, as a folder
    whole = {f"vqvae.{k}": v for k, v in sd.items()}
    whole["mamba.layers.0.mixer.A_log"] = torch.zeros(4)
    save_safetensors_atomic(whole, aim, metadata={"format": "pt"})
    bare = tmp_path / "bare.safetensors"
    save_safetensors_atomic(sd, bare)

    for path in (llamagen, aim.parent, bare):
        _zero(blank)
        assert blank.load_weights(path) is blank
        _assert_same_weights(blank, model)  # bitwise, so outputs are identical too
    codes = torch.tensor([[16000]])
    assert torch.equal(blank.decode(codes), model.decode(codes))
    assert [p.name for p in aim.parent.iterdir()] == ["model.safetensors"]  # no temp file left


def test_mismatch_lists_problems(model):
    sd = dict(model.state_dict())
    before = model.decoder.conv_out.bias.clone()
    del sd["encoder.conv_in.bias"], sd["quantize.codebook_used"]
    sd["extra.weight"] = torch.zeros(1)
    sd["quant_conv.weight"] = torch.zeros(8, 128, 1, 1)
    sd["decoder.conv_out.bias"] = torch.ones(3)  # fits, but must not be loaded half-way
    with pytest.raises(CheckpointError) as err:
        load_strict(model, sd, "vq-f16", source="x.pt")
    msg = str(err.value)
    assert msg.startswith("vq-f16 weights from x.pt do not fit: ")
    assert "2 missing (encoder.conv_in.bias, quantize.codebook_used)" in msg
    assert "1 unexpected (extra.weight)" in msg
    assert "1 mis-shaped (quant_conv.weight: file (8, 128, 1, 1) vs model (8, 256, 1, 1))" in msg
    assert torch.equal(model.decoder.conv_out.bias, before)


def test_mismatch_from_file(tmp_path):
    tiny = VQModel(TINY)
    path = tmp_path / "wrong.pt"
    torch.save({"model": VQModel(VQConfig(ch=64, ch_mult=(1, 2), codebook_size=64)).state_dict()}, path)
    with pytest.raises(CheckpointError, match=rf"vq-f16 weights from {path} do not fit: .*mis-shaped"):
        tiny.load_weights(path)
    many = {f"k{i}": torch.zeros(1) for i in range(7)}
    with pytest.raises(CheckpointError, match=r"7 unexpected \(k0, k1, k2, k3, k4, \.\.\.\)"):
        check_state_dict({}, many, "thing")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_unreadable_files(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n")
    truncated = tmp_path / "cut.pt"
    torch.save({"w": torch.randn(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:600])
    cut_st = tmp_path / "cut.safetensors"
    save_safetensors_atomic({"w": torch.randn(1000)}, cut_st)
    cut_st.write_bytes(cut_st.read_bytes()[:100])
    fake_st = tmp_path / "notes.safetensors"
    fake_st.write_text("hello")
    listing = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listing)
    mixed = tmp_path / "mixed.pt"
    torch.save({"w": torch.zeros(1), "step": 3}, mixed)
    raw_pickle = tmp_path / "plain.pkl"
    raw_pickle.write_bytes(pickle.dumps({"w": torch.zeros(1)}))
    objects = tmp_path / "objects.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "when": datetime.date(2024, 1, 1)}, objects)
    with_args = tmp_path / "with_args.pt"  # LlamaGen-style argparse arguments are allowed
    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1e-4)}, with_args)
    assert list(read_state_dict(with_args)) == ["w"]
    other = tmp_path / "readme.txt"
    other.write_text("hello")
    empty = tmp_path / "empty"
    empty.mkdir()

    cases = {
        tmp_path / "missing.pt": "does not exist",
        text: "truncated, corrupt or not a checkpoint",
        truncated: "truncated, corrupt or not a checkpoint",
        cut_st: "truncated, corrupt or not a safetensors file",
        fake_st: "truncated, corrupt or not a safetensors file",
        raw_pickle: "truncated, corrupt or not a checkpoint",
        objects: "stores a datetime.date object",
        listing: "holds a list, not a state dict",
        mixed: "does not hold a state dict",
        other: "is not a weight file",
        empty: "holds no weight file",
        tmp_path: "holds several weight files",
    }
    for path, expected in cases.items():
        with pytest.raises(CheckpointError) as err:
            read_state_dict(path)
        assert str(path) in str(err.value) and expected in str(err.value), str(err.value)
        # no chained pickle / zip traceback behind the message
        assert err.value.__cause__ is None
        assert err.value.__context__ is None or err.value.__suppress_context__


def test_read_unwraps_and_prefixes(tmp_path):
    w = torch.arange(6.0).view(2, 3)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {"module": {"a.w": w}}, "epoch": 1}, path)
    assert torch.equal(read_state_dict(path)["a.w"], w)
    torch.save({"model": {"x": w}, "ema": {"y": w}}, path)
    assert list(read_state_dict(path)) == ["y"]  # LlamaGen prefers the EMA weights
    assert list(read_state_dict(path, key="model")) == ["x"]
    sd = {"vqvae.a": w, "mamba.b": w, "c": w}
    assert list(select_prefix(sd, "vqvae.")) == ["a"]
    assert list(strip_prefix(sd, "vqvae.")) == ["a", "mamba.b", "c"]


def test_save_shared_tensors(tmp_path):
    base = torch.randn(4, 3)
    sd = {"tied.a": base, "tied.b": base, "view": base[1:3], "t": base.t()}
    path = save_safetensors_atomic(sd, tmp_path / "sub" / "w.safetensors", metadata={"step": 5})
    back = read_state_dict(path)
    assert all(torch.equal(back[k], v) for k, v in sd.items())
    assert sorted(p.name for p in path.parent.iterdir()) == ["w.safetensors"]
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"step": "5"}


# --------------------------------------------------------------------------------------------
# the fused GroupNorm + swish (policy vq_norm)
# --------------------------------------------------------------------------------------------


def _with_policy(tok: VQModel, **changes) -> VQModel:
    from aimkit.policy import ExecutionPolicy

    tok = copy.deepcopy(tok)
    for m in tok.modules():
        if isinstance(getattr(m, "policy", None), ExecutionPolicy):
            m.policy = ExecutionPolicy(**changes)
    return tok


def test_a_generator_passes_its_policy_to_the_tokenizer():
    import aimkit

    gen = aimkit.build("aim-test-vq", pretrained=False, policy={"vq_norm": "reference"})
    norms = {n: m for n, m in gen.tokenizer.named_modules() if isinstance(m, torch.nn.GroupNorm)}
    assert norms and all(m.policy.vq_norm == "reference" for m in norms.values())
    # swish follows every GroupNorm but the attention blocks' (named "norm")
    assert {n: m.swish for n, m in norms.items()} == {n: not n.endswith(".norm") for n in norms}


def test_the_kernel_policy_is_refused_off_cuda(model):
    codes = torch.randint(0, model.codebook_size, (1, 4))
    with torch.no_grad(), pytest.raises(ConfigError, match="vq_norm"):
        _with_policy(model, vq_norm="kernel").decode(codes, grid=(2, 2))


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    u8 = lambda x: ((x.float().clamp(-1, 1) + 1) * 127.5).round()  # noqa: E731
    mse = (u8(a) - u8(b)).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_group_norm_decodes_within_the_precision_of_the_reference(model):
    """On CUDA the fused kernel decodes like F.group_norm + swish: float32 to ~1e-4, bfloat16 as
    close to the float32 pixels as the reference's own bfloat16 decode (PSNR within 1 dB)."""
    torch.backends.cudnn.allow_tf32 = False
    codes = torch.randint(0, model.codebook_size, (4, 256), generator=torch.Generator().manual_seed(5)).cuda()
    ref32 = _with_policy(model, vq_norm="reference").cuda()
    fused32 = _with_policy(model, vq_norm="kernel").cuda()
    with torch.inference_mode():
        want = ref32.decode(codes)
        got = fused32.decode(codes)
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-3)
        ref16 = ref32.to(torch.bfloat16).decode(codes)
        fused16 = fused32.to(torch.bfloat16).decode(codes)
    assert _psnr(fused16, want) >= _psnr(ref16, want) - 1.0, (_psnr(fused16, want), _psnr(ref16, want))
