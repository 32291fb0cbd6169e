"""A tiny HTTP client for the server tests (stdlib only), plus helpers to start a server process."""
from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python server.py` as a user starts it, on a free loopback port; in exact mode, whose answers the tests
    compare with the `engine` fixture's (`mode="auto"`: the server's default, measured at load)."""

    def __init__(self, ckpt: Path, tmpdir: Path, *extra: str, mode: str = "exact", command: tuple[str, ...] = (),
                 cwd: Path = ROOT, tls: ssl.SSLContext | None = None) -> None:
        """`command` starts another server program (an installed `mini-omni-server`), run in `cwd`; `tls` is
        the client's context for a server started with --ssl-certfile (requests go over HTTPS)."""
        self.port = free_port()
        self.tls = tls
        self.tmpdir = tmpdir
        env = {**os.environ, "TMPDIR": str(tmpdir)}
        self.log = open(tmpdir.parent / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen(
            [*(command or (sys.executable, str(ROOT / "server.py"))), "--ckpt-dir", str(ckpt), "--port", str(self.port),
             "--device", "cpu", "--mode", mode, *extra], cwd=cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            assert self.proc.poll() is None, "server exited during start-up"
            time.sleep(0.2)
        raise TimeoutError("server did not become ready")

    def connect(self) -> http.client.HTTPConnection:
        if self.tls is not None:
            return http.client.HTTPSConnection("127.0.0.1", self.port, timeout=120, context=self.tls)
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = self.connect()
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, dict(resp.getheaders()), data

    def get(self, path: str):
        return self.request("GET", path)

    def get_json(self, path: str) -> dict:
        return json.loads(self.get(path)[2])

    def record(self, headers: dict) -> dict:
        """The server's record of an answer, read with the id and token of its response headers."""
        return json.loads(self.request("GET", f"/requests/{headers['X-Request-Id']}", None,
                                       {"X-Request-Token": headers["X-Request-Token"]})[2])

    def open_chat(self, audio: bytes, path: str = "/chat", **fields) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Start an official JSON request and return the unread streaming response."""
        conn = self.connect()
        body = json.dumps({"audio": base64.b64encode(audio).decode(), **fields})
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        return conn, conn.getresponse()

    def chat(self, audio: bytes, path: str = "/chat", **fields):
        conn, resp = self.open_chat(audio, path, **fields)
        data = resp.read()
        conn.close()
        return resp.status, dict(resp.getheaders()), data

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()
