"""The README, run: its shell and Python examples run in order against real swarms and print what
the text says they print, and the command the server's join line gives a client answers.

How the examples are read (new examples follow the same rules; a block this file does not list
fails ``test_every_example_is_listed``):

- Fenced ``bash`` and ``python`` blocks run in README order in one scratch directory, with the
  Python environment running this test first on ``PATH``; ``make`` runs in the repository root.
- In ``bash``, a comment on a line of its own right after a command is what that command prints
  (the text after ``# `` must appear in its output); a comment at the end of a line only explains.
- In ``python``, a comment at the end of a ``print(...)`` line is what that line prints.
- Commands that keep running (``make serve``, ``corolla serve``, ``corolla dht``, ``corolla api``)
  start in the background in a process group of their own, and the next command runs once they
  are ready (their join line or banner). They are stopped with Ctrl-C (SIGINT to the group).
- A placeholder multiaddr ``/ip4/127.0.0.1/tcp/PORT/p2p/QmNAME...`` stands for the address that
  the command named in ``PLACEHOLDERS`` printed; the API's ports become free ones (``PORTS``).
- Blocks that cannot run here (Docker: no engine on this machine; ``make test``: it is what runs
  this test) are listed with the reason, and their shell syntax is still checked.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from corolla.lab.relay import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[2]
README = ROOT / "README.md"
# placeholder in the README -> the command (as written there) whose join line gives the address
PLACEHOLDERS = {
    "/ip4/127.0.0.1/tcp/41337/p2p/QmServer...": "make serve",
    "/ip4/127.0.0.1/tcp/41338/p2p/QmBootstrap...": "corolla dht --swarm_key swarm.key",
}
PORTS = ("8000", "9100")  # the API's ports in the README, each replaced by a free one
# (section heading, language) of every example block, in README order, with the reason a block is
# not run here (None: it runs)
BLOCKS: list[tuple[str, str, str | None]] = [
    ("Quick start", "bash", None),
    ("A second server", "bash", None),
    ("Generating through the swarm", "bash", None),
    ("The Python API", "python", None),
    ("The OpenAI-compatible API and the web page", "bash", None),
    ("The OpenAI-compatible API and the web page", "python", None),
    ("Fine-tuning through the swarm", "python", None),
    ("The demo", "bash", None),
    ("Seeing the swarm", "bash", None),
    ("A closed swarm", "bash", None),
    ("The server command", "bash", None),
    (
        "Volunteering from home",
        "bash",
        "builds a network lab and serves from namespaces (root, nftables): "
        "tests/integration/lab/test_internet.py runs this scenario",
    ),
    ("Running in a container", "bash", "needs a Docker engine, and none runs on this machine"),
    ("Running in a container", "bash", "needs a Docker engine, and none runs on this machine"),
    ("Running in a container", "bash", "needs a Docker engine, and none runs on this machine"),
]
NOT_RUN_COMMANDS = {"make test": "it is the command that runs this test"}
LONG_RUNNING = ("make serve", "corolla serve", "corolla dht", "corolla api")
READY = re.compile(r"--initial_peers (/\S+)|: serving \S+ at http")
COMMAND_TIMEOUT = 300.0
READY_TIMEOUT = 300.0
STOP_TIMEOUT = 15.0


@dataclass
class Block:
    heading: str
    language: str
    text: str
    line: int  # where it starts in README.md


@dataclass
class Command:
    text: str
    expected: list[str] = field(default_factory=list)

    @property
    def program(self) -> str:
        """The command without leading variable assignments, e.g. ``corolla serve --config x``."""
        words = re.sub(r"\s+#.*$", "", self.text, flags=re.M).split()
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
            words.pop(0)
        return " ".join(words)


def read_blocks(text: str) -> list[Block]:
    """The fenced bash and python blocks of the README, with the heading each one is under."""
    blocks, heading = [], ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#") and not line.startswith("#!"):
            heading = line.lstrip("#").strip()
        if line.startswith("```"):
            language, start = line[3:].strip(), i
            i += 1
            body = []
            while not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            if language in ("bash", "python"):
                blocks.append(Block(heading, language, "\n".join(body) + "\n", start + 1))
        i += 1
    return blocks


def shell_commands(block: str) -> list[Command]:
    """A bash block as commands (continuation lines and here-documents joined), each with the
    outputs the comment lines right after it promise."""
    commands: list[Command] = []
    lines = block.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip():
            continue
        if line.lstrip().startswith("#"):
            if commands:
                commands[-1].expected.append(line.strip()[1:].strip())
            continue
        text = line
        while text.rstrip().endswith("\\"):
            text += "\n" + lines[i]
            i += 1
        if heredoc := re.search(r"<<-?\s*'?(\w+)'?", text):
            while lines[i].strip() != heredoc.group(1):
                text += "\n" + lines[i]
                i += 1
            text += "\n" + lines[i]
            i += 1
        commands.append(Command(text))
    return commands


def printed_in_python(block: str) -> list[str]:
    """What the ``print(...)`` lines of a Python block say they print."""
    return [m.group(1).strip() for m in re.finditer(r"^\s*print\(.*\)\s*#\s*(.+)$", block, re.M)]


class Readme:
    """Runs the README's commands: a scratch directory, the environment, and the processes that keep
    running, with the addresses they printed."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
        }
        self.addresses: dict[str, str] = {}
        self.ports = {port: str(free_port()) for port in PORTS}
        self.running: list[Background] = []

    def substitute(self, text: str) -> str:
        for placeholder, command in PLACEHOLDERS.items():
            if command in self.addresses:
                text = text.replace(placeholder, self.addresses[command])
        for port, free in self.ports.items():
            text = re.sub(rf"\b{port}\b", free, text)
        return text

    def cwd(self, command: Command) -> Path:
        return ROOT if command.program.startswith("make ") else self.workdir

    def run(self, command: Command) -> str:
        """Run a command to its end (rc 0) and return its output; or start one that keeps running
        and return once it is ready."""
        text = self.substitute(command.text)
        if command.program.startswith(LONG_RUNNING):
            process = Background(text, self.cwd(command), self.env)
            self.running.append(process)
            output = process.wait_ready()
            if (match := READY.search(output)) and match.group(1):
                self.addresses.setdefault(command.program, match.group(1))
        else:
            result = run_to_end(["bash", "-c", text], self.cwd(command), self.env)
            assert result.returncode == 0, f"{text!r} exited {result.returncode}:\n{result.stderr[-3000:]}"
            output = result.stdout
        for expected in command.expected:
            assert expected in output, f"{text!r} did not print {expected!r}; it printed:\n{output[-3000:]}"
        return output

    def run_python(self, source: str, name: str) -> str:
        script = self.workdir / name
        script.write_text(self.substitute(source))
        result = run_to_end([sys.executable, str(script)], self.workdir, self.env)
        assert result.returncode == 0, f"{name} exited {result.returncode}:\n{result.stderr[-3000:]}"
        for expected in printed_in_python(source):
            assert expected in result.stdout, f"{name} did not print {expected!r}:\n{result.stdout[-3000:]}"
        return result.stdout

    def stop_all(self) -> None:
        """Ctrl-C each running command's process group, newest first; each must exit in time."""
        failures = []
        for process in reversed(self.running):
            if (problem := process.interrupt()) is not None:
                failures.append(problem)
        self.running.clear()
        assert not failures, "\n".join(failures)


def run_to_end(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a command in a process group of its own; past ``COMMAND_TIMEOUT`` the whole group is
    killed (nothing it started outlives the test) and the test fails."""
    process = subprocess.Popen(
        args, cwd=cwd, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        what = " ".join(args)
        raise AssertionError(f"{what!r} ran past {COMMAND_TIMEOUT:.0f} s:\n{stderr[-3000:]}") from None
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


class Background:
    """A command that keeps running, in a process group of its own (as a terminal's job)."""

    def __init__(self, text: str, cwd: Path, env: dict[str, str]) -> None:
        self.text = text
        self.process = subprocess.Popen(
            ["bash", "-c", text], cwd=cwd, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._ready = threading.Event()
        outputs = ((self.process.stdout, self.stdout, True), (self.process.stderr, self.stderr, False))
        for stream, lines, watch in outputs:
            threading.Thread(target=self._read, args=(stream, lines, watch), daemon=True).start()

    def _read(self, stream, into: list[str], watch: bool) -> None:  # type: ignore[no-untyped-def]
        for line in stream:
            into.append(line)
            if watch and READY.search(line):
                self._ready.set()

    def wait_ready(self) -> str:
        deadline = time.monotonic() + READY_TIMEOUT
        while not self._ready.wait(0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.text!r} was not ready (exit status {self.process.poll()}):\n"
                    + "".join(self.stderr[-40:])
                )
        return "".join(self.stdout)

    def interrupt(self) -> str | None:
        """Ctrl-C; a problem, if it did not exit in time."""
        if self.process.poll() is not None:
            return f"{self.text!r} had exited before Ctrl-C (status {self.process.returncode})"
        logged = len(self.stderr)
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            return f"{self.text!r} did not exit within {STOP_TIMEOUT:.0f} s of Ctrl-C"
        time.sleep(0.2)  # the reader threads take the last lines
        after = "".join(self.stderr[logged:])
        if re.search(r"\b(WARN|WARNING|ERROR|Traceback)\b", after):
            return f"{self.text!r} logged a warning or an error on Ctrl-C:\n{after[-3000:]}"
        return None


@pytest.fixture(scope="module")
def readme(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Readme]:
    runner = Readme(tmp_path_factory.mktemp("readme"))
    yield runner
    runner.stop_all()


def test_every_example_is_listed() -> None:
    found = [(b.heading, b.language) for b in read_blocks(README.read_text())]
    assert found == [(heading, language) for heading, language, _ in BLOCKS], (
        "the README's examples changed: list each one in BLOCKS (and make it run)"
    )


def test_not_run_examples_are_valid_shell() -> None:
    for block, (_, _, why) in zip(read_blocks(README.read_text()), BLOCKS, strict=True):
        if why is not None:
            result = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True)
            assert result.returncode == 0, f"README.md:{block.line}: {result.stderr}"


def test_the_readme_runs(readme: Readme) -> None:
    """Every runnable block, in order; the processes a section started stop where the swarm it
    belongs to is no longer used."""
    blocks = read_blocks(README.read_text())
    tmp_before = corolla_temp_entries()
    for index, (block, (_, _, why)) in enumerate(zip(blocks, BLOCKS, strict=True)):
        if why is not None:
            continue
        where = f"README.md:{block.line} ({block.heading})"
        if block.language == "python":
            readme.run_python(block.text, f"example_{index}.py")
            continue
        for command in shell_commands(block.text):
            if command.program in NOT_RUN_COMMANDS:
                continue
            try:
                output = readme.run(command)
            except AssertionError as error:
                raise AssertionError(f"{where}: {error}") from None
            if command.program == "make serve":
                check_join_line(readme, output)
            if command.program == "corolla demo":
                check_demo(output, tmp_before=tmp_before)
        if block.heading == "Seeing the swarm":
            readme.stop_all()  # the quick start's swarm is not used after this
    readme.stop_all()


def check_join_line(readme: Readme, output: str) -> None:
    """The join line looks as the README shows it, and its client command answers."""
    sample = re.search(r"^Join this swarm: .*$", README.read_text(), re.M)
    line = re.search(r"^Join this swarm: .*$", output, re.M)
    assert sample is not None and line is not None, output
    pattern = re.escape(sample.group(0))
    for placeholder in PLACEHOLDERS:
        pattern = pattern.replace(re.escape(placeholder), r"/\S+")
    assert re.fullmatch(pattern, line.group(0)), f"{line.group(0)!r} does not look like {sample.group(0)!r}"
    client = line.group(0).split("|")[1].strip().removeprefix("client: ")
    assert shlex.split(client)[:2] == ["corolla", "generate"], client
    readme.run(Command(client, ["The capital of France is Paris."]))


def corolla_temp_entries() -> set[str]:
    return {entry.name for entry in Path(tempfile.gettempdir()).glob("corolla-*")}


def check_demo(output: str, *, tmp_before: set[str]) -> None:
    """The demo prints the route over both servers, names one folder holding both servers' logs,
    and leaves nothing in the temporary directory."""
    assert "blocks  0:15" in output and "blocks 15:30" in output, output
    logs = re.search(r"the servers' logs: (\S+)", output)
    assert logs is not None, output
    names = sorted(path.name for path in Path(logs.group(1)).iterdir())
    assert len(names) == 2 and all(name.endswith(".log") for name in names), names
    left = corolla_temp_entries() - tmp_before
    assert not left, f"corolla demo left {sorted(left)} in {tempfile.gettempdir()}"
