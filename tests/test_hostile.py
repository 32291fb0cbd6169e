"""Attacks on the real server process, each as an attacker would send it (loopback and local files only)."""
from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import wave
from pathlib import Path

import numpy as np
import pytest

from omni.audio import SAMPLE_RATE, TEMP_PREFIX
from tests.conftest import ROOT
from tests.http_client import Server
from tests.test_audio import _float_wav

MAX = 120  # max_tokens (prompt included): short answers, the honest requests here only need to be answered
MAX_BYTES = 16 * 1024 * 1024  # the server's default body limit
API_KEY = "test-key-0123456789"
HOSTILE = 6  # hostile uploads sent at once in the load test
HONEST = 8  # honest clients beside them
RSS_GROWTH_MB = 400  # the server's peak memory may grow this much under the whole load test


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    srv = Server(tiny_ckpt, tmp_path_factory.mktemp("hostile-tmp"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def guarded(tiny_ckpt, tmp_path_factory):
    srv = Server(tiny_ckpt, tmp_path_factory.mktemp("guarded-tmp"), "--api-key", API_KEY,
                 "--allow-origin", "https://omni.example.org", "--allow-host", "omni.lan")
    yield srv
    srv.stop()


class Listener:
    """A local TCP listener that accepts and never answers; counts who connected."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.accepted.append(self.sock.accept()[0])
            except OSError:
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in self.accepted:
            conn.close()
        self.sock.close()


def _post(srv: Server, audio: bytes, **fields):
    body = json.dumps({"audio": base64.b64encode(audio).decode(), **fields}).encode()
    status, headers, data = srv.request("POST", "/chat", body, {"Content-Type": "application/json"})
    return status, headers, data


def _error(data: bytes) -> str:
    return json.loads(data)["error"]


def _playlist(target: str, ended: bool = True) -> bytes:
    lines = ["#EXTM3U", "#EXT-X-TARGETDURATION:10", "#EXTINF:10,", target] + (["#EXT-X-ENDLIST"] if ended else [])
    return ("\n".join(lines) + "\n").encode()


def _rss_peak_kb(srv: Server) -> int:
    status = Path(f"/proc/{srv.proc.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


def _temp_left(srv: Server) -> list[str]:
    return [p.name for p in srv.tmpdir.iterdir() if p.name.startswith(TEMP_PREFIX)]


def _long_flac(path: Path, hours: float = 3) -> bytes:
    """One second of tone, then hours of silence: about 2 MB of FLAC."""
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
                    "sine=frequency=440:duration=1:sample_rate=8000", "-f", "lavfi", "-i", "anullsrc=r=8000:cl=mono",
                    "-filter_complex", "[0][1]concat=n=2:v=0:a=1", "-t", str(int(hours * 3600)), str(path)],
                   check=True)
    return path.read_bytes()


# 1. A playlist naming a file on the server's disk is not "heard", and cannot tell whether the file exists.
def test_playlist_naming_a_server_file_is_refused_the_same_way_as_a_missing_one(server, sample_wav):
    existing = _post(server, _playlist(str(sample_wav.resolve())))
    missing = _post(server, _playlist("/nonexistent/answer.wav"))
    assert existing[0] == missing[0] == 400
    assert _error(existing[2]) == _error(missing[2])
    assert "not an accepted audio format" in _error(existing[2])


# 2. A playlist that never ends, naming a local listener, neither connects nor hangs the server.
def test_endless_playlists_neither_connect_nor_hang(server):
    listener = Listener()
    try:
        upload = _playlist(f"http://127.0.0.1:{listener.port}/segment.ts", ended=False)
        results = []
        threads = [threading.Thread(target=lambda: results.append(_post(server, upload))) for _ in range(HOSTILE)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        # each is refused as a format (400), or as one too many while the queue is full (503)
        assert len(results) == HOSTILE and {r[0] for r in results} <= {400, 503} and 400 in {r[0] for r in results}
        assert server.get("/health")[0] == 200
        assert listener.accepted == []
    finally:
        listener.close()
    assert _temp_left(server) == []


# 3. Hours of compressed audio are not decoded whole, and cost the server little memory.
def test_hours_of_flac_are_refused_without_decoding_them(server, tmp_path):
    before = _rss_peak_kb(server)
    status, _, data = _post(server, _long_flac(tmp_path / "long.flac"))
    assert status == 400 and "at most 30 s" in _error(data)
    assert _rss_peak_kb(server) - before < RSS_GROWTH_MB * 1024
    assert _temp_left(server) == []


# 4. The body limit holds while reading: a declared large body is refused before it is sent.
def test_declared_oversized_body_gets_413_before_it_is_sent(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"POST /chat HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: audio/wav\r\n"
                     f"Content-Length: {40 * 1024 * 1024}\r\n\r\n".encode())
        reply = sock.recv(4096).decode(errors="replace")
    assert reply.startswith("HTTP/1.1 413")


def test_chunked_upload_is_cut_off_at_the_limit(server):
    sent = 0
    block = b"\0" * (1024 * 1024)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"POST /chat HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: audio/wav\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        try:
            for _ in range(100):  # 100 MB, if the server let it in
                sock.sendall(f"{len(block):x}\r\n".encode() + block + b"\r\n")
                sent += len(block)
            sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            reply = sock.recv(4096).decode(errors="replace")
        except ConnectionResetError:
            reply = ""
    assert sent < 2 * MAX_BYTES  # the server stopped reading at its limit (plus socket buffers)
    assert reply == "" or reply.startswith("HTTP/1.1 413")
    assert server.get("/health")[0] == 200


def test_app_refuses_a_declared_oversized_body_with_json(engine):
    from serving.app import create_app
    from serving.service import EngineService

    client = create_app(EngineService(lambda: engine, max_queue=1), max_bytes=1000).test_client()
    refused = client.post("/chat", data=b"\0" * 2000, content_type="audio/wav")
    assert refused.status_code == 413 and "at most 1000" in refused.json["error"]


# 5. Answers are private: /health names no request, a record needs its token.
def test_answers_are_readable_only_with_their_token(server, sample_wav):
    conn, resp = server.open_chat(sample_wav.read_bytes(), max_tokens=MAX)
    assert resp.status == 200
    headers = dict(resp.getheaders())
    health = server.get("/health")[2].decode()
    resp.read()
    conn.close()
    assert headers["X-Request-Id"] not in health and headers["X-Request-Token"] not in health
    path = f"/requests/{headers['X-Request-Id']}"
    assert server.get(path)[0] == 404
    assert server.request("GET", path, None, {"X-Request-Token": "guess"})[0] == 404
    assert server.record(headers)["outcome"] == "completed"


# 6. Another origin's page, or a rebinding host name, cannot make the engine work.
CROSS_SITE = [
    ("foreign origin", {"Origin": "http://evil.example"}),
    ("null origin", {"Origin": "null"}),
    ("rebinding host", {"Host": "rebind.evil.example"}),
    ("rebinding host with port", {"Host": "rebind.evil.example:60808", "Origin": "http://rebind.evil.example:60808"}),
]


@pytest.mark.parametrize("name, headers", CROSS_SITE, ids=[c[0] for c in CROSS_SITE])
def test_cross_site_requests_are_refused(server, sample_wav, name, headers):
    boundary = "xYz"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"audio\"; filename=\"q.wav\"\r\n"
            f"Content-Type: audio/wav\r\n\r\n").encode() + sample_wav.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    status, resp_headers, data = server.request(
        "POST", "/chat", form, {"Content-Type": f"multipart/form-data; boundary={boundary}", **headers})
    assert status == 403 and resp_headers["Content-Type"] == "application/json"
    assert "allow" in _error(data)


@pytest.mark.parametrize("origin", ["http://127.0.0.1:8501", "http://localhost:7860", "http://[::1]:8501"])
def test_loopback_pages_are_served(server, origin):
    status, _, data = server.request("POST", "/chat", b"not audio", {"Content-Type": "audio/wav", "Origin": origin})
    assert status == 400 and "could not decode" in _error(data)  # past the origin check


def test_api_key_and_allowed_names(guarded):
    bad = {"Content-Type": "audio/wav"}
    assert guarded.get("/health")[0] == 200  # open for monitoring
    for method, path in (("POST", "/chat"), ("GET", "/metrics"), ("GET", "/requests/x")):
        status, headers, data = guarded.request(method, path, b"x" if method == "POST" else None, bad)
        assert status == 401 and "API key" in _error(data)
        assert {k.lower(): v for k, v in headers.items()}["www-authenticate"] == "Bearer"
    wrong = guarded.request("POST", "/chat", b"x", {**bad, "Authorization": "Bearer nope"})
    assert wrong[0] == 401
    for extra, path in (({"Authorization": f"Bearer {API_KEY}"}, "/chat"), ({}, f"/chat?api_key={API_KEY}"),
                        ({"Authorization": f"Bearer {API_KEY}", "Origin": "https://omni.example.org"}, "/chat"),
                        ({"Authorization": f"Bearer {API_KEY}", "Host": "omni.lan"}, "/chat")):
        status, _, data = guarded.request("POST", path, b"not audio", {**bad, **extra})
        assert status == 400 and "could not decode" in _error(data)
    assert guarded.get_json("/health")["status"] == "ready"


# 7. The smaller defects.
def _silent_wav_b64() -> str:
    import io

    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(b"\0\0" * SAMPLE_RATE)
    return base64.b64encode(out.getvalue()).decode()


def _wrapped(b64: str) -> str:
    return "\r\n".join(b64[i:i + 76] for i in range(0, len(b64), 76))


SMALL = [
    ("audio null", json.dumps({"audio": None}).encode(), 400, "required"),
    ("deeply nested", b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    ("nested object", b'{"audio": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "nested too deeply"),
    ("base64 in lines", json.dumps({"audio": _wrapped(_silent_wav_b64())}).encode(), 400, "silent"),
    ("data URL", json.dumps({"audio": "data:audio/wav;base64," + _silent_wav_b64()}).encode(), 400, "silent"),
    ("data URL not base64", json.dumps({"audio": "data:audio/wav,RIFF"}).encode(), 400, "data URL"),
    ("NaN samples", json.dumps({"audio": base64.b64encode(_float_wav(
        np.where(np.arange(SAMPLE_RATE) % 7 == 0, np.nan, 0.3).astype(np.float32))).decode()}).encode(), 400, "NaN"),
]


@pytest.mark.parametrize("name, body, status, message", SMALL, ids=[s[0] for s in SMALL])
def test_small_defects_get_a_clear_400(server, name, body, status, message):
    got, headers, data = server.request("POST", "/chat", body, {"Content-Type": "application/json"})
    assert got == status and headers["Content-Type"] == "application/json" and message in _error(data)


def test_errors_carry_no_server_paths(server):
    status, _, data = server.request("POST", "/chat", b"hello, I am text", {"Content-Type": "audio/wav"})
    assert status == 400 and str(server.tmpdir) not in _error(data) and "/" not in _error(data)


@pytest.mark.parametrize("length", [10_000, 100_000])
def test_long_paths_are_not_echoed(server, length):
    status, _, data = server.get("/requests/" + "a" * length)
    assert status in (400, 404, 431) and len(data) < 1000  # uvicorn answers 400 past its header limit


def test_non_loopback_bind_prints_a_warning(caplog):
    from serving.cli import parse_args, warn_if_exposed

    log = logging.getLogger("test.exposed")
    with caplog.at_level(logging.WARNING, logger="test.exposed"):
        warn_if_exposed(parse_args(["--host", "127.0.0.1"]), log)
        warn_if_exposed(parse_args(["--host", "::1"]), log)
        assert caplog.records == []
        warn_if_exposed(parse_args(["--host", "0.0.0.0"]), log)
    assert "anyone who can reach" in caplog.text and "--api-key" in caplog.text


def test_start_sweeps_temporary_files_of_a_killed_server(tiny_ckpt, tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / "tmp").mkdir()
    stale = tmp_path / "tmp" / f"{TEMP_PREFIX}{gone.pid}-x1"
    stale.mkdir()
    (stale / "input").write_bytes(b"\0" * 1000)
    srv = Server(tiny_ckpt, tmp_path / "tmp")
    try:
        assert not stale.exists()
    finally:
        srv.stop()


@pytest.mark.parametrize("name, content", [
    ("malformed YAML", b"n_layer: [1, 2\nn_embd: {"),
    ("not UTF-8", b"n_layer: \xff\xfe\n"),
    ("wrong type", b"n_layer: many\n"),
])
def test_broken_checkpoint_ends_the_cli_with_one_line(tmp_path, name, content):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model_config.yaml").write_bytes(content)
    run = subprocess.run([sys.executable, str(ROOT / "inference.py"), "--ckpt-dir", str(ckpt), "--task", "T1T2",
                          "--text", "hi"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: ") and "model_config.yaml" in run.stderr


def test_checkpoint_path_that_is_a_file_ends_the_cli_with_one_line(tmp_path):
    not_a_dir = tmp_path / "ckpt"
    not_a_dir.write_text("x")
    run = subprocess.run([sys.executable, str(ROOT / "inference.py"), "--ckpt-dir", str(not_a_dir), "--task", "T1T2",
                          "--text", "hi"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 1 and run.stderr.count("\n") == 1 and run.stderr.startswith("error: ")


# The load test: honest clients while hostile uploads run.
def test_honest_clients_are_served_while_hostile_uploads_run(server, sample_wav, tmp_path):
    listener = Listener()
    long_flac = _long_flac(tmp_path / "long.flac", hours=1)
    hostile = [_playlist(str(sample_wav.resolve())), _playlist(f"http://127.0.0.1:{listener.port}/s.ts", ended=False),
               long_flac, b"[" * 100_000, _float_wav(np.full(SAMPLE_RATE, np.nan, np.float32)), b"\0" * 4096]
    before = _rss_peak_kb(server)
    honest, bad = [], []

    def ask():
        honest.append(_post(server, sample_wav.read_bytes(), max_tokens=MAX)[0])

    def attack(upload):
        bad.append(server.request("POST", "/chat", upload, {"Content-Type": "audio/wav"})[0])

    threads = [threading.Thread(target=attack, args=(u,)) for u in hostile]
    threads += [threading.Thread(target=ask) for _ in range(HONEST)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert not any(t.is_alive() for t in threads)
        assert listener.accepted == []
    finally:
        listener.close()
    assert len(bad) == len(hostile) and set(bad) <= {400, 503}
    assert len(honest) == HONEST and set(honest) <= {200, 503}  # answered, or refused while the queue was full
    assert _rss_peak_kb(server) - before < RSS_GROWTH_MB * 1024
    assert _temp_left(server) == []
    assert server.get_json("/health")["busy"] is False
    assert _post(server, sample_wav.read_bytes(), max_tokens=MAX)[0] == 200  # and it still serves


def test_page_client_sends_the_api_key(guarded, monkeypatch):
    from webui.client import OmniClient, ServerError

    url = f"http://127.0.0.1:{guarded.port}"
    monkeypatch.delenv("MINI_OMNI_API_KEY", raising=False)
    with pytest.raises(ServerError, match="API key"):
        list(OmniClient(url).ask(b"not audio"))
    monkeypatch.setenv("MINI_OMNI_API_KEY", API_KEY)
    with pytest.raises(ServerError, match="could not decode"):  # past the key check
        list(OmniClient(url).ask(b"not audio"))


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header says `width` x `height` (its data is a 1 x 1 image's): only the header is honest."""
    import io
    import struct
    import zlib

    from PIL import Image
    out = io.BytesIO()
    Image.new("L", (1, 1)).save(out, format="PNG")
    data = out.getvalue()
    ihdr = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]


def test_image_pixels_are_bounded_from_the_header_before_decoding():
    from omni.errors import ImageInputError
    from omni.image import MAX_DECODED_PIXELS, open_image
    side = 12_000  # 144 MP, the PNG: under PIL's own bomb limit, over ours
    assert side * side > MAX_DECODED_PIXELS
    with pytest.raises(ImageInputError, match="MAX_DECODED_PIXELS") as refused:
        open_image(_png_claiming(side, side))
    assert f"{side} x {side}" in str(refused.value)
    with pytest.raises(ImageInputError, match="corrupt or truncated"):  # within the bound: decoded, and found short
        open_image(_png_claiming(400, 300))


def test_channels_first_stereo_is_refused_naming_its_shape(engine):
    from omni.errors import AudioInputError
    stereo = (np.random.default_rng(0).standard_normal((2, SAMPLE_RATE)) * 0.3).astype(np.float32)
    with pytest.raises(AudioInputError, match=r"\(2, 16000\).*channels-first"):
        engine.stream(stereo, sample_rate=SAMPLE_RATE)
    assert engine.run(stereo.T, sample_rate=SAMPLE_RATE, max_tokens=60).text is not None  # (N, 2) is taken


def _as_unprivileged(command: list[str]) -> list[str]:
    """`command` run so that file permissions hold: root ignores them unless it drops its override capabilities."""
    if os.geteuid() != 0:
        return command
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("runs as root, and setpriv is missing to drop the capability of reading any file")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", *command]


def test_an_unreadable_checkpoint_directory_is_named(tiny_ckpt, tmp_path):
    locked = tmp_path / "locked"
    shutil.copytree(tiny_ckpt, locked)
    locked.chmod(0)
    try:
        api = subprocess.run(_as_unprivileged([
            sys.executable, "-c", "from omni_engine import OmniEngine\nfrom omni.errors import CheckpointError\n"
            f"try:\n    OmniEngine({str(locked)!r}, device='cpu')\nexcept CheckpointError as e:\n    print(e)"]),
            capture_output=True, text=True, cwd=ROOT, timeout=120)
        if (api.returncode == 0 and not api.stdout) or api.stderr.startswith("setpriv"):
            pytest.skip("this user reads a directory without permissions (capabilities could not be dropped)")
        cli = subprocess.run(_as_unprivileged([sys.executable, str(ROOT / "inference.py"), "--ckpt-dir", str(locked),
                                               "--task", "T1T2", "--text", "hi"]),
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
    finally:
        locked.chmod(0o755)
    assert f"cannot read checkpoint directory {locked}" in api.stdout, api.stdout + api.stderr
    assert cli.returncode == 1 and cli.stderr.count("\n") == 1, cli.stderr
    assert cli.stderr.startswith(f"error: cannot read checkpoint directory {locked}") and "Errno" not in cli.stderr


@pytest.mark.parametrize("where, status", [("line", 414), ("header", 431)])
def test_a_huge_request_head_gets_a_json_answer_not_a_reset(server, where, status):
    import requests

    from serving.cli import MAX_HEADER_BYTES
    huge = "a" * 300_000  # the request line
    url = f"http://127.0.0.1:{server.port}/requests/" + (huge if where == "line" else "x")
    response = requests.get(url, headers={"X-Padding": huge} if where == "header" else {}, timeout=60)
    assert response.status_code == status and response.headers["Content-Type"] == "application/json"
    assert str(MAX_HEADER_BYTES) in response.json()["error"]
    assert server.get("/health")[0] == 200
