"""``--resume auto`` with a shorter run than the checkpoint's (max_steps lowered): it exported the
longer-trained model as if it were done and said "done: 6 steps". It is now refused in one line,
changing nothing; an explicit earlier checkpoint still resumes."""

from __future__ import annotations

from aimkit.cli import main as cli_main
from aimkit.training import load_config, train

ARGS = ["progress_bar=false", "checkpoint_every=2", "model_args.n_layer=1", "data_size=64"]


def test_resume_past_max_steps_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    train(load_config("tiny_test", [f"output_dir={out}", "max_steps=4", *ARGS]))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    code = cli_main(["train", "--config", "tiny_test", f"output_dir={out}", "max_steps=2", *ARGS, "--resume", "auto"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "step 4, past this run's 2 steps" in err, (code, err)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    code = cli_main(["train", "--config", "tiny_test", f"output_dir={out}", "max_steps=2", *ARGS,
                     "--resume", str(out / "checkpoints/step-00000002")])
    assert code == 0 and "done: 2 steps" in capsys.readouterr().out
