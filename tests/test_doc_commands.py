"""Every command in README.md and docs/*.md works as written (``scripts/check_doc_commands.py``).

The fast tests parse every documented command with the parser that would read it; the ``slow``
test runs the commands that take seconds to minutes on a CPU, as written, in an empty folder.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _load_checker():
    spec = importlib.util.spec_from_file_location("check_doc_commands", ROOT / "scripts" / "check_doc_commands.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("check_doc_commands", module)
    spec.loader.exec_module(module)
    return module


check = _load_checker()


def _doc(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "page.md"
    path.write_text(body, encoding="utf-8")
    return path


def _failures(tmp_path: Path, body: str) -> list[str]:
    return check.check_all(check.collect([_doc(tmp_path, body)], root=tmp_path), echo=lambda line: None)


# ------------------------------------------------------------------------ the documented commands


def test_every_documented_command_parses_as_written():
    commands = check.collect(check.doc_files())
    assert len(commands) > 40  # README + docs hold that many; a broken extractor finds none
    failures = check.check_all(commands, echo=lambda line: None)
    assert failures == [], "\n".join(failures)


def test_every_documented_command_is_classified():
    unclassified = [c.where + " " + c.text for c in check.collect(check.doc_files()) if check.classify(c) is None]
    assert unclassified == []


def test_the_cpu_class_covers_the_readme_cpu_commands():
    kinds = {c.text: check.classify(c)[0] for c in check.collect([README])}
    for text in ("aimkit list", "python -m aimkit --help", "aimkit eval --model aim-tiny-shapes --num 72",
                 "aimkit serve --model aim-tiny-shapes", "aimkit info aim-tiny-shapes"):
        assert kinds[text] == check.RUN, text
    assert kinds["aimkit eval --model aim-tiny-shapes"] == check.PARSE  # 1008 images: tens of minutes
    assert kinds["aimkit bench --suite all"] == check.PARSE


@pytest.mark.slow
def test_cpu_commands_run_as_written():
    commands = [c for c in check.collect(check.doc_files()) if check.classify(c)[0] == check.RUN]
    assert commands
    failures = check.check_all(commands, run=True, echo=print)
    assert failures == [], "\n".join(failures)


# ------------------------------------------------------------------------------- the extractor


def test_fenced_blocks_join_continuations_split_chains_and_drop_comments(tmp_path):
    body = (
        "Text with `aimkit --help` inline and a mention of `aimkit fid`.\n\n"
        "```bash\n"
        "# a comment line\n"
        "aimkit sample --model aim-xl \\\n"
        "    --num 8 --out x.npz   # trailing comment\n"
        "apt-get install -y chromium && pip install selenium\n"
        "ENV_A=1 python -m pytest tests/test_serve.py -k chromium\n"
        "```\n\n"
        "```python\nimport aimkit  # not a shell block\n```\n\n"
        "```\nFID: 2.61   (output, not a command)\n```\n"
    )
    commands = check.collect([_doc(tmp_path, body)], root=tmp_path)
    assert [(c.line, c.argv, c.inline) for c in commands] == [
        (5, ("aimkit", "sample", "--model", "aim-xl", "--num", "8", "--out", "x.npz"), False),
        (7, ("apt-get", "install", "-y", "chromium"), False),
        (7, ("pip", "install", "selenium"), False),
        (8, ("python", "-m", "pytest", "tests/test_serve.py", "-k", "chromium"), False),
        (1, ("aimkit", "--help"), True),
    ]
    assert commands[3].env == (("ENV_A", "1"),)
    assert commands[0].where == "page.md:5"


def test_inline_synopses_and_mentions_are_not_commands(tmp_path):
    body = ("`aimkit info MODEL --device cuda [--policy k=v,...]`, `aimkit <command>: error`, "
            "`aimkit fid ... --ref X`, `python -m aimkit.training`, `accelerate launch`, `aimkit bench`\n")
    assert check.collect([_doc(tmp_path, body)], root=tmp_path) == []


# ------------------------------------------------------------------------ failures are caught


@pytest.mark.parametrize(("command", "reason"), [
    ("aimkit generate --model aim-tiny-shapes --nmu 4", "unrecognized arguments: --nmu 4"),
    ("aimkit generate --model aim-tyni-shapes --num 4", "'aim-tyni-shapes' is not a registered preset"),
    ("aimkit sample --model aim-xl --num 8", "required: --out"),
    ("aimkit train --config aim_b lr=1e-4 no_such_key=3", "no_such_key"),
    ("aimkit train --config no_such_recipe", "no_such_recipe"),
    ("accelerate launch --num_processes 2 -m aimkit.cli sample --model aim-b --num 8 --outt x.npz", "--outt"),
    ("accelerate launch --num_procs 2 -m aimkit.training --config tiny_test", "--num_procs"),
    ("python recipes/no_such_script.py --x 1", "does not exist"),
    ("python recipes/build_tiny_shapes.py --no-such-flag", "has no option --no-such-flag"),
    ("python -c 'import aimkit; print('", "python -c"),
    ("python -m pytest tests/test_doc_commands.py -k no_such_test_name", "selects no test"),
    ("make no-such-target", "no-such-target"),
    ("bash benchmarks/no_such.sh", "no such script"),
    ("pip install 'aimkit[eval,gpu]'", "no extra 'gpu'"),
    ("curl https://example.com", "not classified"),
])
def test_a_broken_command_fails_naming_it(tmp_path, command, reason):
    failures = _failures(tmp_path, f"Intro.\n\n```bash\n{command}\n```\n")
    assert len(failures) == 1, failures
    assert failures[0].startswith(f"page.md:4: `{command}`"), failures[0]
    assert reason in failures[0], failures[0]


def test_the_script_exits_nonzero_and_names_the_failing_command(tmp_path):
    page = _doc(tmp_path, "```bash\naimkit list\naimkit eval --model aim-tiny-shapes --grdi x.png\n```\n")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_doc_commands.py"), str(page)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "page.md:3: `aimkit eval --model aim-tiny-shapes --grdi x.png`" in proc.stderr
    assert "--grdi" in proc.stderr
    assert "1 of 2 documented commands pass" in proc.stdout


def test_a_run_class_command_that_fails_when_run_is_reported(tmp_path):
    page = _doc(tmp_path, "```bash\npython -c 'raise SystemExit(3)'\n```\n")
    failures = check.check_all(check.collect([page], root=tmp_path), run=True, echo=lambda line: None)
    assert len(failures) == 1 and "exit status 3" in failures[0]


# --------------------------------------------------------------------- README: install, image, times


def test_readme_says_how_to_install_from_git_and_from_a_wheel():
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Install"):text.index("## Two commands")]
    assert re.search(r'pip install "aimkit @ git\+https://', section)
    assert "pip wheel --no-deps -w dist ." in section and "python -m build --wheel" in section
    assert "pip install dist/aimkit-*.whl" in section
    assert "python -m aimkit --help" in section
    assert "pip install torch==2.13.0" in section and "download.pytorch.org/whl/cpu" in section
    assert "`pip install aimkit`" not in text  # not on PyPI


def test_readme_lists_every_extra_of_pyproject():
    extras = set(check._extras())
    assert {"cuda", "timm", "eval", "plots", "trackers", "fid-offline", "dev"} <= extras
    text = README.read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `([\w-]+)` \|", text[text.index("| extra |"):], flags=re.M))
    assert extras <= rows, extras - rows


def test_readme_images_exist_and_are_not_ignored_by_git():
    text = README.read_text(encoding="utf-8")
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert "docs/images/demo.png" in images and "docs/images/serve_demo.png" in images
    for image in images:
        assert (ROOT / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", *images], cwd=ROOT, capture_output=True, text=True)
    assert ignored.stdout == "", f"ignored by .gitignore: {ignored.stdout}"
    root_demo = subprocess.run(["git", "check-ignore", "demo.png"], cwd=ROOT, capture_output=True, text=True)
    assert root_demo.stdout.strip() == "demo.png"  # `make demo`'s output in the root stays untracked


def test_readme_gives_the_cpu_time_of_its_cpu_commands():
    lines = README.read_text(encoding="utf-8").splitlines()
    timed = re.compile(r"\d+(\.\d+)? ?(s|min|minutes|seconds)\b")
    for command in check.collect([README]):
        if command.inline or not (check.classify(command)[0] == check.RUN or command.argv[:2] == ("aimkit", "eval")):
            continue
        assert timed.search(lines[command.line - 1].partition("#")[2]), lines[command.line - 1]
