"""aimkit.bench.report: Markdown, the compact table and reference figures, from plain data."""

import json
from pathlib import Path

import pytest

from aimkit.bench import compact_table, load_reference, markdown
from aimkit.bench.report import reference_images_per_s
from aimkit.errors import ConfigError

OFFICIAL = Path(__file__).resolve().parents[2] / "docs" / "data" / "official_reference.json"
CPU_DEVICE = {"device": "cpu", "cpu": "x86_64", "copy_bandwidth": 5.2e10, "matmul_flops": 1.57e11,
              "matmul_dtype": "float32", "matmul_n": 1024, "kernels": {"available": False}}


def _train_row(**extra):
    return {"suite": "train", "model": "aim-tiny-shapes", "backbone": "mamba2", "batch": 4, "tokens": 64,
            "mode": "eager", "status": "ok", "step_s": 0.02, "tokens_per_s": 12800.0, "model_tflops": 0.05,
            "mfu": 0.3, **extra}


def test_small_cpu_rates_are_not_printed_as_zero():
    table = compact_table({"device": CPU_DEVICE, "rows": [_train_row()]})
    last = table.splitlines()[-1]
    assert "matmul 0.157 TFLOP/s" in last and "copy 0.052 TB/s" in last
    md = markdown({"device": CPU_DEVICE, "rows": [_train_row()]})
    assert "0.157 TFLOP/s" in md and "| 30.0% |" in md


def test_a_clamped_mfu_is_flagged():
    md = markdown({"rows": [_train_row(mfu=1.0, mfu_over_ceiling=True)]})
    assert "100.0% (clamped)" in md


def test_official_reference_file():
    ref = load_reference(OFFICIAL)
    assert all(e["source"] and e["date"] for e in ref["sampling"])
    data = {"reference": ref}
    assert reference_images_per_s(data, "aim-xl", 256) == {16: 11.4, 64: 21.3, 256: 36.4}
    assert reference_images_per_s(data, "aim-b", 576) == {}
    md = markdown({"rows": [], "reference": ref})
    assert "## Reference figures" in md and "| aim-b | 256 | 256 | 112.4 |" in md


def test_official_rows_measured_in_the_same_call_stand_beside_aimkits_with_ratios(tmp_path):
    """benchmarks/official_reference.py turns the official bench scripts' rows into reference figures;
    the report puts each beside this run's matching row with the ratio."""
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "official_reference.py"
    spec = importlib.util.spec_from_file_location("official_reference", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sampling = [{"model": "AiM-B", "batch": 256, "s_per_batch": 2.0, "img_s": 128.0, "first_call_s": 9.0,
                 "vq_decode_s": 0.4, "peak_gb": 10.0}]
    train = [{"model": "AiM-B", "batch": 64, "step_s": 0.2, "tok_s": 81920.0, "warmup_s": 30.0, "peak_gb": 5.0}]
    (tmp_path / "s.json").write_text(json.dumps(sampling))
    (tmp_path / "t.json").write_text(json.dumps(train))
    assert module.main([str(tmp_path / "s.json"), str(tmp_path / "t.json"), str(tmp_path / "ref.json")]) == 0
    ref = load_reference(tmp_path / "ref.json")
    assert ref["sampling"][0]["model"] == "aim-b" and ref["training"][0]["tokens_per_s"] == 81920.0
    ours = {"suite": "sampling", "model": "aim-b", "backbone": "mamba2", "batch": 256, "tokens": 256, "status": "ok",
            "images_per_s": 320.0, "vq_decode_s": 0.2, "end_to_end_images_per_s": 250.0}
    md = markdown({"rows": [ours, _train_row(model="aim-b", batch=64, tokens=256, mode="graph",
                                             tokens_per_s=245760.0)], "reference": ref})
    assert "| aim-b | 256 | 256 | 128.0 | 320.0 | 2.50x | 0.400 | 0.200 | 2.00x | 250.0 |" in md
    assert "| aim-b | 64 x 256 | 81,920 | graph | 245,760 | 3.00x |" in md
    assert module.main([str(tmp_path / "none.json"), str(tmp_path / "t.json"), str(tmp_path / "r2.json")]) == 0
    assert load_reference(tmp_path / "r2.json")["sampling"] == []


@pytest.mark.parametrize("content,expected", [
    ("not json", "cannot read reference figures"),
    ('{"rows": []}', "expected an object with a 'sampling' list"),
    ('{"sampling": [{"model": "aim-b", "batch": 1}]}', "lacks"),
])
def test_bad_reference_files(tmp_path, content, expected):
    path = tmp_path / "ref.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=expected):
        load_reference(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_reference(tmp_path / "missing.json")


def test_package_holds_no_measured_figures():
    import aimkit.bench as bench

    source = "".join(p.read_text() for p in Path(bench.__file__).parent.glob("*.py"))
    for figure in json.loads(OFFICIAL.read_text())["sampling"]:
        assert str(figure["images_per_s"]) not in source
    assert "H200" not in source
