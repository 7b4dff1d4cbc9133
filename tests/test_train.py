"""The training recipe on CPU with a tiny Mamba2 generator.

Data: the procedural shapes exported as an ImageFolder (plus one corrupt file), tokenized by
``aimkit tokenize`` with a tiny randomly initialised VQ tokenizer (64 codes, 4 x 4 grid).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import aimkit
from aimkit.cli import main as cli_main
from aimkit.data.shapes import NUM_CLASSES, export_image_folder
from aimkit.data.tokens import TokenDataset
from aimkit.training import TrainingStopped, find_checkpoint, load_config, train
from aimkit.weights import read_state_dict

REPO = Path(__file__).resolve().parent.parent
TINY_VQ = ["ch=32", "ch_mult=[1,1,1,1,1]", "encoder_res_blocks=1", "decoder_res_blocks=1", "z_channels=32",
           "codebook_size=64"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """72 shapes images (2 per class) -> codes; the corrupt file is skipped and reported."""
    root = tmp_path_factory.mktemp("data")
    images = export_image_folder(root / "images", num_per_class=2, seed=0, image_size=64)
    (images / "00_red_circle" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    out = root / "tokens"
    argv = ["tokenize", "--data", str(images), "--out", str(out), "--tokenizer", "vq-f16", "--random-tokenizer",
            "--image-size", "64", "--batch-size", "36", "--shard-size", "40", "--workers", "0", "--no-progress"]
    for opt in TINY_VQ:
        argv += ["--tokenizer-option", opt]
    import io
    from contextlib import redirect_stderr, redirect_stdout

    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        code = cli_main(argv)
    return SimpleNamespace(dir=out, code=code, stdout=stdout.getvalue(), stderr=stderr.getvalue())


def _cfg(tokens, out, *extra):
    return load_config("tiny_test", [f"data={tokens.dir}", f"output_dir={out}", "global_batch_size=12",
                                     "progress_bar=false", "log_every=1", *extra])


def _final_state(out):
    return read_state_dict(Path(out) / "final" / "model.safetensors")


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# -------------------------------------------------------------------------------------------


def test_tokenize_reports_corrupt_image(tokens):
    assert tokens.code == 0
    assert "skipped 1 unreadable image" in tokens.stdout
    assert "broken.jpg" in tokens.stderr
    ds = TokenDataset(tokens.dir)
    assert len(ds) == 2 * NUM_CLASSES and ds.num_tokens == 16 and ds.codebook_size == 64


def test_loss_goes_down_and_export_loads(tokens, tmp_path):
    out = tmp_path / "run"
    result = train(_cfg(tokens, out, "max_steps=30", "checkpoint_every=100"))
    losses = result.losses
    assert len(losses) == 30 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses

    gen = aimkit.build(str(out / "final"))  # save_pretrained directory -> build
    ckpt = read_state_dict(find_checkpoint(out) / "model.safetensors")
    for k, v in gen.generator_state_dict().items():
        assert torch.equal(v, ckpt[k]), k
    records = _metrics(out)
    assert [r["step"] for r in records] == list(range(1, 31))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "step_time_s"} <= set(records[-1])


def test_kill_and_resume_is_exact(tokens, tmp_path):
    common = ["max_steps=14", "checkpoint_every=5"]  # 6 steps per epoch: the runs cross two epochs
    full = tmp_path / "full"
    train(_cfg(tokens, full, *common))

    split = tmp_path / "split"
    first = train(_cfg(tokens, split, *common, "stop_after=7"))
    assert first.stopped_by == "stop_after" and first.final_dir is None
    ckpts = split / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-")) == ["step-00000005", "step-00000007"]
    # an interrupted checkpoint write and a damaged directory must not be picked up
    (ckpts / ".tmp-step-00000010").mkdir()
    (ckpts / ".tmp-step-00000010" / "model.safetensors").write_bytes(b"partial")
    (ckpts / "step-00000012").mkdir()
    (ckpts / "step-00000012" / "model.safetensors").write_bytes(b"partial")
    assert find_checkpoint(split).name == "step-00000007"

    second = train(_cfg(tokens, split, *common), resume="auto")
    assert second.step == 14 and second.final_dir is not None
    a, b = _final_state(full), _final_state(split)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["loss"] for r in _metrics(full)] == [r["loss"] for r in _metrics(split)]
    assert not (ckpts / ".tmp-step-00000010").exists()  # cleaned up
    kept = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-") and (p / "trainer_state.json").exists())
    assert kept == ["step-00000010", "step-00000014"]  # keep_last: 2


def test_nonfinite_steps_are_skipped_then_stop(tokens, tmp_path, monkeypatch):
    import aimkit.training.step as recipe  # the step every caller runs computes the loss here

    calls = {"n": 0, "bad": set()}

    real = recipe.token_cross_entropy

    def cross_entropy(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] in calls["bad"] else loss

    monkeypatch.setattr(recipe, "token_cross_entropy", cross_entropy)
    calls["bad"] = {3}
    result = train(_cfg(tokens, tmp_path / "one", "max_steps=5"))
    assert result.skipped_steps == 1 and result.step == 5 and result.final_dir is not None
    assert _metrics(tmp_path / "one")[-1]["skipped_steps"] == 1

    calls["n"], calls["bad"] = 0, set(range(4, 100))
    with pytest.raises(TrainingStopped, match="3 consecutive") as info:
        train(_cfg(tokens, tmp_path / "many", "max_steps=20", "checkpoint_every=2", "max_nonfinite=3"))
    assert "step-00000002" in str(info.value)
    assert find_checkpoint(tmp_path / "many").name == "step-00000002"


def test_config_and_resume_messages(tokens, tmp_path, capsys):
    def run(*argv):
        code = cli_main(["train", *argv])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        return err

    assert "missing required config key 'data'" in run("--config", "aim_b", f"output_dir={tmp_path}")
    err = run("--config", "tiny_test", f"output_dir={tmp_path}", "lrr=0.1")
    assert "unknown config key 'lrr'" in err and "'lr'" in err
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: aim-b\ndata: random\noutput_dir: x\nmax_steps: 1\nweight_decy: 0.1\n")
    err = run("--config", str(bad_yaml))
    assert "unknown config key 'weight_decy'" in err and "'weight_decay'" in err and "bad.yaml" in err
    assert "'max_steps' must be int" in run("--config", "tiny_test", f"output_dir={tmp_path}", "max_steps=many")
    assert "did you mean tiny_test" in run("--config", "tiny_tst")

    err = run("--config", "tiny_test", f"output_dir={tmp_path / 'g'}", f"data={tokens.dir}", "policy.train_step=graph",
              "global_batch_size=12", "grad_accum=2")
    assert "policy train_step: graph needs a CUDA device (this run is on cpu), grad_accum 1" in err
    err = run("--config", "tiny_test", f"output_dir={tmp_path / 'g'}", "cuda_graph=true")
    assert "'cuda_graph' is gone" in err and "policy: {train_step: graph}" in err

    empty = tmp_path / "empty" / "checkpoints" / ".tmp-step-00000003"
    empty.mkdir(parents=True)
    err = run("--config", "tiny_test", f"output_dir={tmp_path / 'o'}", "--resume", str(tmp_path / "empty"))
    assert "no valid checkpoint" in err and ".tmp-step-00000003" in err


def test_sigterm_saves_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "aimkit.training", "--config", "tiny_test", f"output_dir={out}", "max_steps=100000",
         "log_every=1", "checkpoint_every=100000", "progress_bar=false"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=tmp_path,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step") and "|" in line and int(line.split()[1]) >= 2:
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=120)
    text = "".join(lines) + rest
    assert proc.returncode == 143, text
    assert "received SIGTERM" in text
    ckpt = find_checkpoint(out)
    assert ckpt is not None and json.loads((ckpt / "trainer_state.json").read_text())["step"] >= 2


def test_two_processes_keep_replicas_equal(tmp_path):
    out = tmp_path / "ddp"
    launcher = Path(sys.executable).parent / "accelerate"
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           "-m", "aimkit.training", "--config", "tiny_test", f"output_dir={out}", "max_steps=3",
           "log_every=1", "check_replicas_every=1", "progress_bar=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    records = _metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        fp = r["replica_fingerprints"]
        assert len(fp) == 2 and fp[0] == fp[1]
    assert len({r["replica_fingerprints"][0] for r in records}) == 3  # the parameters did change
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_recipe_resumes_and_tracks_eager(tokens, tmp_path):
    """policy train_step graph: the captured step trains like the eager one and a killed run resumes exactly."""
    common = ["max_steps=8", "checkpoint_every=4", "num_workers=0", "model_args={class_dropout: 0.0}"]
    eager = train(_cfg(tokens, tmp_path / "eager", *common))
    graphed = train(_cfg(tokens, tmp_path / "graphed", *common, "policy.train_step=graph"))
    assert graphed.losses == pytest.approx(eager.losses, rel=2e-2)  # same maths, other kernel order
    first = train(_cfg(tokens, tmp_path / "split", *common, "policy.train_step=graph", "stop_after=4"))
    assert first.stopped_by == "stop_after"
    second = train(_cfg(tokens, tmp_path / "split", *common, "policy.train_step=graph"), resume="auto")
    assert second.step == 8
    a, b = _final_state(tmp_path / "graphed"), _final_state(tmp_path / "split")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)
