"""The shape of the package: small modules, short functions, imports that point one way.

These are read from the source (``ast``), so they hold for every file added later; ``make lint``
checks complexity (ruff C901 at most 12).
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "aimkit"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80

# top-level parts of aimkit that a part may import (besides itself); parts not named here (training,
# bench, commands, cli, data, eval, build, generator, ...) sit above these and are not restricted
BASE = {"errors", "registry", "policy", "config", "_io", "_lock", "_distributed", "weights", "assets"}
ALLOWED = {
    "kernels": {"errors", "policy", "config"},
    "tokenizers": BASE | {"kernels"},
    "conditioning": BASE,
    "backbones": BASE | {"kernels"},
    "samplers": BASE | {"kernels"},  # the generator only through its contract (duck typing)
}
TOP = {"training", "bench", "commands", "cli", "__main__"}  # nothing in the library imports these


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path = PACKAGE):
    """Every aimkit module ``path`` (under ``root``) imports, at module level or inside functions."""
    name = _name(path, root)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                if not node.module:  # from . import x, y
                    yield from (f"{target}.{a.name}" for a in node.names)
                    continue
            else:
                target = node.module or ""
            if target.split(".")[0] == "aimkit":
                yield target
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "aimkit")


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_is_small(path):
    lines = path.read_text().count("\n")
    assert lines <= MAX_MODULE_LINES, f"{path.name}: {lines} lines (split it into modules of one job)"


def test_functions_are_short():
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, "functions over 80 lines:\n" + "\n".join(long)


def test_imports_point_one_way():
    wrong = []
    for path in _modules():
        part = _part(_name(path))
        for target in _imports(path):
            other = _part(target)
            if other in ("", part):
                continue
            if part in ALLOWED and other not in ALLOWED[part]:
                wrong.append(f"{_name(path)} imports {target} ({part} may import only {sorted(ALLOWED[part])})")
            if part not in TOP and other in TOP:
                wrong.append(f"{_name(path)} imports {target} ({other} sits on top of the library)")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_a_wrong_import(tmp_path):
    """The import check reads relative imports the way Python does (a check that cannot fail is no check)."""
    assert all(_part(t) in ALLOWED["kernels"] | {"kernels"} for t in _imports(PACKAGE / "kernels" / "ssd.py"))
    probe = tmp_path / "aimkit" / "kernels" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("from ..generator import Generator\nfrom . import ssd\nimport aimkit.training\n")
    assert set(_imports(probe, tmp_path / "aimkit")) == {"aimkit.generator", "aimkit.kernels.ssd", "aimkit.training"}
