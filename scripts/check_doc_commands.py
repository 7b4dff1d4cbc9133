"""Check that every command in README.md and docs/*.md runs as written in a fresh clone.

    python scripts/check_doc_commands.py           # every command checked without running it (seconds)
    python scripts/check_doc_commands.py --run     # also run the CPU-class commands, with wall times
    python scripts/check_doc_commands.py --list    # the commands found and their classes

Commands are the lines of ```bash / ```sh blocks (``\\`` continuations joined, ``&&`` split,
comments dropped) and the inline code spans that start with a command word (``aimkit``,
``python``, ``make``, ...) and are not a synopsis (``[--flag]``, ``<name>``, ``...``).

Each command falls into one class of :data:`CLASSES` (first matching pattern wins; an
unclassified command is an error, so a new command in the docs needs a decision here):

* ``run``: runs here on the CPU in seconds to minutes; ``--run`` executes it as written in an
  empty temporary folder (the virtual environment's ``bin`` first on ``PATH``) and reports its
  wall time. Without ``--run`` it is parse-checked like the next class.
* ``parse``: needs a GPU, the network, data or weights a fresh clone lacks, or hours; only its
  command line is checked, by the parser that would read it: ``aimkit.cli._build_parser()``
  (model names against the registry, ``train`` configs and overrides through
  ``aimkit.training.config.load_config``), accelerate's own ``launch`` parser, a script's
  ``--help`` (each ``--flag`` used must be listed there), ``make -n``, ``bash -n``, pytest's
  ``-k`` against the test names in the files.
* ``external``: another project's tool (pip, git, apt-get, ``hf``); only what aimkit owns in it is
  checked (the extras named in ``aimkit[...]`` exist in pyproject.toml).

Exit status 0 when every command passes, 1 otherwise; each failure is one line naming the
file, the line and the command.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
COMMAND_WORDS = {"aimkit", "python", "python3", "make", "bash", "accelerate", "pip", "git", "apt-get", "hf"}
SEPARATORS = {"&&", "||", ";"}
# placeholder words of the docs -> a value the parser accepts (only where a choice is required)
PLACEHOLDERS = {"COMMAND": "generate", "MODEL": "aim-tiny-shapes"}

RUN, PARSE, EXTERNAL = "run", "parse", "external"

# (regular expression on the command's words joined by spaces, class, why). First match wins.
CLASSES: list[tuple[str, str, str]] = [
    (r"^aimkit (--help|\S+ --help|list)$", RUN, "seconds on the CPU"),
    (r"^python3? -m aimkit --help$", RUN, "seconds on the CPU"),
    (r"^aimkit info aim-tiny-shapes$", RUN, "seconds on the CPU"),
    (r"^aimkit generate --model aim-tiny-shapes( |$)(?!.*--device cuda)", RUN, "the embedded model, seconds"),
    (r"^aimkit eval( --model aim-tiny-shapes)? --num \d\d?\d?( |$)", RUN, "a reduced count: about 20 s on the CPU"),
    (r"^aimkit serve --model aim-tiny-shapes$", RUN, "a server: started, its page fetched, stopped"),
    (r"^python3? -c ", RUN, "a one-line Python check"),
    (r"^aimkit eval", PARSE, "1008 images: about 3 min on 2 idle CPU cores, 35-40 min on busy ones"),
    (r"^aimkit info \S+ --device cuda", PARSE, "needs a CUDA device"),
    (r"^aimkit (bench|train)( |$)", PARSE, "GPU work"),
    (r"^aimkit ", PARSE, "needs weights, data or files a fresh clone lacks, a GPU or hours"),
    (r"^python3? -m (aimkit\.cli|aimkit\.training) ", PARSE, "training or sampling on data a fresh clone lacks"),
    (r"^accelerate launch ", PARSE, "several processes or GPUs"),
    (r"^python3? -m pytest ", PARSE, "needs Chromium and its driver (Debian packages)"),
    (r"^python3? (recipes|benchmarks)/\S+\.py", PARSE, "GPU work, or minutes that rewrite a shipped asset"),
    (r"^python3? scripts/check_doc_commands\.py", PARSE, "this checker (the tests run it)"),
    (r"^make (demo|test|test-all|lint|setup)$", PARSE, "sets up .venv (installs packages): dry run only"),
    (r"^bash benchmarks/\S+\.sh$", PARSE, "GPU tests"),
    (r"^python3? guided-diffusion/", EXTERNAL, "OpenAI's ADM evaluator (TensorFlow, network)"),
    (r"^(pip|apt-get|git|hf) ", EXTERNAL, "another tool, needs the network"),
]


@dataclasses.dataclass(frozen=True)
class DocCommand:
    """One documented command: where it is, its words (environment assignments separate)."""

    path: str
    line: int
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    inline: bool = False

    @property
    def text(self) -> str:
        words = [f"{k}={v}" for k, v in self.env] + list(self.argv)
        return shlex.join(words)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


# ---------------------------------------------------------------------------------- extraction


def _split_words(source: str) -> list[list[str]]:
    """Shell words of one logical line, split at ``&&``, ``||`` and ``;``; comments dropped."""
    lexer = shlex.shlex(source, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands, words = [], []
    for word in lexer:
        if word in SEPARATORS:
            commands.append(words)
            words = []
        else:
            words.append(word)
    commands.append(words)
    return [c for c in commands if c]


def _command(path: str, line: int, words: list[str], inline: bool) -> DocCommand:
    env = []
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        key, _, value = words.pop(0).partition("=")
        env.append((key, value))
    return DocCommand(path, line, tuple(words), tuple(env), inline)


def fenced_commands(path: str, text: str) -> Iterator[DocCommand]:
    """Commands of the shell code blocks of one Markdown text."""
    lang, pending, start = None, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"\s*```\s*(\S*)", line)
        if fence:
            lang = None if lang is not None else fence.group(1).lower()
            continue
        if lang not in SHELL_LANGS or not (line.strip() or pending):
            continue
        if not pending:
            start = number
        pending = f"{pending} {line.strip()}".strip()
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        for words in _split_words(pending):
            yield _command(path, start, words, inline=False)
        pending = ""


def _is_mention(words: list[str]) -> bool:
    """A program named in prose (`aimkit fid`, `python -m aimkit.training`), not a command to run."""
    if words[:2] == ["python", "-m"]:
        return len(words) == 3
    return words[0] in ("aimkit", "accelerate") and len(words) <= 2 and not any(w.startswith("-") for w in words)


def inline_commands(path: str, text: str) -> Iterator[DocCommand]:
    """Inline code spans that are whole commands (not synopses such as ``aimkit info MODEL [--x]``)."""
    lang = None
    for number, line in enumerate(text.splitlines(), 1):
        if re.match(r"\s*```", line):
            lang = None if lang is not None else "block"
            continue
        if lang is not None:
            continue
        for span in re.findall(r"`([^`]+)`", line):
            try:
                words = shlex.split(span)
            except ValueError:
                continue
            if not words or words[0] not in COMMAND_WORDS:
                continue
            if any(w.startswith(("[", "<")) or "..." in w for w in words) or _is_mention(words):
                continue
            yield _command(path, number, words, inline=True)


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def collect(files: Iterable[Path], root: Path = ROOT) -> list[DocCommand]:
    """Every command of ``files`` (fenced first, then inline, each in file order), duplicates kept."""
    found = []
    for file in files:
        text = file.read_text(encoding="utf-8")
        rel = file.relative_to(root).as_posix() if file.is_relative_to(root) else str(file)
        found += list(fenced_commands(rel, text)) + list(inline_commands(rel, text))
    return found


def classify(command: DocCommand) -> tuple[str, str] | None:
    """(class, why) from :data:`CLASSES`, or None when no pattern matches."""
    joined = " ".join(command.argv)
    for pattern, kind, why in CLASSES:
        if re.search(pattern, joined):
            return kind, why
    return None


# ------------------------------------------------------------------------------- parse checks


@functools.lru_cache(maxsize=1)
def _aimkit_parser() -> argparse.ArgumentParser:
    from aimkit.cli import _build_parser

    return _build_parser()


@functools.lru_cache(maxsize=1)
def _preset_names() -> frozenset[str]:
    import aimkit

    return frozenset(aimkit.list_models())


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace | None, str | None]:
    """Parse like the command would; (namespace or None after --help, error line or None)."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            return parser.parse_args(argv), None
    except SystemExit as exc:
        if exc.code in (0, None):
            return None, None
        lines = err.getvalue().strip().splitlines()
        return None, lines[-1] if lines else f"exit status {exc.code}"


def _is_placeholder(value: str) -> bool:
    return value.isupper() or "/" in value or value.endswith((".safetensors", ".pt", ".npz"))


def check_aimkit_args(argv: list[str]) -> str | None:
    """The ``aimkit`` words after the program name, through the CLI's own parser."""
    argv = [PLACEHOLDERS.get(word, word) for word in argv]
    args, error = _parse(_aimkit_parser(), argv)
    if error or args is None:
        return error
    model = getattr(args, "model", None)
    if isinstance(model, str) and not _is_placeholder(model) and model not in _preset_names():
        return f"model {model!r} is not a registered preset"
    if getattr(args, "command", None) == "train":
        return _check_train(args.config, args.overrides)
    return None


def _check_train(config: str, overrides: list[str]) -> str | None:
    from aimkit.errors import AimkitError
    from aimkit.training.config import load_config

    try:
        load_config(config, overrides)
    except AimkitError as exc:
        return str(exc)
    return None


def _training_parser() -> argparse.ArgumentParser:
    from aimkit.training.cli import add_arguments

    parser = argparse.ArgumentParser(prog="python -m aimkit.training")
    add_arguments(parser)
    return parser


def check_module(module: str, argv: list[str]) -> str | None:
    """``python -m MODULE ARGS`` (also what ``accelerate launch -m MODULE`` runs)."""
    if module in ("aimkit", "aimkit.cli"):
        return check_aimkit_args(argv)
    if module == "aimkit.training":
        args, error = _parse(_training_parser(), argv)
        return error or (args and _check_train(args.config, args.overrides))
    if module == "pytest":
        return check_pytest(argv)
    return f"no parse check for python -m {module}"


def check_accelerate(argv: list[str]) -> str | None:
    from accelerate.commands.launch import launch_command_parser

    if argv[:1] != ["launch"]:
        return "only `accelerate launch` is checked"
    args, error = _parse(launch_command_parser(), argv[1:])
    if error or args is None:
        return error
    if args.module:
        return check_module(args.training_script, args.training_script_args)
    return check_python_script(args.training_script, args.training_script_args)


def check_pytest(argv: list[str]) -> str | None:
    """Test files exist and every word of ``-k`` names some test in them."""
    files = [w for w in argv if w.endswith(".py") or "::" in w]
    if not files:
        return "no test file named"
    names = ""
    for name in files:
        path = ROOT / name.split("::")[0]
        if not path.is_file():
            return f"{name} does not exist"
        names += " ".join(re.findall(r"def (test_\w+)", path.read_text(encoding="utf-8")))
    if "-k" in argv:
        for word in re.findall(r"\w+", argv[argv.index("-k") + 1]):
            if word not in ("and", "or", "not") and word not in names:
                return f"-k {word!r} selects no test in {', '.join(files)}"
    return None


@functools.cache
def _script_help(script: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


def check_python_script(script: str, argv: list[str]) -> str | None:
    """A repository script: it exists, ``--help`` works and lists every ``--flag`` used."""
    if not (ROOT / script).is_file():
        return f"{script} does not exist"
    rc, text = _script_help(script)
    if rc != 0:
        return f"{script} --help exits with status {rc}"
    for flag in (w.split("=")[0] for w in argv if w.startswith("--")):
        if not re.search(rf"{re.escape(flag)}\b", text):
            return f"{script} has no option {flag}"
    return None


def check_python(argv: list[str]) -> str | None:
    if argv[:1] == ["-m"] and len(argv) > 1:
        return check_module(argv[1], argv[2:])
    if argv[:1] == ["-c"] and len(argv) > 1:
        try:
            compile(argv[1], "<python -c>", "exec")
        except SyntaxError as exc:
            return f"python -c: {exc}"
        return None
    if argv:
        return check_python_script(argv[0], argv[1:])
    return "python without arguments"


def check_make(argv: list[str]) -> str | None:
    proc = subprocess.run(["make", "-n", *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
    return None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["make -n failed"])[-1]


def check_bash(argv: list[str]) -> str | None:
    if not argv or not (ROOT / argv[0]).is_file():
        return f"{argv[0] if argv else 'bash'}: no such script"
    proc = subprocess.run(["bash", "-n", argv[0]], cwd=ROOT, capture_output=True, text=True, timeout=60)
    return None if proc.returncode == 0 else proc.stderr.strip()


@functools.lru_cache(maxsize=1)
def _extras() -> frozenset[str]:
    """The extras of pyproject.toml's ``[project.optional-dependencies]`` (no tomllib on Python 3.10)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return frozenset(re.findall(r"^([A-Za-z0-9][\w.-]*)\s*=", section, flags=re.M))


def check_external(argv: list[str]) -> str | None:
    """Another tool's command: only the aimkit extras it names are checked."""
    for word in argv:
        match = re.search(r"aimkit[^\s\[]*\[([^\]]*)\]", word)
        for extra in match.group(1).split(",") if match else ():
            if extra.strip() not in _extras():
                return f"aimkit has no extra {extra.strip()!r} (pyproject.toml: {', '.join(sorted(_extras()))})"
    return None


def check_command(command: DocCommand) -> str | None:
    """Parse-level check of one command: None when it passes, else the reason."""
    verdict = classify(command)
    if verdict is None:
        return "not classified (add a pattern to CLASSES in scripts/check_doc_commands.py)"
    if verdict[0] == EXTERNAL:
        return check_external(list(command.argv))
    program, rest = command.argv[0], list(command.argv[1:])
    checks = {"aimkit": check_aimkit_args, "python": check_python, "python3": check_python,
              "accelerate": check_accelerate, "make": check_make, "bash": check_bash}
    if program not in checks:
        return f"no check for {program}"
    return checks[program](rest)


# ------------------------------------------------------------------------------------ running


def _run_env(command: DocCommand) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(dict(command.env))
    return env


def _serve(argv: list[str], cwd: str, env: dict[str, str], timeout: float) -> str | None:
    """Start a server as written, wait for its page on 127.0.0.1:7860, stop it with Ctrl-C."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen("http://127.0.0.1:7860/", timeout=5) as response:
                    if response.status == 200 and b"<form" in response.read():
                        return None
            except OSError:
                time.sleep(0.5)
        return "exited before serving its page" if proc.poll() is not None else "no page within the time limit"
    finally:
        proc.send_signal(2)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_command(command: DocCommand, timeout: float = 1800) -> tuple[str | None, float]:
    """Run one command as written in an empty temporary folder: (error or None, wall seconds)."""
    argv = [PLACEHOLDERS.get(word, word) for word in command.argv]
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    with tempfile.TemporaryDirectory(prefix="aimkit-doc-") as cwd:
        start = time.perf_counter()
        if argv[:2] == ["aimkit", "serve"]:
            return _serve(argv, cwd, _run_env(command), timeout), time.perf_counter() - start
        try:
            proc = subprocess.run(argv, cwd=cwd, env=_run_env(command), capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"still running after {timeout:.0f} s", time.perf_counter() - start
        seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or [""]
        return f"exit status {proc.returncode}: {tail[0]}", seconds
    return None, seconds


# ---------------------------------------------------------------------------------------- main


def check_all(commands: list[DocCommand], run: bool = False, echo=print) -> list[str]:
    """Check every command (and run the ``run`` class when ``run``); the failure lines."""
    failures, ran = [], {}
    for command in commands:
        verdict = classify(command)
        error = check_command(command)
        note = ""
        if error is None and run and verdict and verdict[0] == RUN:
            key = (command.argv, command.env)
            if key not in ran:  # a command documented twice runs once
                ran[key] = run_command(command)
            error, seconds = ran[key]
            note = f" ({seconds:.1f} s)"
        kind = verdict[0] if verdict else "?"
        echo(f"{'ok  ' if error is None else 'FAIL'} {kind:8} {command.where}: {command.text}{note}")
        if error is not None:
            failures.append(f"{command.where}: `{command.text}`: {error}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true", help="also run the commands of class 'run' (minutes)")
    parser.add_argument("--list", action="store_true", help="list the commands and their classes, check nothing")
    parser.add_argument("files", nargs="*", type=Path, help="Markdown files (default: README.md, docs/*.md)")
    args = parser.parse_args(argv)
    commands = collect([f.resolve() for f in args.files] or doc_files())
    if args.list:
        for command in commands:
            kind, why = classify(command) or ("?", "not classified")
            print(f"{kind:8} {command.where}: {command.text}    # {why}")
        return 0
    failures = check_all(commands, run=args.run)
    for line in failures:
        print(f"check_doc_commands: {line}", file=sys.stderr)
    print(f"{len(commands) - len(failures)} of {len(commands)} documented commands pass")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
