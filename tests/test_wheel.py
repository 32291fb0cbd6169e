"""A clean install: the wheel built from the tree holds only the project's packages, requires only the runtime
pins, and its `mini-omni-server` serves `/v1/audio/speech` in a fresh venv that sees nothing but the runtime
dependencies.

No download: the fresh venv is made without pip, the wheel goes in with this environment's pip (`--no-deps`),
and the runtime dependencies' installed files (their closure, read from the metadata here) are linked into one
directory the venv reads through a `.pth` file. So an import of anything outside the runtime list (pytest,
openai, gradio, the checkout's top-level scripts) fails there.
"""
import email
import json
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.conftest import ROOT
from tests.http_client import Server

PACKAGES = {"omni", "serving", "voice", "webui"}  # the wheel's top-level names, besides its .dist-info
NOT_RUNTIME = ("pytest", "openai", "gradio", "streamlit", "playwright", "sounddevice", "cv2", "utils", "server",
               "inference", "bench", "omni_engine", "realtime_vad_player")
BUILD_TIMEOUT_S = 300
STEP_TIMEOUT_S = 120


def run(*command: str, cwd: Path | None = None) -> str:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def pins(path: Path) -> set[str]:
    """The requirement lines of one requirements/*.txt file, comments dropped."""
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {str(Requirement(line)) for line in lines if line}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(requirements: list[Requirement]) -> list[metadata.Distribution]:
    """The installed distributions these requirements pull in, transitively (markers read, extras followed)."""
    found: dict[str, metadata.Distribution] = {}
    seen: set[tuple[str, str]] = set()  # (distribution, extra) whose requirements are queued
    todo = [(req, "") for req in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        key = normalized(req.name)
        found[key] = metadata.distribution(req.name)
        for wanted in {"", *req.extras} - {e for k, e in seen if k == key}:
            seen.add((key, wanted))
            todo.extend((Requirement(r), wanted) for r in found[key].requires or ())
    return list(found.values())


def link_site(dists: list[metadata.Distribution], site: Path) -> None:
    """Link each distribution's top-level files and folders (packages, modules, .dist-info, .libs) into `site`."""
    site.mkdir()
    for dist in dists:
        for top in {Path(f).parts[0] for f in dist.files or ()} - {"..", "__pycache__"}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip wheel .` makes of a copy of the tree (so no build/ or .egg-info lands in the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "requirements"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, src / name)
    for name in PACKAGES:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    run(sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w",
        str(tmp / "dist"))
    [built] = (tmp / "dist").glob("*.whl")
    return built


def requires_dist(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return [Requirement(r) for r in email.message_from_bytes(z.read(meta)).get_all("Requires-Dist")]


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed and only the runtime dependencies visible."""
    tmp = tmp_path_factory.mktemp("venv")
    env = tmp / "env"
    run(sys.executable, "-m", "venv", "--without-pip", str(env))
    python = env / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel))
    link_site(closure(requires_dist(wheel)), tmp / "runtime")
    purelib = run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    (Path(purelib) / "runtime-deps.pth").write_text(f"{tmp / 'runtime'}\n")
    return env


def test_the_wheel_holds_only_the_project_packages(wheel):
    with zipfile.ZipFile(wheel) as z:
        tops = {name.split("/")[0] for name in z.namelist()}
        scripts = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert {top for top in tops if not top.endswith(".dist-info")} == PACKAGES
    targets = re.findall(r"^\S+ = (\S+):main$", scripts, re.MULTILINE)
    assert targets and {target.split(".")[0] for target in targets} <= PACKAGES, scripts


def test_the_wheel_requires_the_runtime_pins_and_the_rest_only_as_extras(wheel):
    requires = requires_dist(wheel)
    assert {str(r) for r in requires if r.marker is None} == pins(ROOT / "requirements" / "runtime.txt")
    for extra in ("web", "voice", "test", "ray"):
        only = {str(r).split(";")[0] for r in requires if r.marker is not None and r.marker.evaluate({"extra": extra})}
        assert only == pins(ROOT / "requirements" / f"{extra}.txt"), extra


def test_the_fresh_venv_sees_the_installed_packages_and_nothing_else(venv):
    python = str(venv / "bin" / "python")
    where = run(python, "-c", "import omni, serving, voice; print(omni.__file__)", cwd=venv)
    assert Path(where.strip()).is_relative_to(venv), where
    for name in NOT_RUNTIME:
        done = subprocess.run([python, "-c", f"import {name}"], cwd=venv, capture_output=True, timeout=STEP_TIMEOUT_S)
        assert done.returncode != 0, f"{name} is importable in the runtime-only venv"


def test_the_installed_server_serves_speech(venv, tiny_ckpt, tmp_path):
    server = Server(tiny_ckpt, tmp_path, "--log-level", "warning", command=(str(venv / "bin" / "mini-omni-server"),),
                    cwd=venv)
    try:
        body = json.dumps({"model": "mini-omni", "input": "Hello there.", "voice": "alloy",
                           "response_format": "wav"}).encode()
        status, headers, data = server.request("POST", "/v1/audio/speech", body, {"Content-Type": "application/json"})
    finally:
        server.stop()
    assert status == 200, data[:500]
    assert headers["Content-Type"].startswith("audio/wav") and data[:4] == b"RIFF" and len(data) > 44
    log = (tmp_path.parent / f"server-{server.port}.log").read_text()
    assert " INFO " not in log, log  # --log-level warning: the start-up's info records are not written
