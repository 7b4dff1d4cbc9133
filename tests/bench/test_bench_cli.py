"""``aimkit bench --device cpu`` end to end: tiny models, every suite, the policy in every row."""

import json

import pytest

from aimkit.bench.train_rows import TRAIN_STEP_OF_MODE
from aimkit.cli import main
from aimkit.policy import ExecutionPolicy


def test_bench_cli_sampling_on_cpu(tmp_path, capsys):
    argv = ["bench", "--device", "cpu", "--suite", "sampling", "--models", "aim-tiny-shapes,aim-nonexistent",
            "--batches", "2", "--tokens", "16", "--repeats", "1", "--transformer", "--out", str(tmp_path),
            "--override", "n_layer=2", "--override", "d_model=64"]
    assert main(argv) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert {"options", "device", "correctness", "rows", "elapsed_s", "plots"} <= set(data)
    assert {"copy_bandwidth", "matmul_flops", "date", "torch", "triton", "mamba-ssm"} <= set(data["device"])
    assert 0 < data["device"]["matmul_flops"] < 1e15  # any host, loaded or not
    assert data["correctness"]["passed"] is True and data["correctness"]["model"] == "aim-tiny-shapes"
    assert data["correctness"]["forward_rel_err"] < 2e-2 and data["correctness"]["decode_rel_err"] < 2e-2
    rows = {(r["model"], r["backbone"]): r for r in data["rows"]}
    assert rows[("aim-nonexistent", "mamba2")]["status"] == "error"  # a failing row keeps the table
    for backbone in ("mamba2", "transformer"):
        row = rows[("aim-tiny-shapes", backbone)]
        assert row["status"] == "ok", row.get("error")
        for key in ("seconds_per_batch", "images_per_s", "first_call_s", "fraction_of_floor", "floor", "params"):
            assert row[key] is not None
        assert row["images_per_s"] == pytest.approx(2 / row["seconds_per_batch"])
        assert 0 < row["fraction_of_floor"] < 1
        assert row["policy"] == ExecutionPolicy().to_dict()
        assert row["policy_resolved"]["state_update"] == "reference"  # CPU: no kernels
    assert rows[("aim-tiny-shapes", "mamba2")]["state_bytes_per_seq"] > 0
    assert rows[("aim-tiny-shapes", "transformer")]["kv_bytes_per_seq_position"] > 0
    md = (tmp_path / "bench.md").read_text()
    assert "| aim-tiny-shapes | mamba2 |" in md and "| aim-tiny-shapes | transformer |" in md
    printed = capsys.readouterr().out.splitlines()  # the compact table is printed last
    assert printed[-1].startswith("device:") and printed[-2].startswith("correctness:")
    assert printed[-4 - len(data["rows"])].startswith("suite")
    assert len(list(tmp_path.iterdir())) <= 8


def test_bench_cli_decode_and_train_under_a_policy(tmp_path):
    argv = ["bench", "--device", "cpu", "--suite", "all", "--models", "aim-tiny-shapes", "--batches", "1",
            "--tokens", "16", "--repeats", "1", "--train-steps", "1", "--train-batch", "2", "--decode-batches", "1",
            "--no-check", "--policy", "state_dtype=model,decode_graph=false,chunk_size=8",
            "--override", "n_layer=2", "--override", "d_model=64", "--out", str(tmp_path)]
    assert main(argv) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    want = ExecutionPolicy(state_dtype="model", decode_graph=False, chunk_size=8).to_dict()
    assert data["options"]["policy"] == want
    assert {r["suite"] for r in data["rows"]} == {"sampling", "decode", "train"}
    for row in data["rows"]:
        assert row["status"] == "ok", row.get("error")
        ran = want
        if row["suite"] == "train":  # the step of the row's mode; the eager row also drops the compiled glue
            ran = dict(want, train_step=TRAIN_STEP_OF_MODE[row["mode"]], compile_glue=row["mode"] != "eager")
        assert row["policy"] == ran and set(row["policy_resolved"]) >= {"scan", "state_update", "sampling"}
    train = next(r for r in data["rows"] if r["suite"] == "train")
    assert 0 < train["mfu"] <= 1 and train["model_tflops"] > 0
    assert train["model_tflops"] * 1e12 == pytest.approx(6 * train["matmul_params"] * train["tokens_per_s"])
    assert train["mfu"] == pytest.approx(min(1.0, train["model_tflops"] * 1e12 / data["device"]["matmul_flops"]))
    decode = next(r for r in data["rows"] if r["suite"] == "decode")
    assert decode["capture_s"] is None and decode["step_s"] > 0  # decode_graph=false: eager steps
    assert decode["cache_dtypes"] == ["bfloat16"]  # state_dtype=model on a bf16 model: no float32 state


@pytest.mark.parametrize("argv,expected", [
    (["--policy", "state_dtype=bf16"], "state_dtype"),
    (["--policy", "decode_grap=false"], "decode_graph"),
    (["--policy", "novalue"], "expected FIELD=VALUE"),
    (["--reference", "/nonexistent/ref.json"], "cannot read reference figures"),
    (["--suite", "sampling", "--models", "aim-bogus"], "no model to measure: unknown generator 'aim-bogus'"),
])
def test_bench_cli_refuses_bad_policy_and_reference(capsys, argv, expected):
    try:
        code = main(["bench", "--device", "cpu", *argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_decode_vq_rows_report_end_to_end_for_both_backbones(tmp_path):
    """--decode-vq: the Mamba2 and the matched transformer rows decode their codes to pixels with
    the same tokenizer, and report images/s of ``aimkit sample``'s loop: 3 batches sampled, decoded
    and written."""
    argv = ["bench", "--device", "cpu", "--suite", "sampling", "--models", "aim-test-vq", "--batches", "2",
            "--tokens", "16", "--repeats", "1", "--transformer", "--decode-vq", "--no-check", "--out", str(tmp_path)]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert {r["backbone"] for r in rows} == {"mamba2", "transformer"}
    for row in rows:
        assert row["status"] == "ok", row.get("error")
        assert row["end_to_end_images_per_s"] == pytest.approx(6 / row["end_to_end_s"])
        assert row["vq_decode_s"] > 0 and "3 batches of 2" in row["end_to_end_what"]


def test_a_failing_end_to_end_part_keeps_the_sampling_row(tmp_path, monkeypatch):
    """The pixels' part failing (a write error, say) records its error; the row's sampling timings stand."""
    import aimkit.bench.rows as rows_module

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(rows_module, "to_disk", broken)
    argv = ["bench", "--device", "cpu", "--suite", "sampling", "--models", "aim-test-vq", "--batches", "2",
            "--tokens", "16", "--repeats", "1", "--decode-vq", "--no-check", "--out", str(tmp_path)]
    assert main(argv) == 0
    (row,) = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert row["status"] == "ok" and row["images_per_s"] > 0 and row["vq_decode_s"] > 0
    assert row["end_to_end_error"] == "OSError: disk full" and "end_to_end_images_per_s" not in row
