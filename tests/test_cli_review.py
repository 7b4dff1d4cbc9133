"""Command-line review: lost data, one-line errors before any work, help that matches the code."""

from __future__ import annotations

import numpy as np
import pytest

from aimkit._lock import LOCK_NAME
from aimkit.cli import main
from aimkit.eval.fid_sampling import MANIFEST_NAME


def _one_line(capsys, prefix):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(prefix), err
    return err[0]


def _sample_argv(out, *extra):
    return ["sample", "--model", "aim-tiny-shapes", "--num", "2", "--labels", "random", "--out", str(out),
            "--device", "cpu", "--no-progress", "-q", *extra]


# ------------------------------------------------------------------------------------------ aimkit sample


def test_sample_delete_shards_removes_only_the_shards(tmp_path, capsys, fresh_accelerate_state):
    """--delete-shards with --shard-dir naming a folder in use (here the one holding --out) keeps the
    user's files and the packed npz; a folder of its own is removed."""
    (tmp_path / "precious.txt").write_text("keep me")
    out = tmp_path / "s.npz"
    code = main(_sample_argv(out, "--shard-dir", str(tmp_path), "--delete-shards", "--shard-size", "1"))
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt", "s.npz"]
    assert (tmp_path / "precious.txt").read_text() == "keep me"

    own = tmp_path / "t.npz"
    assert main(_sample_argv(own, "--delete-shards")) == 0
    assert own.is_file() and not (tmp_path / "t.npz.shards").exists()


def test_sample_bad_sampling_settings_are_refused_before_the_manifest(tmp_path, capsys, no_build,
                                                                      fresh_accelerate_state):
    """A bad --top-p (etc.) is one line before the build; nothing is recorded in the shard folder, so
    the corrected rerun is not refused as 'a run with other settings'."""
    out = tmp_path / "s.npz"
    for extra, words in ((["--top-p", "2"], "top_p"), (["--temperature", "-1"], "temperature"),
                         (["--cfg-scale", "nan"], "cfg_scale"), (["--top-k", "-3"], "top_k")):
        assert main(_sample_argv(out, *extra)) == 2, extra
        assert words in _one_line(capsys, "aimkit sample: error: "), extra
    shard_dir = tmp_path / "s.npz.shards"
    assert not (shard_dir / MANIFEST_NAME).exists()
    assert not shard_dir.exists() or {p.name for p in shard_dir.iterdir()} <= {LOCK_NAME}


# ------------------------------------------------------------------------------------------ aimkit fid


def _stats(path, value):
    np.savez(path, mu=np.full(64, value), sigma=np.eye(64))
    return path


def test_fid_save_stats_never_replaces_an_input(tmp_path, capsys):
    samples, ref = _stats(tmp_path / "samples.npz", 0.0), _stats(tmp_path / "ref.npz", 0.1)
    before = ref.read_bytes()
    for target, what in ((ref, "--ref"), (samples, "SAMPLES")):
        code = main(["fid", str(samples), "--ref", str(ref), "--dims", "64", "--save-stats", str(target)])
        assert code == 2
        assert f"is the {what} file" in _one_line(capsys, "aimkit fid: error: ")
    assert ref.read_bytes() == before


def test_fid_save_stats_folder_is_checked_before_any_work(tmp_path, capsys, monkeypatch):
    samples, ref = _stats(tmp_path / "samples.npz", 0.0), _stats(tmp_path / "ref.npz", 0.1)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir.npz").mkdir()

    def boom(*a, **k):
        raise AssertionError("FID computed before --save-stats was checked")

    monkeypatch.setattr("aimkit.eval.fid.compute_fid", boom)
    for target, words in ((tmp_path / "afile" / "s.npz", "exists and is not a directory"),
                          (tmp_path / "adir.npz", "is a folder"), (tmp_path / "s.txt", "must end in .npz")):
        code = main(["fid", str(samples), "--ref", str(ref), "--dims", "64", "--save-stats", str(target)])
        assert code == 2, target
        assert words in _one_line(capsys, "aimkit fid: error: "), target


# ------------------------------------------------------------------------------------------ aimkit eval, info


def test_eval_empty_grid_name_is_refused_before_sampling(tmp_path, capsys, monkeypatch, no_build):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("aimkit.build", lambda *a, **k: pytest.fail("built before --grid was checked"))
    for option in ("--grid", "--json"):
        assert main(["eval", "--num", "2", "--device", "cpu", "--no-progress", option, ""]) == 2
        assert "is an existing directory" in _one_line(capsys, "aimkit eval: error: ")


def test_info_unknown_device_is_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["info", "aim-test-mamba2", "--device", "bogus"])
    assert info.value.code == 2
    assert "invalid choice" in _one_line(capsys, "aimkit info: error: ")


# ------------------------------------------------------------------------------------------ aimkit tokenize


def _image_folder(root):
    from PIL import Image

    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        Image.new("RGB", (32, 32), (200, 0, 0)).save(root / c / "0.png")
    return root


@pytest.mark.parametrize("device, words", [("bogus", "unknown --device 'bogus'"), ("mps", "must be cpu, cuda"),
                                           ("cuda", "no CUDA device"), ("cuda:0", "no CUDA device")])
def test_tokenize_bad_device_is_one_line_before_any_work(tmp_path, capsys, device, words):
    if device.startswith("cuda") and __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is present")
    data = _image_folder(tmp_path / "data")
    code = main(["tokenize", "--data", str(data), "--out", str(tmp_path / "tok"), "--model", "aim-tiny-shapes",
                 "--workers", "0", "--no-progress", "--device", device])
    assert code == 2
    assert words in _one_line(capsys, "aimkit tokenize: error: ")
    assert not (tmp_path / "tok").exists()


def test_tokenize_out_inside_data_is_refused(tmp_path, capsys):
    """Tokens written inside the image tree become a class folder of the next (resumed) run."""
    data = _image_folder(tmp_path / "data")
    for out in (data / "tok", data):
        code = main(["tokenize", "--data", str(data), "--out", str(out), "--model", "aim-tiny-shapes",
                     "--workers", "0", "--no-progress"])
        assert code == 2
        assert "is inside --data" in _one_line(capsys, "aimkit tokenize: error: ")
    assert sorted(p.name for p in data.iterdir()) == ["a", "b"]


# ------------------------------------------------------------------------------------------ aimkit plot


def test_plot_never_replaces_the_metrics_it_reads(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0, "lr": 0.001, "grad_norm": 1.0}\n')
    before = metrics.read_bytes()
    assert main(["plot", str(tmp_path), "--out", str(metrics)]) == 2
    assert "is the metrics file itself" in _one_line(capsys, "aimkit plot: error: ")
    assert metrics.read_bytes() == before


# ------------------------------------------------------------------------------------------ aimkit train


def test_train_overrides_may_follow_the_options(tmp_path, capsys):
    """``--config X --print-config lr=...``: overrides after an option reach the config (argparse alone
    refuses them as 'unrecognized arguments'); an unknown option is still one line."""
    code = main(["train", "--config", "tiny_test", f"output_dir={tmp_path}", "--print-config", "lr=0.125",
                 "max_steps=7"])
    out = capsys.readouterr().out
    assert code == 0 and "lr: 0.125" in out and "max_steps: 7" in out and f"output_dir: {tmp_path}" in out
    with pytest.raises(SystemExit) as info:
        main(["train", "--config", "tiny_test", "--print-config", "lr=0.1", "--bogus"])
    assert info.value.code == 2
    assert "unrecognized arguments: --bogus" in _one_line(capsys, "aimkit train: error: ")


def test_python_m_aimkit_training_takes_overrides_after_its_options(tmp_path, capsys):
    from aimkit.training.cli import main as training_main

    assert training_main(["--config", "tiny_test", f"output_dir={tmp_path}", "--print-config", "lr=0.125"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.125" in out and f"output_dir: {tmp_path}" in out


@pytest.mark.parametrize("argv", [["--bogus"], [], ["--config", "tiny_test", "--resume"]])
def test_python_m_aimkit_training_says_a_usage_error_in_one_line(capsys, argv):
    from aimkit.training.cli import main as training_main

    with pytest.raises(SystemExit) as info:
        training_main(argv)
    assert info.value.code == 2
    _one_line(capsys, "aimkit train: error: ")


def test_an_unknown_option_of_a_subcommand_is_named_after_it(capsys):
    with pytest.raises(SystemExit) as info:
        main(["list", "--nmu", "4"])
    assert info.value.code == 2
    assert "unrecognized arguments: --nmu" in _one_line(capsys, "aimkit list: error: ")


def test_train_quiet_turns_the_progress_bar_off(tmp_path, monkeypatch):
    seen = {}

    def fake_run(args):
        from aimkit.training.config import load_config

        seen["cfg"] = load_config(args.config, args.overrides)
        return 0

    monkeypatch.setattr("aimkit.training.cli.run", fake_run)
    assert main(["train", "--config", "tiny_test", f"output_dir={tmp_path}", "-q"]) == 0
    assert seen["cfg"].progress_bar is False
    assert main(["train", "--config", "tiny_test", f"output_dir={tmp_path}", "-q", "progress_bar=true"]) == 0
    assert seen["cfg"].progress_bar is True  # said explicitly: kept
    assert main(["train", "--config", "tiny_test", f"output_dir={tmp_path}"]) == 0
    assert seen["cfg"].progress_bar is True


def test_eval_bad_sampling_settings_are_refused_before_the_build(capsys, monkeypatch):
    monkeypatch.setattr("aimkit.build", lambda *a, **k: pytest.fail("built before the settings were checked"))
    for extra, words in ((["--top-k", "-1"], "top_k"), (["--top-p", "0"], "top_p"),
                         (["--temperature", "-2"], "temperature"), (["--cfg-scale", "inf"], "cfg_scale")):
        assert main(["eval", "--num", "2", "--device", "cpu", "--no-progress", *extra]) == 2, extra
        assert words in _one_line(capsys, "aimkit eval: error: "), extra


def test_generate_help_says_the_batch_size_changes_the_images(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the same seed, --batch-size and device give the same images" in text
