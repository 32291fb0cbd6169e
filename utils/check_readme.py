"""Run the README's quick commands and check that its figures say where and when they were measured.

    python -m utils.check_readme [README.md]     # exit 0 when every check passes; each failure on one line

Which commands run: a fenced block right after the comment `<!-- check -->` runs whole; after
`<!-- check: TEXT -->` only its lines that contain TEXT run. bash blocks run line by line, python blocks as one
script, each within BLOCK_TIMEOUT_S, in a scratch directory that links the checkout's top-level files (so
`python inference.py` and `python -m utils...` work as in a checkout) and adds:
- `checkpoint`: a tiny random checkpoint (`--seed 1 --likely-stop`) whose answer to `question.wav` ends after
  about a second of speech, so snippets without a length bound finish quickly;
- `question.wav`: data/samples/output2.wav;
- `/tmp/` in a command reads as the scratch's own `tmp/`;
- when a checked block names the server (`127.0.0.1:60808`), `python server.py` runs there on a free loopback
  port, which replaces 60808 (in exact mode, so it measures no mode at load, and with --no-realtime-admission,
  so a loaded CI machine still answers).

Figures: in every section (the text before the first heading, then each `##` section) that states a measured
time (a decimal like `7.7 min` or a range like `107-121 ms`), the section must also name the machine (a CPU or
GPU) and the date (YYYY-MM-DD) it was measured on.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK_TIMEOUT_S = 120  # one checked block; each takes seconds on the tiny checkpoint
SERVER_READY_S = 120  # the server's start-up, model load and warm-up included
POLL_S = 0.2  # between two readiness probes
QUESTION = ROOT / "data" / "samples" / "output2.wav"  # the stop checkpoint's short answer to it
CHECKPOINT_SEED = 1  # with --likely-stop: the answer to QUESTION ends early
README_PORT = "127.0.0.1:60808"  # the server address the README's commands use
MARKER = re.compile(r"<!--\s*check(?::\s*(.*?))?\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")
FIGURE = re.compile(r"\b\d+\.\d+ ?(?:ms|s|min)\b|\b\d+(?:\.\d+)?-\d+(?:\.\d+)? ?(?:ms|s|min)\b")
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")
MACHINE = re.compile(r"EPYC|Xeon|Ryzen|Core i\d|Apple M\d|Graviton|Neoverse|H100|H200|A100|L4\b|GPU")


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the README where the block's code starts
    language: str  # bash | python
    code: str  # what runs: the whole block, or its lines that hold the marker's text


def checked_blocks(readme: str) -> list[Block]:
    """The fenced blocks the README marks to run."""
    lines, blocks, i = readme.splitlines(), [], 0
    while i < len(lines):
        marker = MARKER.fullmatch(lines[i].strip())
        fence = FENCE.match(lines[i + 1]) if marker and i + 1 < len(lines) else None
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
        body = lines[i + 2:end]
        only = marker.group(1)
        chosen = [line for line in body if only in line] if only else body
        if not chosen:
            raise ValueError(f"README line {i + 1}: no line of the block below holds {only!r}")
        blocks.append(Block(i + 3, fence.group(1), "\n".join(chosen)))
        i = end + 1
    return blocks


def unsourced_figures(readme: str) -> list[str]:
    """Sections that state a measured time without naming the machine and the date."""
    sections = re.split(r"^(?=## )", readme, flags=re.MULTILINE)
    problems = []
    for section in sections:
        figures = FIGURE.findall(section)
        if figures and not (DATE.search(section) and MACHINE.search(section)):
            title = section.splitlines()[0] if section.startswith("## ") else "the first screen"
            problems.append(f"{title}: figures ({', '.join(figures[:3])}) without a CPU/GPU and a date")
    return problems


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scratch_dir(base: Path) -> Path:
    """A directory that looks like a checkout with a checkpoint and a question, and writes nothing into it."""
    for entry in ROOT.iterdir():
        if entry.name not in {".git", "checkpoint", "output"}:
            (base / entry.name).symlink_to(entry)
    (base / "tmp").mkdir()
    shutil.copy(QUESTION, base / "question.wav")
    subprocess.run([sys.executable, "-m", "utils.make_checkpoint", str(base / "checkpoint"), "--preset", "tiny",
                    "--seed", str(CHECKPOINT_SEED), "--likely-stop"], cwd=base, check=True, capture_output=True)
    return base


def start_server(base: Path, port: int, log: Path) -> subprocess.Popen:
    with log.open("w") as out:  # the server keeps its own copy of the file descriptor
        return subprocess.Popen([sys.executable, "server.py", "--ckpt-dir", "checkpoint", "--port", str(port),
                                 "--device", "cpu", "--mode", "exact", "--no-realtime-admission"], cwd=base,
                                stdout=out, stderr=subprocess.STDOUT)


def wait_ready(proc: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + SERVER_READY_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited during start-up; its log: {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                if b'"ready"' in resp.read():
                    return
        except OSError:
            pass
        time.sleep(POLL_S)
    raise TimeoutError(f"the server was not ready after {SERVER_READY_S} s; its log: {log}")


def run_block(block: Block, base: Path, port: int | None) -> str | None:
    """Run one block; None when it passed, else why not (one line)."""
    code = block.code.replace("/tmp/", f"{base}/tmp/")
    if port is not None:
        code = code.replace(README_PORT, f"127.0.0.1:{port}")
    # `python` in a command is this interpreter, an activated virtual environment or not
    env = {**os.environ, "PYTHONPATH": str(base),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    commands = [[sys.executable, "-c", code]] if block.language == "python" else \
        [["bash", "-c", line] for line in code.splitlines() if line.strip()]
    for command in commands:
        try:
            done = subprocess.run(command, cwd=base, env=env, capture_output=True, text=True,
                                  timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return f"README line {block.line}: still running after {BLOCK_TIMEOUT_S} s: {command[-1][:80]!r}"
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return f"README line {block.line}: exit {done.returncode}: {last}"
    return None


def check(readme_path: Path) -> list[str]:
    """Every failure, one line each; an empty list when the README checks out."""
    readme = readme_path.read_text()
    problems = unsourced_figures(readme)
    # The blocks without the server run while it starts; then those that use it.
    blocks = sorted(checked_blocks(readme), key=lambda b: README_PORT in b.code)
    with tempfile.TemporaryDirectory(prefix="check-readme-") as tmp:
        base, log = scratch_dir(Path(tmp)), Path(tmp) / "server.log"
        port = free_port() if any(README_PORT in b.code for b in blocks) else None
        server = start_server(base, port, log) if port is not None else None
        try:
            for block in blocks:
                if README_PORT in block.code:
                    wait_ready(server, port, log)
                started = time.monotonic()
                problem = run_block(block, base, port)
                print(f"README line {block.line} ({block.language}): {'FAILED' if problem else 'ok'} "
                      f"in {time.monotonic() - started:.1f} s", file=sys.stderr)
                problems += [problem] if problem else []
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=30)
    return problems


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Run the README's checked commands and check its figures.")
    p.add_argument("readme", nargs="?", type=Path, default=ROOT / "README.md")
    problems = check(p.parse_args(argv).readme)
    for problem in problems:
        print(problem)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
