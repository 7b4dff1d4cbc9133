"""pretrained=True / "hf-hub:..." resolve through a local, offline huggingface_hub cache."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from test_official_layout import official_state

from aimkit.weights import save_safetensors_atomic


def _fake_cache(root, repo_id, files):
    repo_dir = root / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    for name, state in files.items():
        save_safetensors_atomic(state, snap / name)
    return snap


def _run(code, hf_home):
    """Run ``code`` offline with the hub cache at ``hf_home``; it may import test_official_layout."""
    tests = str(Path(__file__).resolve().parent)
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([tests, *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=180)


def test_pretrained_true_uses_offline_cache(tmp_path):
    sd = official_state(None)
    _fake_cache(tmp_path, "hp-l33/aim-base", {"model.safetensors": sd})
    res = _run("""
        import aimkit, torch
        from test_official_layout import _tiny_overrides
        gen = aimkit.build("aim-b", pretrained=True, **_tiny_overrides({}))
        print(float(gen.pos_embed.weight.sum()))
        gen2 = aimkit.build("aim-b", pretrained="hf-hub:hp-l33/aim-base", **_tiny_overrides({}))
        print(torch.equal(gen.pos_embed.weight, gen2.pos_embed.weight))
    """, tmp_path)
    assert res.returncode == 0, res.stderr
    total, same = res.stdout.split()
    expect = float(sd["mamba.backbone.embeddings.position_embeddings.weight"].sum())
    assert abs(float(total) - expect) < 1e-3 and same == "True"


def test_missing_offline_weights_give_one_clear_error(tmp_path):
    res = _run("""
        import aimkit
        from test_official_layout import _tiny_overrides
        try:
            aimkit.build("aim-xl", pretrained=True, **_tiny_overrides({"num_groups": 2}))
        except aimkit.CheckpointError as e:
            print("ERR", e)
    """, tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ERR could not get weights from hub repo 'hp-l33/aim-xlarge'")
