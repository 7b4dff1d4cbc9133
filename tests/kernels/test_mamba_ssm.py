"""The lazy loader of mamba-ssm's and causal-conv1d's kernels (aimkit.kernels.mamba_ssm), against
fake packages written to a temporary import path."""

import importlib
import sys
import warnings
from pathlib import Path

import pytest

from aimkit.kernels import mamba_ssm


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """An isolated import world: fake packages under tmp_path, module cache restored afterwards."""
    saved = {n: m for n, m in sys.modules.items() if n.split(".")[0] in ("mamba_ssm", "causal_conv1d")}
    for name in saved:
        del sys.modules[name]
    monkeypatch.syspath_prepend(str(tmp_path))
    mamba_ssm._reset_for_tests()
    yield tmp_path
    for name in [n for n in sys.modules if n.split(".")[0] in ("mamba_ssm", "causal_conv1d")]:
        del sys.modules[name]
    sys.modules.update(saved)
    mamba_ssm._reset_for_tests()


def _write_fake_mamba(root: Path, init_source: str) -> None:
    files = {
        "mamba_ssm/__init__.py": init_source,
        "mamba_ssm/ops/__init__.py": "",
        "mamba_ssm/ops/triton/__init__.py": "",
        "mamba_ssm/ops/triton/ssd_combined.py": (
            "def mamba_chunk_scan_combined(*a, **k):\n    return 'scan'\n\n"
            "def mamba_split_conv1d_scan_combined(*a, **k):\n    return 'mixer'\n"),
        "mamba_ssm/ops/triton/layernorm_gated.py": "def rmsnorm_fn(*a, **k):\n    return 'norm'\n",
        "causal_conv1d/__init__.py": ("def causal_conv1d_fn(*a, **k):\n    pass\n\n"
                                      "def causal_conv1d_update(*a, **k):\n    pass\n"),
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    importlib.invalidate_caches()


def test_loader_bypasses_missing_compiled_extension(fresh_loader):
    # like mamba-ssm 2.3.2.post1 built without CUDA: __init__ imports submodules, then the extension
    _write_fake_mamba(fresh_loader, "from mamba_ssm.ops.triton import layernorm_gated\nimport selective_scan_cuda\n")
    kernels = mamba_ssm.load_kernels()
    assert kernels is not None
    assert kernels.mamba_chunk_scan_combined() == "scan" and kernels.rmsnorm_fn() == "norm"
    assert kernels.causal_conv1d_fn is not None and kernels.causal_conv1d_update is not None
    info = mamba_ssm.kernel_info()
    assert info["available"] and info["bare_package"] and all(info["kernels"].values())
    package = sys.modules["mamba_ssm"]
    assert package.ops.triton.layernorm_gated is sys.modules["mamba_ssm.ops.triton.layernorm_gated"]
    assert not hasattr(package, "Mamba")


def test_loader_uses_a_working_package_normally(fresh_loader):
    _write_fake_mamba(fresh_loader, "Mamba = 'mamba-1'\n")
    assert mamba_ssm.kernels_available()
    assert mamba_ssm.kernel_info()["bare_package"] is False
    assert sys.modules["mamba_ssm"].Mamba == "mamba-1"


def test_loader_does_not_mask_other_import_errors(fresh_loader):
    _write_fake_mamba(fresh_loader, "import some_other_missing_dependency\n")
    with pytest.warns(UserWarning, match="some_other_missing_dependency"):
        assert mamba_ssm.load_kernels() is None
    info = mamba_ssm.kernel_info()
    assert not info["available"] and not info["bare_package"] and "some_other_missing" in info["error"]


def test_loader_is_silent_when_mamba_ssm_is_absent(fresh_loader, monkeypatch):
    class _Hide:  # make mamba_ssm unimportable even where it is installed
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name.split(".")[0] == "mamba_ssm":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(sys, "meta_path", [_Hide, *sys.meta_path])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mamba_ssm.load_kernels() is None
    assert not mamba_ssm.kernels_available()
    assert "ModuleNotFoundError" in mamba_ssm.kernel_info()["error"]


@pytest.mark.parametrize("user_value, seen", [(None, "1"), ("0", "0")])
def test_autotuning_cache_is_on_before_mamba_ssm_builds_its_autotuners(fresh_loader, monkeypatch, user_value, seen):
    """Each ``triton.autotune`` object reads TRITON_CACHE_AUTOTUNING when mamba-ssm's module builds
    it, at import: the loader turns the cache on before importing, unless the user chose."""
    if user_value is None:
        monkeypatch.delenv("TRITON_CACHE_AUTOTUNING", raising=False)
    else:
        monkeypatch.setenv("TRITON_CACHE_AUTOTUNING", user_value)
    _write_fake_mamba(fresh_loader, "")
    ssd = fresh_loader / "mamba_ssm/ops/triton/ssd_combined.py"
    ssd.write_text("import os\nSEEN = os.environ.get('TRITON_CACHE_AUTOTUNING')\n" + ssd.read_text())
    importlib.invalidate_caches()
    assert mamba_ssm.load_kernels() is not None
    assert sys.modules["mamba_ssm.ops.triton.ssd_combined"].SEEN == seen
    assert mamba_ssm.kernel_info()["autotune_cache"] == seen
