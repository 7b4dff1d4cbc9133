"""Reliability of everything that reads weights and configs (issue #15).

Bad input gets one line (a ``ConfigError`` / ``CheckpointError``, or exit status 2 on the command
line), loads nothing and runs no code from the file:

* ``config.json`` values of the wrong type or range, named by their key path;
* sizes too large for the machine, refused from a meta-device build before any allocation;
* weight files whose names or shapes do not fit, refused from their header before allocation;
* NaN / infinite tensors, at every loader;
* hostile and truncated files (lying safetensors headers, pickle payloads, empty files, folders);
* ``aimkit convert`` into a non-empty folder; the CLI paths ``convert``, ``fid``, ``list``, ``bench``.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import aimkit
from aimkit.cli import main
from aimkit.errors import CheckpointError, ConfigError
from aimkit.official import to_official
from aimkit.weights import read_state_dict, read_tensor_shapes, save_safetensors_atomic

BUILD = sys.modules["aimkit.build"]  # the module (aimkit.build is the function)
TINY = "aim-test-mamba2"  # a swapped backbone (backbone="transformer") starts from that backbone's defaults


def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert text and "\n" not in text, text
    return text


def _cli(capsys, argv):
    """Run the CLI in-process; returns (exit status, stderr lines)."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny generator (no tokenizer) written by save_pretrained."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("saved") / "tiny"
    aimkit.build(TINY).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def shapes_gen():
    torch.manual_seed(0)
    return aimkit.build("aim-tiny-shapes", pretrained=False)


GENERATION_KEYS = ("decode_position_offset", "sampler", "fid_sampling", "pretty_sampling")


def _copy_with_config(saved: Path, dst: Path, edit) -> Path:
    """A copy of ``saved`` whose two config files, seen merged as one old-style config.json, were
    changed by ``edit``; the generation settings go back to generation_config.json."""
    shutil.copytree(saved, dst)
    data = json.loads((dst / "config.json").read_text())
    generation = json.loads((dst / "generation_config.json").read_text())
    if isinstance(data.get("generator"), dict):
        data["generator"].update(generation["generation"])
    edit(data)
    if isinstance(data.get("generator"), dict):
        generation["generation"] = {k: data["generator"].pop(k) for k in GENERATION_KEYS if k in data["generator"]}
    (dst / "config.json").write_text(json.dumps(data))  # NaN / Infinity are written as JSON literals
    (dst / "generation_config.json").write_text(json.dumps(generation))
    return dst


# --------------------------------------------------------------------------------------------
# 1. config.json values: type-checked against the dataclass annotations, range-checked
# --------------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
BAD_VALUES = [
    # (key path under "generator", value, text the one-line message must contain)
    ("backbone.config.A_init_range", "ab", "backbone.config.A_init_range must be a list of 2 finite floats"),
    ("backbone.config.A_init_range", [1, 2, 3], "backbone.config.A_init_range must be a list of 2"),
    ("backbone.config.A_init_range", [1, "x"], "backbone.config.A_init_range"),
    ("backbone.config.A_init_range", [16, 1], "A_init_range must satisfy 0 < low <= high"),
    ("backbone.config.dt_min", "x", "backbone.config.dt_min must be a finite float, got 'x' (str)"),
    ("backbone.config.dt_min", NAN, "backbone.config.dt_min must be a finite float, got nan"),
    ("backbone.config.dt_max", INF, "backbone.config.dt_max must be a finite float"),
    ("backbone.config.dt_min", 10 ** 400, "backbone.config.dt_min must be a finite float"),
    ("backbone.config.d_state", "4", "backbone.config.d_state must be int, got '4' (str)"),
    ("backbone.config.d_state", True, "backbone.config.d_state must be int, got True (bool)"),
    ("backbone.config.d_state", [4], "backbone.config.d_state must be int"),
    ("backbone.config.d_state", 16.0, "backbone.config.d_state must be int"),
    ("backbone.config.d_state", 0, "d_state must be a positive integer"),
    ("backbone.config.headdim", -8, "headdim must be a positive integer"),
    ("backbone.config.headdim", None, "backbone.config.headdim must be int, got None"),
    ("backbone.config.norm_eps", 0.0, "norm_eps must be positive"),
    ("backbone.config.conv_bias", 1, "backbone.config.conv_bias must be bool"),
    ("backbone.config.d_conv", ["4"], "backbone.config.d_conv must be int"),
    ("backbone.config", [1, 2], "backbone.config must be a mapping"),
    ("backbone", None, "backbone must be a mapping with a 'name'"),
    ("backbone", "mamba2", "backbone must be a mapping with a 'name'"),
    ("backbone.name", 3, "backbone.name must be str"),
    ("backbone.extra", 1, "backbone has unknown keys extra"),
    ("backbone", {"name": "transformer", "config": {"n_head": "4"}},
     "backbone.config.n_head must be int or null, got '4' (str)"),
    ("backbone", {"name": "transformer", "config": {"rope_base": -1.0}}, "rope_base must be positive"),
    ("conditioning", {"name": "adaln-group", "config": {"num_groups": 0}}, "num_groups must be a positive integer"),
    ("conditioning", {"name": "adaln-group", "config": {"num_groups": 1.5}},
     "conditioning.config.num_groups must be int"),
    ("tokenizer", {"name": "vq-f4-tiny", "config": {"ch_mult": [1, "2"]}}, "tokenizer.config.ch_mult[1] must be int"),
    ("tokenizer", {"name": "vq-f4-tiny", "config": {"ch_mult": 3}}, "tokenizer.config.ch_mult must be a list of ints"),
    ("tokenizer", {"name": "vq-f4-tiny", "config": {"dropout": NAN}},
     "tokenizer.config.dropout must be a finite float"),
    ("d_model", "32", "d_model must be int, got '32' (str)"),
    ("d_model", 32.0, "d_model must be int"),
    ("d_model", None, "d_model must be int, got None"),
    ("d_model", 0, "d_model must be a positive integer"),
    ("n_layer", True, "n_layer must be int, got True (bool)"),
    ("n_layer", [2], "n_layer must be int"),
    ("vocab_size", -64, "vocab_size must be a positive integer"),
    ("num_tokens", 0, "num_tokens must be a positive integer"),
    ("norm_eps", INF, "norm_eps must be a finite float"),
    ("class_dropout", "0.1", "class_dropout must be a finite float"),
    ("class_dropout", 1.5, "class_dropout must be in [0, 1)"),
    ("decode_position_offset", 2, "decode_position_offset must be one of [0, 1]"),
    ("fid_sampling", None, "fid_sampling must be a mapping"),
    ("fid_sampling.top_k", "3", "fid_sampling.top_k must be int"),
    ("fid_sampling.cfg_scale", NAN, "fid_sampling.cfg_scale must be a finite float"),
    ("pretty_sampling.top_p", 0.0, "top_p must be in (0, 1]"),
    ("pretty_sampling.temperature", -1.0, "temperature must be >= 0"),
    ("sampler.name", 2, "sampler.name must be str"),
    ("sampler.config", {"steps": 2}, "unknown sampler 'autoregressive' option 'steps'"),
]


def _set(data, path, value):
    node, keys = data["generator"], path.split(".")
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value


@pytest.mark.parametrize("path,value,expected", BAD_VALUES, ids=[f"{p}={v!r}"[:60] for p, v, _ in BAD_VALUES])
def test_bad_config_value_is_one_line_naming_the_key(saved, tmp_path, path, value, expected):
    folder = _copy_with_config(saved, tmp_path / "m", lambda d: _set(d, path, value))
    with pytest.raises(ConfigError) as info:
        aimkit.build(folder)
    text = _one_line(info)
    name = "generation_config.json" if path.split(".")[0] in GENERATION_KEYS else "config.json"
    assert text.startswith(f"{folder / name}: ") and expected in text, text


@pytest.mark.parametrize("key,value,expected", [
    ("generator", None, "the generator config must be a mapping, got None"),
    ("generator", [1], "the generator config must be a mapping"),
    ("dtype", 5, "dtype must be a dtype name"),
    ("dtype", "int32", "dtype must be a floating-point torch dtype"),
    ("aimkit_format", 2, "aimkit_format 2 is not supported"),
])
def test_bad_top_level_entry(saved, tmp_path, key, value, expected):
    folder = _copy_with_config(saved, tmp_path / "m", lambda d: d.__setitem__(key, value))
    with pytest.raises(ConfigError) as info:
        aimkit.build(folder)
    assert expected in _one_line(info)


@pytest.mark.parametrize("content", [
    b"", b"not json", b"null", b"[1, 2]", b'"text"', b'{"aimkit_format": 1}',
    b"[" * 100_000 + b"]" * 100_000,  # nested too deeply for the JSON parser
    b'{"generator": {}, "pad": "' + b"x" * (5 << 20) + b'"}',  # far larger than any config
    b"\xff\xfe\x00garbage",
], ids=["empty", "not-json", "null", "list", "string", "no-generator", "deep", "huge", "binary"])
def test_config_json_that_is_not_a_config(saved, tmp_path, content):
    folder = tmp_path / "m"
    shutil.copytree(saved, folder)
    (folder / "config.json").write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        aimkit.build(folder)
    assert str(folder / "config.json") in _one_line(info)


def test_config_json_that_is_a_directory(saved, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(saved, folder)
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()
    with pytest.raises(ConfigError) as info:
        aimkit.build(folder)
    assert "config.json is not a regular file" in _one_line(info)
    with pytest.raises(ConfigError) as info:
        aimkit.build(tmp_path / "nowhere")
    assert "does not exist" in _one_line(info)


@pytest.mark.parametrize("overrides,expected", [
    (dict(backbone="transformer", n_head="4"), "n_head must be int or null, got '4' (str)"),
    (dict(d_state=True), "d_state must be int, got True (bool)"),
    (dict(A_init_range=(1.0, NAN)), "A_init_range[1] must be a finite float"),
    (dict(num_groups=2.0, conditioning="adaln-group"), "num_groups must be int"),
    (dict(d_model="64"), "d_model must be"),
])
def test_bad_override_values_are_refused_before_building(overrides, expected):
    with pytest.raises(ConfigError) as info:
        aimkit.build(TINY, **overrides)
    assert expected in _one_line(info)


def test_generate_with_a_bad_saved_config_exits_2(saved, tmp_path, capsys):
    folder = _copy_with_config(saved, tmp_path / "m", lambda d: _set(d, "backbone.config.A_init_range", "ab"))
    code, err = _cli(capsys, ["generate", "--model", str(folder), "--num", "1", "--out", str(tmp_path / "g.png")])
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("aimkit generate: error: ") and "backbone.config.A_init_range" in err[0]
    assert not (tmp_path / "g.png").exists()


def test_saved_configs_still_round_trip(saved):
    """Every value save_pretrained writes passes the checks (lists come back as tuples)."""
    again = aimkit.build(saved)
    assert again.config.backbone.config.A_init_range == (1, 16)
    assert again.config == aimkit.resolve_config(TINY)


# --------------------------------------------------------------------------------------------
# 2. absurd sizes: refused from a meta-device build, nothing allocated
# --------------------------------------------------------------------------------------------

@pytest.fixture
def no_real_build(monkeypatch):
    """Fail the test if aimkit.build constructs a generator anywhere but on the meta device."""
    real = BUILD.Generator

    def meta_only(config, device=None, dtype=None):
        assert device is not None and torch.device(device).type == "meta", "a real model was allocated"
        return real(config, device=device, dtype=dtype)

    monkeypatch.setattr(BUILD, "Generator", meta_only)
    BUILD._meta_generator_cached.cache_clear()
    yield
    BUILD._meta_generator_cached.cache_clear()


ABSURD = [
    dict(d_model=10 ** 9), dict(n_layer=10 ** 7), dict(vocab_size=10 ** 13), dict(num_tokens=10 ** 12),
    dict(num_classes=10 ** 12), dict(d_state=10 ** 10), dict(expand=10 ** 8),
    dict(backbone="transformer", n_head=1, n_layer=10 ** 7),
    dict(conditioning="adaln-group", num_groups=100, n_layer=10 ** 7),
    dict(d_model=2 ** 62), dict(d_model=10 ** 30),
]


@pytest.mark.parametrize("sizes", ABSURD, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items())[:40])
def test_absurd_sizes_are_refused_before_allocation(no_real_build, sizes):
    with pytest.raises(ConfigError) as info:
        aimkit.build(TINY, pretrained=False, **sizes)
    text = _one_line(info)
    assert "nothing was allocated" in text or "cannot be built" in text, text


def test_absurd_sizes_in_a_saved_folder_are_refused_before_allocation(no_real_build, saved, tmp_path):
    folder = _copy_with_config(saved, tmp_path / "m", lambda d: _set(d, "vocab_size", 10 ** 12))
    with pytest.raises(ConfigError) as info:
        aimkit.build(folder)
    assert "tok_embed.weight" in _one_line(info) and "nothing was allocated" in str(info.value)


@pytest.mark.parametrize("path,value", [("n_layer", 3), ("d_model", 48), ("backbone.config.d_state", 8)])
def test_weights_that_do_not_fit_are_refused_from_the_header(no_real_build, saved, tmp_path, path, value):
    folder = _copy_with_config(saved, tmp_path / "m", lambda d: _set(d, path, value))
    with pytest.raises(CheckpointError) as info:
        aimkit.build(folder)
    assert "do not fit" in _one_line(info)


def test_official_file_that_does_not_fit_is_refused_from_the_header(no_real_build, shapes_gen, tmp_path):
    sd = to_official(shapes_gen)
    sd["mamba.backbone.norm_f.weight"] = torch.ones(7)
    save_safetensors_atomic(sd, tmp_path / "official.safetensors")
    with pytest.raises(CheckpointError) as info:
        aimkit.build("aim-tiny-shapes", pretrained=tmp_path / "official.safetensors")
    assert "mis-shaped (mamba.backbone.norm_f.weight: file (7,)" in _one_line(info)  # as the file names it


def _shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("overrides", [
    {}, dict(backbone="transformer", n_head=4), dict(conditioning="adaln-group", num_groups=2),
    dict(conditioning="adaln-single"), dict(tokenizer="vq-f4-tiny", vocab_size=512),
], ids=["mamba2", "transformer", "adaln-group", "adaln-single", "vq-f4-tiny"])
def test_meta_build_has_the_real_shapes(overrides):
    config = aimkit.resolve_config(TINY, **overrides)
    torch.manual_seed(0)
    meta = BUILD._build_meta(config, None)
    assert all(t.is_meta for t in meta.state_dict().values())
    assert _shapes(meta) == _shapes(BUILD.Generator(config))
    assert BUILD._tensor_bytes(meta)[0] == sum(  # tied lm_head / tok_embed counted once
        p.numel() * p.element_size() for p in {id(p): p for p in [*meta.parameters(), *meta.buffers()]}.values()
    )


def test_meta_build_leaves_the_random_stream_alone():
    """The preflight draws no random numbers: a seeded build gives the weights it gave before."""
    torch.manual_seed(3)
    state = torch.random.get_rng_state()
    BUILD._build_meta(aimkit.resolve_config(TINY), None)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_meta_shortcuts_answer_like_the_real_ops():
    """The meta pass's shortcuts give the shapes and dtypes the real operations give (a dtype
    keyword included), and broadcasting refuses what torch refuses."""
    x = torch.ones(3, 1, 4)
    with BUILD._ShapesOnly():
        meta = torch.empty(3, 1, 4, device="meta")
        for fn in (lambda t: torch.softmax(t, -1, dtype=torch.float64),
                   lambda t: torch.randn_like(t, dtype=torch.float16),
                   lambda t: t.exp() * torch.empty(5, 1, device=t.device),
                   lambda t: torch.nn.functional.normalize(t)):
            got, want = fn(meta), fn(x)
            assert got.is_meta and (got.shape, got.dtype) == (want.shape, want.dtype)
    assert BUILD._broadcast_shape((3, 1, 4), (5, 1), ()) == torch.broadcast_shapes((3, 1, 4), (5, 1), ())
    with pytest.raises(RuntimeError, match="cannot be broadcast"):
        BUILD._broadcast_shape((3, 2), (4, 2))


def test_preflight_imports_no_compiler():
    """The meta pass answers initialisers itself: neither torch._dynamo (about a second) nor sympy
    (0.4 s, through the meta kernels of broadcast_shapes and empty_like) is imported."""
    code = ("import sys, aimkit; aimkit.build('aim-tiny-shapes'); aimkit.build('llamagen-test'); "
            "aimkit.build('aim-test-transformer', n_head=2); "
            "print('torch._dynamo' in sys.modules, 'sympy' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False False"


# --------------------------------------------------------------------------------------------
# 3. NaN / infinite weights at every loader
# --------------------------------------------------------------------------------------------

def _poison(sd, key, value=NAN):
    sd = {k: v.clone() for k, v in sd.items()}
    sd[key].view(-1)[1] = value
    return sd


@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_saved_folder_with_non_finite_weights(saved, tmp_path, value):
    folder = tmp_path / "m"
    shutil.copytree(saved, folder)
    sd = _poison(read_state_dict(folder), "backbone.layers.1.mixer.in_proj.weight", value)
    save_safetensors_atomic(sd, folder / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        aimkit.build(folder)
    text = _one_line(info)
    assert "'backbone.layers.1.mixer.in_proj.weight' holds 1 NaN / infinite values" in text


def test_all_nan_weights_name_the_first_tensor(saved, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(saved, folder)
    sd = {k: torch.full_like(v, NAN) for k, v in read_state_dict(folder).items()}
    save_safetensors_atomic(sd, folder / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        aimkit.build(folder)
    assert f"tensor {next(iter(sd))!r} holds" in _one_line(info)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_official_layout_with_non_finite_weights(shapes_gen, tmp_path, fmt):
    sd = _poison(to_official(shapes_gen), "vqvae.quantize.embedding.weight", INF)
    path = tmp_path / f"official.{fmt}"
    save_safetensors_atomic(sd, path) if fmt == "safetensors" else torch.save(sd, path)
    with pytest.raises(CheckpointError, match="'vqvae.quantize.embedding.weight' holds 1 NaN / infinite"):
        aimkit.build("aim-tiny-shapes", pretrained=path)


def test_tokenizer_weights_with_nan(shapes_gen, tmp_path):
    sd = _poison(shapes_gen.tokenizer.state_dict(), "decoder.conv_out.weight")
    torch.save({"model": sd}, tmp_path / "vq.pt")
    with pytest.raises(CheckpointError, match="'decoder.conv_out.weight' holds"):
        aimkit.build("aim-tiny-shapes", pretrained=False, tokenizer_weights=tmp_path / "vq.pt")
    with pytest.raises(CheckpointError, match="'decoder.conv_out.weight' holds"):
        type(shapes_gen.tokenizer)().load_weights(tmp_path / "vq.pt")


def test_hub_file_with_nan(monkeypatch, shapes_gen, tmp_path):
    poisoned = _poison(to_official(shapes_gen), "mamba.backbone.norm_f.weight")
    save_safetensors_atomic(poisoned, tmp_path / "hub.safetensors")
    monkeypatch.setattr(BUILD, "_hub_download", lambda repo, filename: tmp_path / "hub.safetensors")
    with pytest.raises(CheckpointError, match="'mamba.backbone.norm_f.weight' holds 1 NaN"):
        aimkit.build("aim-tiny-shapes", pretrained="hf-hub:someone/something")


def test_non_finite_check_can_be_skipped_explicitly(saved, tmp_path):
    sd = _poison(read_state_dict(saved), "tok_embed.weight")
    save_safetensors_atomic(sd, tmp_path / "w.safetensors")
    assert torch.isnan(read_state_dict(tmp_path / "w.safetensors", check_values=False)["tok_embed.weight"]).any()


@pytest.fixture(scope="module")
def inception_state():
    from aimkit.eval.inception import FIDInceptionV3

    torch.manual_seed(0)
    return FIDInceptionV3().state_dict()


@pytest.mark.parametrize("kind", ["nan", "zeros", "misshaped", "missing", "extra"])
def test_bad_fid_inception_weights_are_one_line(inception_state, tmp_path, capsys, kind):
    from aimkit.eval.inception import load_inception

    sd = dict(inception_state)
    if kind == "nan":
        sd = _poison(sd, "Mixed_7c.branch_pool.conv.weight")
    elif kind == "zeros":  # right names and shapes, no information: FID would be 0.0000 for anything
        sd = {k: torch.zeros_like(v) for k, v in sd.items()}
    elif kind == "misshaped":
        sd["fc.weight"] = torch.zeros(1000, 2048)
    elif kind == "missing":
        del sd["fc.bias"]
    else:
        sd["aux.weight"] = torch.zeros(3)
    path = tmp_path / "inception.safetensors"
    save_safetensors_atomic(sd, path)
    expected = {"nan": "holds 1 NaN", "zeros": "same features for different images", "misshaped": "mis-shaped",
                "missing": "missing", "extra": "unexpected"}[kind]
    with pytest.raises(CheckpointError) as info:
        load_inception(path)
    assert expected in _one_line(info)
    (tmp_path / "s.npz").write_bytes(b"x")
    code, err = _cli(capsys, ["fid", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"),
                              "--inception-weights", str(path), "--device", "cpu", "--no-progress"])
    assert code == 2 and len(err) == 1 and expected in err[0], err


# --------------------------------------------------------------------------------------------
# 5. hostile and truncated weight files, at every loader
# --------------------------------------------------------------------------------------------

MARKER_NAME = "EXECUTED"


class _Payload:
    """Pickled, it would create a marker file when unpickled by a loader that runs code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _safetensors_parts():
    from safetensors.torch import save

    raw = save({"a": torch.randn(4, 4), "b": torch.randn(3)})
    n = struct.unpack("<Q", raw[:8])[0]
    return raw, json.loads(raw[8:8 + n]), raw[8 + n:]


def _with_header(header, body, length=None):
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + body


def _hostile_files(folder: Path) -> dict:
    raw, header, body = _safetensors_parts()

    def lie(key, field, value):
        h = json.loads(json.dumps(header))
        h[key][field] = value
        return _with_header(h, body)

    marker = str(folder / MARKER_NAME)
    zip_payload = io.BytesIO()
    torch.save({"a": _Payload(marker)}, zip_payload)
    truncated_pt = io.BytesIO()
    torch.save({"a": torch.randn(64)}, truncated_pt)
    return {
        "truncated.safetensors": raw[:-10],
        "truncated-header.safetensors": raw[:20],
        "offsets-beyond-end.safetensors": lie("a", "data_offsets", [0, 10 ** 6]),
        "negative-offsets.safetensors": lie("a", "data_offsets", [-4, 60]),
        "overlapping.safetensors": lie("b", "data_offsets", [0, 12]),
        "shape-lie.safetensors": lie("a", "shape", [10 ** 6, 10 ** 6]),
        "bad-dtype.safetensors": lie("a", "dtype", "Q9"),
        "huge-header-length.safetensors": _with_header(header, body, length=2 ** 62),
        "header-not-json.safetensors": struct.pack("<Q", 5) + b"{abcd" + body,
        "header-a-list.safetensors": _with_header([1, 2], body),
        "zero-bytes.safetensors": b"",
        "random-bytes.safetensors": bytes(range(256)) * 4,
        "zero-bytes.pt": b"",
        "truncated.pt": truncated_pt.getvalue()[:100],
        "pickle-payload.pt": pickle.dumps({"a": _Payload(marker)}, protocol=2),
        "pickle-payload-zip.bin": zip_payload.getvalue(),
        "text.ckpt": b"hello, not a checkpoint",
        "no-tensors.pt": _torch_bytes({"step": 3}),
        "a-list.pt": _torch_bytes([torch.zeros(2)]),
    }


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    paths = {}
    for name, data in _hostile_files(folder).items():
        (folder / name).write_bytes(data)
        paths[name] = folder / name
    (folder / "a-folder.safetensors").mkdir()  # a directory where a file is expected
    paths["a-folder.safetensors"] = folder / "a-folder.safetensors"
    (folder / "empty-folder").mkdir()
    paths["empty-folder"] = folder / "empty-folder"
    nested = folder / "folder-with-folder"
    (nested / "model.safetensors").mkdir(parents=True)
    paths["folder-with-folder"] = nested
    paths["missing.safetensors"] = folder / "missing.safetensors"
    return folder, paths


HOSTILE_NAMES = [
    "truncated.safetensors", "truncated-header.safetensors", "offsets-beyond-end.safetensors",
    "negative-offsets.safetensors", "overlapping.safetensors", "shape-lie.safetensors", "bad-dtype.safetensors",
    "huge-header-length.safetensors", "header-not-json.safetensors", "header-a-list.safetensors",
    "zero-bytes.safetensors", "random-bytes.safetensors", "zero-bytes.pt", "truncated.pt", "pickle-payload.pt",
    "pickle-payload-zip.bin", "text.ckpt", "no-tensors.pt", "a-list.pt", "a-folder.safetensors", "empty-folder",
    "folder-with-folder", "missing.safetensors",
]
LOADERS = ["read_state_dict", "read_tensor_shapes", "build-pretrained", "tokenizer", "inception"]


def _load(loader: str, path: Path, shapes_gen):
    if loader == "read_state_dict":
        return read_state_dict(path)
    if loader == "read_tensor_shapes":
        return read_tensor_shapes(path)
    if loader == "build-pretrained":
        return aimkit.build("aim-tiny-shapes", pretrained=path)
    if loader == "tokenizer":
        return type(shapes_gen.tokenizer)().load_weights(path)
    from aimkit.eval.inception import load_inception

    return load_inception(path)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_file_is_one_line_and_runs_nothing(hostile, shapes_gen, name, loader):
    folder, paths = hostile
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may half-load with a warning either
        with pytest.raises(aimkit.AimkitError) as info:
            _load(loader, paths[name], shapes_gen)
    _one_line(info)
    assert not (folder / MARKER_NAME).exists(), "a pickle payload was executed"


def test_hostile_weights_through_the_cli(hostile, tmp_path, capsys):
    _, paths = hostile
    for name in ("pickle-payload.pt", "offsets-beyond-end.safetensors", "zero-bytes.pt", "a-folder.safetensors"):
        code, err = _cli(capsys, ["convert", str(paths[name]), str(tmp_path / "out"), "--model", "aim-tiny-shapes"])
        assert code == 2 and len(err) == 1 and err[0].startswith("aimkit convert: error: "), (name, err)
        assert not (tmp_path / "out").exists()


def test_hostile_model_file_in_a_saved_folder(saved, tmp_path, hostile):
    _, paths = hostile
    for name in ("truncated.safetensors", "offsets-beyond-end.safetensors", "zero-bytes.safetensors"):
        folder = tmp_path / name
        shutil.copytree(saved, folder)
        shutil.copyfile(paths[name], folder / "model.safetensors")
        with pytest.raises(CheckpointError) as info:
            aimkit.build(folder)
        assert "model.safetensors" in _one_line(info)


# --------------------------------------------------------------------------------------------
# 4. aimkit convert: a non-empty target is refused, the result appears atomically
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def official_file(shapes_gen, tmp_path_factory):
    path = tmp_path_factory.mktemp("official") / "official.safetensors"
    save_safetensors_atomic(to_official(shapes_gen), path)
    return path


def test_convert_refuses_a_non_empty_directory(official_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    code, err = _cli(capsys, ["convert", str(official_file), str(out), "--model", "aim-tiny-shapes"])
    assert code == 2 and len(err) == 1 and "is not empty (config.json)" in err[0] and "--force" in err[0]
    assert (out / "config.json").read_text() == '{"mine": true}'
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_convert_force_writes_into_a_non_empty_directory(official_file, shapes_gen, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "config.json").write_text("{}")
    code, _ = _cli(capsys, ["convert", str(official_file), str(out), "--model", "aim-tiny-shapes", "--force"])
    assert code == 0
    assert (out / "notes.txt").read_text() == "keep me"
    again = aimkit.build(out)
    assert torch.equal(again.tok_embed.weight, shapes_gen.tok_embed.weight)


@pytest.mark.parametrize("existing", ["absent", "empty"])
def test_convert_into_a_new_or_empty_directory_leaves_no_temporaries(official_file, tmp_path, capsys, existing):
    out = tmp_path / "out"
    if existing == "empty":
        out.mkdir()
    code, _ = _cli(capsys, ["convert", str(official_file), str(out), "--model", "aim-tiny-shapes"])
    assert code == 0
    written = ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no hidden temporary folder left
    assert oct(out.stat().st_mode & 0o777) != oct(0o700)  # an ordinary folder, not mkdtemp's 0700


def test_convert_failure_leaves_nothing(tmp_path, capsys, hostile):
    _, paths = hostile
    out = tmp_path / "out"
    code, err = _cli(capsys, ["convert", str(paths["truncated.safetensors"]), str(out), "--model", "aim-tiny-shapes"])
    assert code == 2 and len(err) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["target-is-file", "parent-is-file", "num-groups-alone", "bad-num-groups"])
def test_convert_user_errors_exit_2(official_file, tmp_path, capsys, case):
    (tmp_path / "afile").write_text("x")
    out = {"target-is-file": tmp_path / "afile", "parent-is-file": tmp_path / "afile" / "out"}.get(case, tmp_path / "o")
    extra = {"num-groups-alone": ["--num-groups", "2"], "bad-num-groups": ["--conditioning", "adaln-group",
                                                                           "--num-groups", "-1"]}.get(case, [])
    code, err = _cli(capsys, ["convert", str(official_file), str(out), "--model", "aim-tiny-shapes", *extra])
    assert code == 2 and len(err) == 1, err
    assert (tmp_path / "afile").read_text() == "x"


# --------------------------------------------------------------------------------------------
# 6. CLI user errors: fid, list, bench
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["missing-samples", "samples-is-dir", "missing-ref", "weights-missing",
                                  "weights-dir", "batch-size", "splits", "dims"])
def test_fid_user_errors_exit_2(tmp_path, capsys, case):
    (tmp_path / "s.npz").write_bytes(b"x")
    (tmp_path / "d").mkdir()
    samples = {"missing-samples": tmp_path / "nope.npz", "samples-is-dir": tmp_path / "d"}.get(case, tmp_path / "s.npz")
    ref = tmp_path / ("nope.npz" if case == "missing-ref" else "s.npz")
    weights = {"weights-missing": tmp_path / "nope.pth", "weights-dir": tmp_path / "d"}.get(case, tmp_path / "nope.pth")
    extra = {"batch-size": ["--batch-size", "0"], "splits": ["--splits", "x"], "dims": ["--dims", "100"]}.get(case, [])
    code, err = _cli(capsys, ["fid", str(samples), "--ref", str(ref), "--inception-weights", str(weights),
                              "--device", "cpu", *extra])
    assert code == 2 and len(err) == 1 and err[0].startswith("aimkit fid: error: "), err


def test_list_with_a_pattern_matching_nothing(capsys):
    code, err = _cli(capsys, ["list", "nothing-like-this-*"])
    assert code == 2 and len(err) == 1 and "no registered name matches" in err[0]
    assert _cli(capsys, ["list", "aim-tiny*"])[0] == 0


@pytest.mark.parametrize("argv,expected", [
    (["--device", "gpu"], "unknown --device 'gpu'"),
    (["--device", "meta"], "--device must be cuda, cuda:N or cpu"),
    (["--budget-s", "nan"], "--budget-s must be a finite number"),
    (["--budget-s", "-1"], "--budget-s must be a finite number"),
    (["--dtype", "int8"], "--dtype must be a floating-point dtype"),
    (["--dtype", "nonsense"], "--dtype must be a floating-point dtype"),
    (["--compare-tokens", "0"], "--compare-tokens must be positive"),
    (["--decode-batches", "-2"], "--decode-batches must be positive"),
    (["--repeats", "0"], "--repeats must be positive"),
    (["--repeats", "x"], "invalid int value"),
    (["--override", "d_model=abc"], "d_model must be"),
    (["--override", "d_state=1.5"], "d_state must be int"),
    (["--out", "FILE"], "exists and is not a directory"),
])
def test_bench_user_errors_exit_2_before_any_work(tmp_path, capsys, argv, expected):
    (tmp_path / "afile").write_text("x")
    argv = [str(tmp_path / "afile") if a == "FILE" else a for a in argv]
    if "--device" not in argv:
        argv = ["--device", "cpu", *argv]
    code, err = _cli(capsys, ["bench", *argv])
    assert code == 2 and len(err) == 1 and expected in err[0], err


def test_atomic_writer_never_replaces_a_non_regular_file(tmp_path):
    """A device, FIFO or folder at the target is refused, never swapped for a regular file
    (``aimkit generate --out /dev/null`` once replaced the device node)."""
    import errno
    import os
    import stat

    from aimkit._io import write_text_atomic
    from aimkit.errors import environment_error_message

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "folder").mkdir()
    for target in (fifo, tmp_path / "folder"):
        with pytest.raises(FileExistsError) as info:
            write_text_atomic(target, "x")
        assert info.value.errno == errno.EEXIST
        want = f"exists and is not a regular file; refusing to replace it: {target}"
        assert environment_error_message(info.value) == want
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and (tmp_path / "folder").is_dir()
    assert list(tmp_path.iterdir()) == [fifo, tmp_path / "folder"] or sorted(tmp_path.iterdir()) == sorted(
        [fifo, tmp_path / "folder"])  # no temporary file left
