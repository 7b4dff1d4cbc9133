"""The training recipe on CPU with a tiny Mamba2 generator.

Data: the procedural shapes exported as an ImageFolder (plus one corrupt file), tokenized by
``aimkit tokenize`` with a tiny randomly initialised VQ tokenizer (64 codes, 4 x 4 grid).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import subprocess_env

import aimkit
from aimkit.cli import main as cli_main
from aimkit.data.shapes import NUM_CLASSES, export_image_folder
from aimkit.data.tokens import TokenDataset
from aimkit.training import TrainingStopped, find_checkpoint, load_config, train
from aimkit.weights import read_state_dict

REPO = Path(__file__).resolve().parent.parent
TINY_VQ = ["ch=32", "ch_mult=[1,1,1,1,1]", "encoder_res_blocks=1", "decoder_res_blocks=1", "z_channels=32",
           "codebook_size=64"]




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


def _final_state(out, part="."):
    return read_state_dict(Path(out) / "final" / part / "model.safetensors")


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
    """Also the moving average of the weights: kept in every checkpoint, resumed bit for bit, exported."""
    common = ["max_steps=14", "checkpoint_every=5", "ema_decay=0.9"]  # 6 steps per epoch: two epochs
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
    for part in (".", "raw"):  # final/: the moving average; final/raw: the trained weights
        a, b = _final_state(full, part), _final_state(split, part)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (part, k)
    averaged, trained = _final_state(split), _final_state(split, "raw")
    assert not torch.equal(averaged["tok_embed.weight"], trained["tok_embed.weight"])
    last = find_checkpoint(split)
    ema = read_state_dict(last / "ema.safetensors")
    assert all(torch.equal(trained[k], v) for k, v in read_state_dict(last / "model.safetensors").items())
    gen = aimkit.build(str(split / "final"))  # what generation loads: the average
    for name, p in gen.named_parameters():
        if name in ema:
            assert torch.equal(p, ema[name]), name
    record = json.loads((split / "final" / "ema.json").read_text())
    assert record["weights"] == "ema" and record["ema_decay"] == 0.9 and record["raw"] == "raw"
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
    assert "policy train_step: graph needs a CUDA device (this run is on cpu)" in err  # accumulation is fine
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
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env(), cwd=tmp_path,
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
    assert ckpt is not None
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] >= 2
    # train_step auto: on a CPU the eager fallback, recorded as run, with the glue uncompiled; one GPU: captured
    want = ("graph", True) if torch.cuda.is_available() else ("eager", False)
    assert (state["policy"]["train_step"], state["policy"]["compile_glue"]) == want


def _documented_launch_line() -> list[str]:
    """The two-process line of tiny_test.yaml's header, as written there."""
    text = (REPO / "recipes" / "configs" / "tiny_test.yaml").read_text()
    line = next(line.lstrip("# ") for line in text.splitlines() if "accelerate launch" in line)
    return line.split()


def test_two_processes_keep_replicas_equal(tmp_path):
    """The launch line documented in tiny_test.yaml starts two processes (`--cpu` started one)."""
    out = tmp_path / "ddp"
    launcher = Path(sys.executable).parent / "accelerate"
    documented = _documented_launch_line()
    assert documented[:2] == ["accelerate", "launch"] and documented[-1].startswith("output_dir=")
    cmd = [str(launcher), "launch", "--main_process_port", "29517", *documented[2:-1], f"output_dir={out}",
           "max_steps=3", "log_every=1", "check_replicas_every=1", "progress_bar=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=240)
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
    eager = train(_cfg(tokens, tmp_path / "eager", *common, "policy.train_step=eager"))
    graphed = train(_cfg(tokens, tmp_path / "graphed", *common, "policy.train_step=graph"))
    assert graphed.losses == pytest.approx(eager.losses, rel=2e-2)  # same maths, other kernel order
    first = train(_cfg(tokens, tmp_path / "split", *common, "policy.train_step=graph", "stop_after=4"))
    assert first.stopped_by == "stop_after"
    second = train(_cfg(tokens, tmp_path / "split", *common, "policy.train_step=graph"), resume="auto")
    assert second.step == 8
    a, b = _final_state(tmp_path / "graphed"), _final_state(tmp_path / "split")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_layer_graphs_recipe_resumes_and_tracks_eager(tokens, tmp_path, monkeypatch):
    """policy train_step layer_graphs (what auto runs with several processes): the trainer records it,
    its sublayers do replay graphs, it trains like the eager step, and a killed run resumes exactly."""
    from aimkit.training.layer_graphs import ModuleGraphs

    replays = []
    replay = ModuleGraphs.replay
    monkeypatch.setattr(ModuleGraphs, "replay", lambda self, x: (replays.append(1), replay(self, x))[1])
    common = ["max_steps=6", "checkpoint_every=3", "num_workers=0", "model_args={class_dropout: 0.0}"]
    eager = train(_cfg(tokens, tmp_path / "eager", *common, "policy.train_step=eager"))
    assert not replays
    layered = train(_cfg(tokens, tmp_path / "layered", *common, "policy.train_step=layer_graphs"))
    assert len(replays) >= 5  # steps 2-6 replayed (every sublayer, every micro-batch)
    assert layered.losses == pytest.approx(eager.losses, rel=1e-4, abs=1e-5)
    state = json.loads(next((tmp_path / "layered" / "checkpoints").rglob("trainer_state.json")).read_text())
    assert (state["policy"]["train_step"], state["policy"]["compile_glue"]) == ("layer_graphs", True)
    train(_cfg(tokens, tmp_path / "split", *common, "policy.train_step=layer_graphs", "stop_after=3"))
    second = train(_cfg(tokens, tmp_path / "split", *common, "policy.train_step=layer_graphs"), resume="auto")
    assert second.step == 6
    a, b = _final_state(tmp_path / "layered"), _final_state(tmp_path / "split")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)


def _vq_recipe(tmp_path, *lines):
    """aim-test-vq (a tokenizer: pixels to draw) on random codes."""
    path = tmp_path / "vq.yaml"
    path.write_text("model: aim-test-vq\ndata: random\ndata_size: 64\nnum_workers: 0\nglobal_batch_size: 8\n"
                    "lr: 1.0e-3\nlr_per_256: null\nmax_steps: 4\nmixed_precision: no\ncheckpoint_every: 100\n"
                    "log_every: 1\nprogress_bar: false\noutput_dir: null\n" + "".join(f"{x}\n" for x in lines))
    return str(path)


def test_sample_grids_and_tensorboard(tmp_path):
    """Grids every N steps, to OUT/samples and tensorboard; `log_with=tensorboard` used to crash on the
    nested config; drawing samples changes nothing of the training itself."""
    pytest.importorskip("tensorboard")
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    result = train(load_config(_vq_recipe(tmp_path), [f"output_dir={out}", "sample_every=2", "sample_num=4",
                                                      "log_with=tensorboard", "ema_decay=0.5"]))
    assert result.step == 4
    grids = sorted(p.name for p in (out / "samples").iterdir())
    assert grids == ["step-00000002.png", "step-00000004.png"]  # nothing else: written atomically
    with Image.open(out / "samples" / grids[-1]) as grid:
        assert grid.format == "PNG" and grid.width >= 2 * 16 and grid.height >= 2 * 16

    events = [p for p in (out / "aimkit").rglob("events.out.tfevents.*")]
    tags = {"images": set(), "scalars": set()}
    for path in events:
        acc = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0}).Reload()
        for kind in tags:
            tags[kind] |= set(acc.Tags()[kind])
    assert "samples" in tags["images"] and {"loss", "lr", "grad_norm"} <= tags["scalars"]
    hparams = next((out / "aimkit").rglob("hparams.yml")).read_text()
    assert "model_args.d_model" not in hparams and "sample_every: 2" in hparams  # flat keys, scalars

    plain = train(load_config(_vq_recipe(tmp_path), [f"output_dir={tmp_path / 'plain'}", "ema_decay=0.5"]))
    assert plain.losses == result.losses
    assert all(torch.equal(v, _final_state(tmp_path / "plain")[k]) for k, v in _final_state(out).items())


def test_sample_grids_need_a_tokenizer(tmp_path, capsys):
    code = cli_main(["train", "--config", "tiny_test", f"output_dir={tmp_path / 'o'}", "sample_every=5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "sample_every needs a model with a tokenizer" in err


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    result = train(load_config(_vq_recipe(tmp_path), [f"output_dir={out}", "sample_every=4", "sample_num=2",
                                                      "log_with=wandb", "max_steps=4"]))
    assert result.step == 4
    run = next(tmp_path.rglob("offline-run-*"))
    record = next(run.glob("run-*.wandb")).read_bytes()  # the offline record: the config's flat keys
    assert b"betas.0" in record and b"sample_every" in record and b"aim-test-vq" in record
    assert list((run / "files" / "media" / "images").glob("samples_4_*.png"))  # the grid, logged at step 4
    assert (out / "samples" / "step-00000004.png").is_file()


def test_launch_flag_for_mixed_precision_wins_over_the_recipe(tmp_path):
    """`accelerate launch --mixed_precision bf16` was silently overridden by the recipe's `no`."""
    out = tmp_path / "run"
    launcher = Path(sys.executable).parent / "accelerate"
    cmd = [str(launcher), "launch", "--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no",
           "--mixed_precision", "bf16", "-m", "aimkit.training", "--config", "tiny_test", f"output_dir={out}",
           "max_steps=1", "progress_bar=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "mixed precision bf16 (accelerate launch; the recipe says no)" in proc.stdout
    assert "mixed_precision: bf16" in (out / "config.yaml").read_text()  # what ran is what is recorded
