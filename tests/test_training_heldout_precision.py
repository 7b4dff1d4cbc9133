"""``mixed_precision: fp16`` on the CPU: accelerate neither autocasts nor scales the loss there, so
the run would train in float32 while its config.yaml and log said fp16. It is refused in one line."""

from __future__ import annotations

import pytest
from accelerate.state import AcceleratorState

from aimkit.cli import main as cli_main


@pytest.fixture
def new_accelerate_state():
    """accelerate keeps one process-wide precision: an earlier in-process run's must not be reused."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_fp16_on_the_cpu_is_refused_in_one_line(tmp_path, capsys, new_accelerate_state):
    out = tmp_path / "run"
    code = cli_main(["train", "--config", "tiny_test", f"output_dir={out}", "max_steps=2", "progress_bar=false",
                     "model_args.n_layer=1", "mixed_precision=fp16"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "fp16" in err and "bf16" in err, (code, err)
    assert not out.exists()
