"""Tests of the FID pipeline: sharded sampling, ADM npz packing, the FID Inception network, FID/IS, CLI."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY_MAMBA, randomize_
from torch import nn

import aimkit
from aimkit.cli import main
from aimkit.errors import AimkitError, CheckpointError, ConfigError
from aimkit.eval.fid import NpzArrayReader, compute_statistics, fid_from_npz, inception_score
from aimkit.eval.fid_sampling import (
    LABELS_NAME,
    MANIFEST_NAME,
    balanced_labels,
    pack_npz,
    resolve_sample_labels,
    sample_to_shards,
    shard_name,
    shard_seed,
)
from aimkit.eval.frechet import frechet_distance
from aimkit.eval.inception import (
    INCEPTION_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_FILE,
    KNOWN_WEIGHT_FILES,
    FIDInceptionV3,
    _avg_pool_same,
    load_inception,
)

TINY = TINY_MAMBA


class PaletteDecoder(nn.Module):
    """Stands in for a tokenizer: each of the 4 x 4 codes becomes a 4 x 4 patch of a fixed colour."""

    def __init__(self, vocab_size=64, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("palette", torch.rand(vocab_size, 3, generator=g) * 2 - 1)

    def decode(self, codes):  # (B, 16) -> (B, 3, 16, 16) in [-1, 1]
        grid = self.palette[codes].view(codes.shape[0], 4, 4, 3).permute(0, 3, 1, 2)
        return grid.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)


def _pixel_gen(seed=0):
    torch.manual_seed(seed)
    gen = randomize_(aimkit.build("aim-b", **TINY), seed=seed)
    gen.tokenizer = PaletteDecoder()
    return gen


class CountingStub:
    """A generator double recording every generate call; images depend only on (seed, labels)."""

    num_classes = 4

    def __init__(self):
        self.calls = []

    def generate(self, labels, *, seed, output, batch_size, progress=False, **sampling):
        assert output == "uint8" and batch_size == len(labels)
        self.calls.append((labels.tolist(), seed))
        g = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (len(labels), 8, 8, 3), generator=g, dtype=torch.uint8).numpy()
        images[:, 0, 0, 0] = labels.numpy()
        return images


def _load_npz(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


# ------------------------------------------------------------------------------------------ sampling


def test_packed_npz_has_the_adm_layout_and_fid_settings(tmp_path):
    gen = _pixel_gen()
    run = sample_to_shards(gen, tmp_path / "shards", 10, seed=3, batch_size=2, shard_size=4, progress=False)
    assert run.total_shards == 3 and run.written == (0, 1, 2) and run.images == 10
    out = pack_npz(tmp_path / "shards", tmp_path / "samples.npz")
    data = _load_npz(out)
    assert sorted(data) == ["arr_0", "arr_1"]
    images, labels = data["arr_0"], data["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (10, 16, 16, 3)
    assert images.min() >= 0 and images.max() <= 255 and len(np.unique(images)) > 10
    assert labels.dtype == np.int64 and sorted(labels.tolist()) == list(range(10))  # balanced: one per class
    np.testing.assert_array_equal(labels, np.load(tmp_path / "shards" / LABELS_NAME))

    manifest = json.loads((tmp_path / "shards" / MANIFEST_NAME).read_text())
    fid = gen.config.fid_sampling
    assert manifest["sampling"] == {
        "cfg_scale": fid.cfg_scale, "temperature": fid.temperature, "top_k": fid.top_k, "top_p": fid.top_p
    }
    # the first batch of shard 1 is exactly one generate call with that batch's derived seed
    direct = gen.generate(torch.from_numpy(labels[4:6]), seed=shard_seed(3, 1, 0), output="uint8", progress=False)
    np.testing.assert_array_equal(images[4:6], direct)


def test_balanced_labels():
    labels = balanced_labels(40, 4, seed=3)
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [10, 10, 10, 10]
    np.testing.assert_array_equal(labels, balanced_labels(40, 4, seed=3))
    assert not np.array_equal(labels, np.sort(labels))
    assert not np.array_equal(labels, balanced_labels(40, 4, seed=4))
    with pytest.raises(ConfigError, match="divisible by the 4 classes.*40 or 44"):
        balanced_labels(41, 4)


def test_label_files_and_checks(tmp_path):
    text = tmp_path / "labels.txt"
    text.write_text("# class ids\n1\n0\n\n3\n")
    labels, source = resolve_sample_labels(text, 3, num_classes=4)
    assert labels.tolist() == [1, 0, 3] and "labels.txt" in source
    np.save(tmp_path / "labels.npy", np.array([2, 2, 1], dtype=np.int32))
    assert resolve_sample_labels(tmp_path / "labels.npy", 3, 4)[0].tolist() == [2, 2, 1]
    with pytest.raises(ConfigError, match="5 images were asked for .* hold 3"):
        resolve_sample_labels(text, 5, 4)
    with pytest.raises(ConfigError, match="label 3 .* outside \\[0, 3\\)"):
        resolve_sample_labels(text, 3, 3)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_sample_labels(tmp_path / "nope.txt", 3, 4)
    random_labels, _ = resolve_sample_labels("random", 50, 4, seed=1)
    assert random_labels.min() >= 0 and random_labels.max() < 4
    np.testing.assert_array_equal(random_labels, resolve_sample_labels(None, 50, 4, seed=1)[0])


def test_resume_regenerates_only_the_missing_shard(tmp_path):
    shards = tmp_path / "shards"
    stub = CountingStub()
    sample_to_shards(stub, shards, 12, seed=5, batch_size=2, shard_size=3, progress=False)
    assert len(stub.calls) == 8  # 4 shards of 3 images: batches of 2 + 1
    first = _load_npz(pack_npz(shards, tmp_path / "a.npz"))

    (shards / shard_name(2)).unlink()
    with pytest.raises(ConfigError, match="missing 1 of 4 shards \\(2\\)"):
        pack_npz(shards, tmp_path / "b.npz")
    again = CountingStub()
    run = sample_to_shards(again, shards, 12, seed=5, batch_size=2, shard_size=3, progress=False)
    assert run.written == (2,) and run.skipped == (0, 1, 3)
    assert [labels for labels, _ in again.calls] == [first["arr_1"][6:8].tolist(), first["arr_1"][8:9].tolist()]
    second = _load_npz(pack_npz(shards, tmp_path / "b.npz"))
    np.testing.assert_array_equal(first["arr_0"], second["arr_0"])
    np.testing.assert_array_equal(first["arr_1"], second["arr_1"])
    np.testing.assert_array_equal(second["arr_0"][:, 0, 0, 0], second["arr_1"])  # images in label order

    with pytest.raises(ConfigError, match="other settings.*seed: 5 on disk vs 6 now"):
        sample_to_shards(CountingStub(), shards, 12, seed=6, batch_size=2, shard_size=3, progress=False)


def test_resume_with_other_weights_is_refused(tmp_path):
    sample_to_shards(_pixel_gen(seed=0), tmp_path, 2, labels=[1, 2], batch_size=2, shard_size=1, progress=False)
    with pytest.raises(ConfigError, match="other settings \\(weights_fingerprint: "):
        sample_to_shards(_pixel_gen(seed=1), tmp_path, 2, labels=[1, 2], batch_size=2, shard_size=1, progress=False)


def test_result_does_not_depend_on_the_number_of_processes(tmp_path):
    gen = _pixel_gen()
    kwargs = dict(labels="random", seed=11, batch_size=2, shard_size=3, progress=False)
    sample_to_shards(gen, tmp_path / "one", 8, **kwargs)
    runs = [sample_to_shards(gen, tmp_path / "three", 8, process_index=p, num_processes=3, **kwargs) for p in range(3)]
    assert [r.written for r in runs] == [(0,), (1,), (2,)]  # 3 shards, one per process
    one = _load_npz(pack_npz(tmp_path / "one", tmp_path / "one.npz"))
    three = _load_npz(pack_npz(tmp_path / "three", tmp_path / "three.npz"))
    np.testing.assert_array_equal(one["arr_0"], three["arr_0"])
    np.testing.assert_array_equal(one["arr_1"], three["arr_1"])


def test_npz_reader_streams_rows(tmp_path):
    arr = np.arange(7 * 2 * 3, dtype=np.int16).reshape(7, 2, 3)
    for save in (np.savez, np.savez_compressed):
        path = tmp_path / f"{save.__name__}.npz"
        save(path, arr_0=arr)
        with NpzArrayReader(path) as reader:
            assert reader.shape == (7, 2, 3) and reader.dtype == np.int16
            np.testing.assert_array_equal(np.concatenate(list(reader.batches(3))), arr)
    with pytest.raises(ConfigError, match="no array 'arr_1'"):
        NpzArrayReader(path, "arr_1")


# ------------------------------------------------------------------------------------------ statistics


def _index_images(n):
    """(n, 2, 2, 3) uint8 images that encode their own row index in two pixels."""
    images = np.zeros((n, 2, 2, 3), dtype=np.uint8)
    images[:, 0, 0, 0], images[:, 0, 1, 0] = np.arange(n) // 256, np.arange(n) % 256
    return images


def _lookup_extractor(features):
    table = torch.as_tensor(features)

    def extract(x):  # (B, 3, 2, 2) in [0, 1] -> the feature rows the images encode
        index = (x[:, 0, 0, 0] * 255).round().long() * 256 + (x[:, 0, 0, 1] * 255).round().long()
        return table[index]

    return extract


def test_frechet_distance_of_known_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 0.25, 2.0]), np.array([2.0, 1.0, 1.0, 0.5])
    closed_form = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(closed_form, rel=1e-9)

    n = 20000
    f1 = (mu1 + rng.standard_normal((n, 4)) * np.sqrt(var1)).astype(np.float32)
    f2 = (mu2 + rng.standard_normal((n, 4)) * np.sqrt(var2)).astype(np.float32)
    images = _index_images(n)
    s1 = compute_statistics(images, _lookup_extractor(f1), batch_size=777)
    s2 = compute_statistics(images, _lookup_extractor(f2), batch_size=1000)
    np.testing.assert_allclose(s1.mu, f1.astype(np.float64).mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(s1.sigma, np.cov(f1.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)
    assert s1.num_images == n and s1.inception_score is None

    fid = frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
    # independent route: Tr((S1 S2)^1/2) from the eigenvalues of S1 S2 (real, non-negative)
    eig = np.linalg.eigvals(s1.sigma @ s2.sigma).real
    independent = np.sum((s1.mu - s2.mu) ** 2) + np.trace(s1.sigma) + np.trace(s2.sigma) - 2 * np.sqrt(eig).sum()
    assert fid == pytest.approx(independent, rel=1e-8)
    assert fid == pytest.approx(closed_form, abs=0.15)  # sampling error of 20k samples


def test_inception_score():
    assert inception_score(torch.zeros(20, 7), splits=2)[0] == pytest.approx(1.0)
    confident = torch.full((30, 10), -50.0)
    confident[torch.arange(30), torch.arange(30) % 10] = 50.0
    mean, std = inception_score(confident, splits=3)  # every part: 10 classes, each certain
    assert mean == pytest.approx(10.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ConfigError, match="splits"):
        inception_score(confident, splits=31)


# ------------------------------------------------------------------------------------------ inception


EXPECTED_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_4a_3x3.bn.weight": (192,),
    "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A random-weight FID Inception file in pytorch-fid's layout (torchvision adds BN counters)."""
    torch.manual_seed(0)
    net = FIDInceptionV3()
    state = net.state_dict()
    for key in [k for k in state if k.endswith(".bn.running_var")]:
        state[key[: -len("running_var")] + "num_batches_tracked"] = torch.tensor(0)
    path = tmp_path_factory.mktemp("inception") / INCEPTION_WEIGHTS_FILE
    torch.save(state, path)
    return path


def test_inception_names_shapes_and_forward():
    torch.manual_seed(0)
    net = FIDInceptionV3().eval()
    state = net.state_dict()
    for name, shape in EXPECTED_SHAPES.items():
        assert tuple(state[name].shape) == shape, name
    assert not any("num_batches_tracked" in k for k in state)
    # torchvision's Inception3(num_classes=1008, aux_logits=False) has this many parameters
    assert sum(p.numel() for p in net.parameters()) == 23_850_960
    with torch.no_grad():
        out = net(torch.rand(1, 3, 40, 40))
        assert out.features.shape == (1, 2048) and out.logits.shape == (1, 1008)
        assert torch.isfinite(out.logits).all()
        early = net(torch.rand(2, 3, 40, 40), dims=64)
        assert early.features.shape == (2, 64) and early.logits is None
    assert torch.equal(_avg_pool_same(torch.ones(1, 1, 4, 4)), torch.ones(1, 1, 4, 4))  # padding excluded
    assert net.Mixed_7c.max_pool and not net.Mixed_7b.max_pool


def test_inception_strict_round_trip(inception_file, tmp_path):
    net = load_inception(inception_file, check_hash=False)  # random weights: another SHA-256 (tests/test_fid.py)
    saved = torch.load(inception_file, weights_only=True)
    for name, value in net.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert not net.training and not any(p.requires_grad for p in net.parameters())

    missing = dict(saved)
    del missing["Mixed_6c.branch7x7_1.conv.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="1 missing \\(Mixed_6c.branch7x7_1.conv.weight\\)"):
        load_inception(tmp_path / "missing.pth", check_hash=False)
    extra = dict(saved, **{"AuxLogits.fc.weight": torch.zeros(1008, 768)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="unexpected \\(AuxLogits.fc.weight\\)"):
        load_inception(tmp_path / "extra.pth", check_hash=False)


def test_missing_inception_weights_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr("aimkit.eval.inception.fid_helper_weights_path", lambda: None)
    with pytest.raises(AimkitError) as info:
        load_inception(download=False)
    message = str(info.value)
    for part in (INCEPTION_WEIGHTS_FILE, str(tmp_path / ".cache" / "aimkit"), INCEPTION_WEIGHTS_ENV,
                 "github.com/mseitzer/pytorch-fid/releases"):
        assert part in message
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(tmp_path / "elsewhere.pth"))
    with pytest.raises(AimkitError, match="elsewhere.pth"):
        load_inception()

    np.savez(tmp_path / "s.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    assert main(["fid", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"), "--device", "cpu",
                 "--offline"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("aimkit fid: error: FID Inception weights not found") and "\n" not in err


# ------------------------------------------------------------------------------------------ command line


@pytest.fixture
def trusted_inception_file(inception_file, monkeypatch):
    """The random-weight file, accepted as if it had the SHA-256 of pytorch-fid's (the CLI checks it)."""
    from aimkit._io import sha256_file

    monkeypatch.setitem(KNOWN_WEIGHT_FILES, sha256_file(inception_file), "pytorch-fid")
    return inception_file


def test_cli_sample_then_fid(tmp_path, monkeypatch, capsys, trusted_inception_file, fresh_accelerate_state):
    built = []

    def fake_build(name, pretrained=None, device=None, dtype=None, **overrides):
        built.append((name, pretrained, str(device), dtype, overrides))
        return _pixel_gen()

    monkeypatch.setattr("aimkit.commands.sample.build", fake_build)
    tiny_config = lambda name, **kw: aimkit.resolve_config(name, **TINY, **kw)  # noqa: E731
    monkeypatch.setattr("aimkit.commands.sample.resolve_config", tiny_config)
    out = tmp_path / "samples.npz"
    argv = ["sample", "--model", "aim-b", "--pretrained", "w.safetensors", "--num", "10", "--out", str(out),
            "--batch-size", "2", "--shard-size", "4", "--cfg-scale", "1.5", "--device", "cpu", "--no-progress",
            "--decode-position-offset", "1"]
    assert main(argv) == 0
    assert built == [("aim-b", "w.safetensors", "cpu", "float32", {"decode_position_offset": 1})]
    samples = _load_npz(out)
    assert samples["arr_0"].shape == (10, 16, 16, 3) and samples["arr_0"].dtype == np.uint8
    shard_dir = tmp_path / "samples.npz.shards"
    manifest = json.loads((shard_dir / MANIFEST_NAME).read_text())
    assert manifest["sampling"]["cfg_scale"] == 1.5 and manifest["sampling"]["top_k"] == 0  # override + preset
    assert "wrote" in capsys.readouterr().err  # the status line (logged on stderr)

    (shard_dir / shard_name(1)).unlink()  # an interrupted run: rerunning fills the gap, same result
    out.unlink()
    assert main(argv) == 0
    np.testing.assert_array_equal(_load_npz(out)["arr_0"], samples["arr_0"])
    assert "skipped 2 finished shards" in capsys.readouterr().err

    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    capsys.readouterr()
    assert main(["fid", str(out), "--ref", str(ref), "--inception-weights", str(trusted_inception_file),
                 "--dims", "64", "--device", "cpu", "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fid"] >= 0 and np.isfinite(report["fid"]) and report["num_samples"] == 10
    assert report["reference_statistics"] == "images" and report["inception_score"] is None


@pytest.mark.slow
def test_fid_2048_with_reference_statistics_and_inception_score(tmp_path, capsys, trusted_inception_file):
    """The default FID path (2048-d features, stored mu/sigma, IS); sqrtm of 2048 x 2048 is slow on CPU."""
    inception_file = trusted_inception_file
    net = load_inception(inception_file)
    rng = np.random.default_rng(0)
    samples, ref_images = (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in (12, 8))
    ref_stats = compute_statistics(ref_images, net, batch_size=4)
    np.savez(tmp_path / "s.npz", arr_0=samples)
    np.savez(tmp_path / "ref.npz", arr_0=ref_images, mu=ref_stats.mu, sigma=ref_stats.sigma)
    result = fid_from_npz(tmp_path / "s.npz", tmp_path / "ref.npz", net, batch_size=5)
    assert result.ref_source == "precomputed" and result.num_samples == 12
    assert np.isfinite(result.fid) and result.inception_score >= 1.0 - 1e-6
    assert main(["fid", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"),
                 "--inception-weights", str(inception_file), "--device", "cpu", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("FID: ") and "Inception Score: " in printed


def test_shards_are_written_in_the_background_in_order_and_errors_surface(tmp_path, monkeypatch):
    """Shard k is written by the writer thread while shard k + 1 is sampled; the shards land in
    order, the run returns only when the last write is done, and a failed write stops the run."""
    import threading

    import aimkit.eval.fid_sampling as fid_sampling

    real_write, written = fid_sampling.write_shard, []

    def recording_write(out_dir, shard, images, labels, run):
        written.append((shard, threading.current_thread().name))
        real_write(out_dir, shard, images, labels, run)

    monkeypatch.setattr(fid_sampling, "write_shard", recording_write)
    sample_to_shards(CountingStub(), tmp_path / "ok", 12, seed=5, batch_size=2, shard_size=3, progress=False)
    assert [s for s, _ in written] == [0, 1, 2, 3]
    assert all(name.startswith("aimkit-shard-writer") for _, name in written)
    assert pack_npz(tmp_path / "ok", tmp_path / "ok.npz").is_file()  # every shard and record complete

    def failing_write(out_dir, shard, images, labels, run):
        if shard == 1:
            raise OSError("disk full")
        real_write(out_dir, shard, images, labels, run)

    monkeypatch.setattr(fid_sampling, "write_shard", failing_write)
    stub = CountingStub()
    with pytest.raises(OSError, match="disk full"):
        sample_to_shards(stub, tmp_path / "bad", 12, seed=5, batch_size=2, shard_size=3, progress=False)
    assert len(stub.calls) <= 6  # stopped at the next shard's write, not after sampling everything


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("shard_size,failing_call,kept", [(1, 2, 1), (2, 2, 0), (2, 3, 1)])
def test_a_run_interrupted_while_sampling_keeps_the_shards_already_sampled(tmp_path, monkeypatch, error, shard_size,
                                                                            failing_call, kept):
    """A shard's last batch is decoded behind the next batch: when that one fails (an error, or
    Ctrl-C), every shard whose batches were all sampled is still written, a shard cut in the
    middle is not, and a resumed run samples only the rest."""
    from aimkit.samplers.autoregressive import AutoregressiveSampler

    gen, calls, num = _pixel_gen(), [], 3 * shard_size
    original = AutoregressiveSampler.sample_tokens

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == failing_call:
            raise error("sampling failed")
        return original(self, *args, **kwargs)

    labels = [1, 2, 3, 0, 1, 2][:num]
    monkeypatch.setattr(AutoregressiveSampler, "sample_tokens", failing)
    with pytest.raises(error, match="sampling failed"):
        sample_to_shards(gen, tmp_path, num, labels=labels, batch_size=1, shard_size=shard_size, progress=False)
    assert [(tmp_path / shard_name(s)).is_file() for s in range(3)] == [s < kept for s in range(3)]
    monkeypatch.setattr(AutoregressiveSampler, "sample_tokens", original)
    run = sample_to_shards(gen, tmp_path, num, labels=labels, batch_size=1, shard_size=shard_size, progress=False)
    assert run.written == tuple(range(kept, 3)) and run.skipped == tuple(range(kept))


def test_an_error_after_the_last_batch_still_reaches_the_caller(tmp_path):
    """sample_to_shards drains the batch stream after its last shard: an error raised there is not lost."""

    class LateFailure:
        num_classes = 4

        def generate_batches(self, batches, *, output, progress, **sampling):
            for labels, _ in batches:
                yield np.zeros((len(labels), 8, 8, 3), np.uint8)
            raise RuntimeError("failed after the last batch")

    with pytest.raises(RuntimeError, match="after the last batch"):
        sample_to_shards(LateFailure(), tmp_path, 2, labels=[1, 2], batch_size=1, shard_size=1, progress=False)
