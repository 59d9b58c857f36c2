"""The README stays true: every command in it parses with the real CLI, the cheap ones run
for real (tiny sizes, in a temp folder), its Python compiles and runs, its set-up commands
are the ones CI and the fresh-install test run, and the files it links to exist.

Commands are read from the README's ```bash blocks: backslash-continued lines joined,
`# comments` dropped, `&&` chains split. tests/test_fresh_install.py imports
`setup_commands()` from here and runs the first one in a fresh virtual environment.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import re
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"
SHIPPED_TOKENIZER = ROOT / "core" / "weights" / "tiny"

_FENCE = re.compile(r"^```([\w+-]*)[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_SEPARATORS = {"&&", "||", ";"}


@dataclass(frozen=True)
class Command:
    line: str               # the logical line as written (continuations joined, comment kept)
    argv: tuple[str, ...]   # one command of the line (a `&&` chain gives several)

    @property
    def text(self) -> str:
        return shlex.join(self.argv)


def readme_text() -> str:
    return README.read_text(encoding="utf-8")


def fenced_blocks(lang: str, text: str | None = None) -> list[str]:
    """The bodies of the ```lang blocks, in order."""
    return [body for tag, body in _FENCE.findall(readme_text() if text is None else text) if tag == lang]


def logical_lines(block: str) -> list[str]:
    joined = re.sub(r"\\[ \t]*\n", " ", block)
    return [" ".join(line.split()) for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def split_line(line: str) -> list[tuple[str, ...]]:
    """`a && b ; c` -> [a, b, c] as argv tuples (shell quoting and comments handled)."""
    parts: list[list[str]] = [[]]
    for token in shlex.split(line, comments=True):
        if token in _SEPARATORS:
            parts.append([])
        else:
            parts[-1].append(token)
    return [tuple(p) for p in parts if p]


def bash_lines(text: str | None = None) -> list[str]:
    return [line for block in fenced_blocks("bash", text) for line in logical_lines(block)]


def shell_commands(text: str | None = None) -> list[Command]:
    return [Command(line, argv) for line in bash_lines(text) for argv in split_line(line)]


def echopulse_commands() -> list[Command]:
    return [c for c in shell_commands() if c.argv[0] == "echopulse"]


def setup_commands() -> tuple[str, str]:
    """The two set-up lines at the top: (install + demo, install + tests), as written."""
    section = readme_text().split("## Set-up", 1)
    assert len(section) == 2, "README has no '## Set-up' section"
    body = re.split(r"^## ", section[1], maxsplit=1, flags=re.MULTILINE)[0]
    lines = bash_lines(body)
    assert len(lines) >= 2, f"the Set-up section should start with two bash commands, found {lines}"
    return lines[0], lines[1]


def readme_command(*words: str) -> Command:
    """The README's one `echopulse WORDS ...` command."""
    found = [c for c in echopulse_commands() if c.argv[1 : 1 + len(words)] == words]
    assert len(found) == 1, f"expected one `echopulse {' '.join(words)}` command in the README, found {len(found)}"
    return found[0]


def with_option(argv: tuple[str, ...] | list[str], option: str, value: str) -> list[str]:
    """argv with `option`'s value replaced (or the option appended)."""
    argv = list(argv)
    if option in argv:
        argv[argv.index(option) + 1] = value
    else:
        argv += [option, value]
    return argv


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def run_cli(argv: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """`echopulse ARGS` run as a user would (argv[0] is "echopulse")."""
    assert argv[0] == "echopulse"
    return subprocess.run([sys.executable, "-m", "echopulse.stream.cli", *argv[1:]], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


# -- the commands parse --------------------------------------------------------------------


def test_readme_commands_are_found() -> None:
    # Guards the extraction itself: a README restyle must not make the tests below vacuous.
    commands = echopulse_commands()
    assert len(commands) >= 12, [c.text for c in commands]
    names = {c.argv[1] for c in commands}
    assert {"demo", "serve", "replay", "subscribe", "view", "record", "simulate", "train", "evaluate"} <= names
    assert any(c.argv[:3] == ("echopulse", "serve", "--source") and "--metrics" in c.argv for c in commands), \
        "the backslash-continued serve command was not joined"


@pytest.mark.parametrize("command", echopulse_commands(), ids=lambda c: c.text[:80])
def test_readme_command_parses(command: Command, capsys: pytest.CaptureFixture[str]) -> None:
    from echopulse.stream.cli import build_parser

    try:
        args = build_parser().parse_args(list(command.argv[1:]))
    except SystemExit as exc:
        err = capsys.readouterr().err.strip()
        pytest.fail(f"README command does not parse (exit {exc.code}): {command.line}\n{err}")
    assert callable(args.handler), command.line


def test_command_table_lists_every_command() -> None:
    from echopulse.stream.cli import build_parser

    section = readme_text().split("## Command line", 1)[1].split("\n#", 1)[0]
    rows = dict(re.findall(r"^\|\s*`([\w-]+)`\s*\|(.*)\|\s*$", section, re.MULTILINE))
    commands = subcommands(build_parser())
    assert set(rows) == set(commands), "README command table vs `echopulse --help`"
    for name, cell in rows.items():  # "train | `tokenizer`, `ecg`, ..." lists every target
        if name in ("train", "evaluate"):
            listed = set(re.findall(r"`([\w-]+)`", cell))
            assert listed == set(subcommands(commands[name])), f"README table row for {name}"


def test_other_commands_name_real_files() -> None:
    others = [c for c in shell_commands() if c.argv[0] not in ("echopulse", "pip")
              and c.argv[:3] != ("python", "-m", "pytest")]
    assert others, "expected the benchmark commands"
    for command in others:
        assert command.argv[0] in ("python", "bash"), f"unexpected command in README: {command.line}"
        script = ROOT / command.argv[1]
        assert script.is_file(), f"README command names a missing file: {command.line}"
        if command.argv[1] == "benchmarks/run.py":  # `[--only a,b,...]`: every stage exists
            text = " ".join(command.argv[2:])
            help_text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                                       timeout=60).stdout
            for option in re.findall(r"--[\w-]+", text):
                assert option in help_text, f"benchmarks/run.py has no {option}: {command.line}"
            only = re.search(r"--only ([\w,]+)", text)
            assert only, command.line
            for stage in only.group(1).split(","):
                assert (ROOT / "benchmarks" / f"bench_{stage}.py").is_file(), f"no benchmark stage {stage!r}"


# -- the set-up commands are what CI and the fresh-install test run -------------------------


def _ci_commands() -> list[tuple[str, ...]]:
    """.ci/run's pip installs and pytest, as the README would write them."""
    found = []
    for line in CI_RUN.read_text().splitlines():
        for argv in split_line(line) if line.strip() and not line.lstrip().startswith("#") else []:
            if argv[:3] == ("python3", "-m", "pip"):
                found.append(("pip", *[a for a in argv[3:] if a != "-q"]))
            elif argv[:3] == ("python3", "-m", "pytest"):
                found.append(("python", *argv[1:]))
    return found


def test_setup_commands_are_the_ones_ci_and_the_fresh_install_test_run() -> None:
    demo_line, test_line = setup_commands()
    demo, tests = split_line(demo_line), split_line(test_line)
    # The test command is exactly CI's: the same installs, then the same pytest.
    assert _ci_commands() == tests, f".ci/run vs README: {_ci_commands()} != {tests}"
    assert tests[-1][:3] == ("python", "-m", "pytest")
    # The demo command installs the same torch and the package (without test extras) and
    # runs the demo with no arguments; tests/test_fresh_install.py runs it as written.
    torch_pins = [a for argv in tests if argv[:2] == ("pip", "install") for a in argv if a.startswith("torch")]
    assert torch_pins and demo[0] == ("pip", "install", *torch_pins), (demo, tests)
    assert demo[1] == ("pip", "install", "-e", "."), demo
    assert tests[1] == ("pip", "install", "-e", ".[test]"), tests
    assert demo[-1] == ("echopulse", "demo") and len(demo) == 3, demo
    assert (ROOT / "tests" / "test_fresh_install.py").is_file()


# -- the Python snippets --------------------------------------------------------------------


def python_snippets() -> list[str]:
    snippets = fenced_blocks("python")
    assert snippets, "the README's Python API example is gone"
    return snippets


def test_python_snippets_compile_and_their_imports_exist() -> None:
    for i, source in enumerate(python_snippets()):
        code = compile(source, f"README.md python block {i}", "exec")
        assert code is not None
        tree = ast.parse(source)
        imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        exec(compile(ast.Module(body=imports, type_ignores=[]), f"README.md python block {i} imports", "exec"), {})


@pytest.mark.network
def test_subscriber_snippet_runs_against_a_real_publisher() -> None:
    from echopulse.stream.publish import Publisher

    source = next(s for s in python_snippets() if "Subscriber(" in s)
    endpoint = re.search(r'"(tcp://[^"]+)"', source)
    assert endpoint, source
    frames = np.zeros((3, 8, 12), np.uint8)
    with Publisher("tcp://127.0.0.1:0") as pub:
        # The README's endpoint becomes this publisher's; its 5 s silence timeout 0.5 s.
        runnable = source.replace(endpoint.group(1), pub.endpoint)
        runnable = re.sub(r"timeout=[\d.]+", "timeout=0.5", runnable)
        stop = threading.Event()

        def publish() -> None:
            beat = 0
            while not stop.is_set() and beat < 40:  # ZeroMQ slow joiner: send until the snippet got some
                pub.publish_frames("readme", frames, times=[0.0, 0.3, 0.6], beat=beat, r_time=0.0, rr=0.9,
                                   model="sim", capture=time.time())
                beat += 1
                time.sleep(0.02)

        thread = threading.Thread(target=publish)
        out = io.StringIO()
        thread.start()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(runnable, "README.md python block", "exec"), {})
        finally:
            stop.set()
            thread.join(timeout=5)
    lines = out.getvalue().splitlines()
    assert lines, "the README's subscriber example printed nothing"
    assert all(line.startswith("readme ") and "(8, 12)" in line for line in lines), lines[:3]


# -- links ----------------------------------------------------------------------------------


def test_linked_files_exist() -> None:
    targets = re.findall(r"\]\(([^)\s]+)\)", readme_text())
    local = [t for t in targets if not re.match(r"\w+://", t) and not t.startswith("#")]
    assert local
    missing = [t for t in local if not (ROOT / t.split("#")[0]).exists()]
    assert not missing, f"README links to missing files: {missing}"


# -- the cheap commands, run for real ------------------------------------------------------


def test_simulate_runs_as_documented(tmp_path: Path) -> None:
    argv = with_option(readme_command("simulate").argv, "--n", "2")
    out = run_cli(argv, tmp_path)
    assert out.returncode == 0, f"{shlex.join(argv)}\n{out.stderr[-2000:]}"
    folder = tmp_path / argv[argv.index("--out") + 1]
    index = json.loads((folder / "index.json").read_text())
    assert len(index["samples"]) == 2
    size, frames = int(argv[argv.index("--size") + 1]), int(argv[argv.index("--frames") + 1])
    with np.load(folder / index["samples"][0]["file"]) as z:
        # The keys the README lists.
        assert {"video", "video_t", "ecg", "ecg_fs", "r_peaks", "lv_mask", "lv_volume", "ef", "ed", "es"} <= set(z.files)
        assert z["video"].dtype == np.uint8 and z["video"].shape == (frames, size, size)
        assert z["ecg"].dtype == np.float32 and z["ecg"].ndim == 2
    if "--preview" in argv:
        preview = tmp_path / argv[argv.index("--preview") + 1]
        assert preview.stat().st_size > 0 and preview.with_suffix(".png").is_file()


def test_replay_runs_as_documented(tmp_path: Path) -> None:
    from echopulse.core.simulate import simulate_ecg

    argv = list(readme_command("replay").argv)
    recording, fs = argv[2], float(argv[argv.index("--fs") + 1])
    signal = simulate_ecg(6.0, fs=fs, hr=80.0, seed=5).signal[0]
    np.savetxt(tmp_path / recording, signal, fmt="%.5f")
    out = run_cli(argv, tmp_path)
    assert out.returncode == 0, f"{shlex.join(argv)}\n{out.stderr[-2000:]}"
    with np.load(tmp_path / argv[argv.index("--out") + 1]) as z:
        assert {"frames", "t", "beat", "r_peaks", "hr"} <= set(z.files)  # what the README promises
        assert z["frames"].dtype == np.uint8 and z["frames"].ndim == 3
        assert len(z["r_peaks"]) >= 4 and len(z["frames"]) == len(z["t"]) == len(z["beat"])
        np.testing.assert_allclose(z["hr"], 80.0, rtol=0.2)


@pytest.mark.network
def test_subscribe_runs_as_documented(tmp_path: Path) -> None:
    from echopulse.stream.publish import Publisher

    readme = readme_command("subscribe").argv
    assert readme[2].startswith("tcp://"), readme
    count = 5
    frames = np.arange(2 * 6 * 7, dtype=np.uint8).reshape(2, 6, 7)
    with Publisher("tcp://127.0.0.1:0") as pub:
        argv = with_option([*readme[:2], pub.endpoint, *readme[3:]], "--count", str(count))
        proc = subprocess.Popen([sys.executable, "-m", "echopulse.stream.cli", *argv[1:]], cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline, beat = time.monotonic() + 60, 0
            while proc.poll() is None and time.monotonic() < deadline:  # until it has its count
                pub.publish_frames("strap", frames, times=[2.0, 2.4], beat=beat, r_time=2.0, rr=0.8, model="sim",
                                   capture=time.time())
                beat += 1
                time.sleep(0.05)
            stdout, stderr = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, f"{shlex.join(argv)}\n{stderr[-2000:]}"
    assert len([line for line in stdout.splitlines() if line.startswith("frame")]) == count
    if "--out" in argv:
        with np.load(tmp_path / argv[argv.index("--out") + 1]) as z:
            assert z["frames"].shape == (count, 6, 7)


@pytest.mark.skipif(not (SHIPPED_TOKENIZER / "tokenizer.json").is_file(), reason="no shipped tokenizer in core/weights/tiny")
def test_evaluate_tokenizer_runs_as_documented(tmp_path: Path) -> None:
    argv = with_option(readme_command("evaluate", "tokenizer").argv, "--checkpoint", str(SHIPPED_TOKENIZER))
    argv = with_option(argv, "--n", "2")
    out = run_cli(argv, tmp_path)
    assert out.returncode == 0, f"{shlex.join(argv)}\n{out.stderr[-2000:]}"
    path = tmp_path / argv[argv.index("--out") + 1] if "--out" in argv else None
    result = json.loads(path.read_text() if path else out.stdout)
    assert result["checkpoint"] == str(SHIPPED_TOKENIZER)
    assert result["seed"] == int(argv[argv.index("--seed") + 1])
