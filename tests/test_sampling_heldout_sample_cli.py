"""Held-out ``aimkit sample`` refusals: a command refused for its labels or settings writes nothing."""

from __future__ import annotations

import pytest

from aimkit.cli import main


@pytest.mark.parametrize("extra", [["--labels", "red circle"], ["--labels", "random", "--cfg-scale", "inf"],
                                   ["--labels", "random", "--top-p", "0"], ["--labels", "balanced"]])
def test_refused_sample_leaves_no_shard_folder(tmp_path, capsys, extra):
    out = tmp_path / "sub" / "s.npz"
    argv = ["sample", "--model", "aim-tiny-shapes", "--num", "2", "--out", str(out), "--device", "cpu",
            "--no-progress", "-q", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("aimkit sample: error:"), err
    assert list(tmp_path.iterdir()) == []  # neither <out>.shards nor the folder of --out
