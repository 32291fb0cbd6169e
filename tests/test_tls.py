"""HTTPS and wss:// with --ssl-certfile/--ssl-keyfile: a self-signed certificate made with openssl, the real
server on loopback, clients that verify against that certificate; bad files end the server with one line."""
import json
import shutil
import ssl
import subprocess
import sys

import pytest

from tests.http_client import ROOT, Server

websockets_sync = pytest.importorskip("websockets.sync.client")
if shutil.which("openssl") is None:
    pytest.skip("the TLS tests make their certificate with openssl", allow_module_level=True)

REFUSAL_TIMEOUT_S = 60  # a refused start ends before the model loads


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 and localhost (the docs' one-liner, with a quicker EC key)."""
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", d / "key.pem", "-out", d / "cert.pem", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


@pytest.fixture(scope="module")
def server(tiny_ckpt, cert, tmp_path_factory):
    # Without real-time admission: a loaded test machine's measured frame time would refuse the session.
    srv = Server(tiny_ckpt, tmp_path_factory.mktemp("tls-server-tmp"), "--ssl-certfile", str(cert[0]),
                 "--ssl-keyfile", str(cert[1]), "--no-realtime-admission",
                 tls=ssl.create_default_context(cafile=cert[0]))
    yield srv
    srv.stop()


def test_https_and_wss_verify_against_the_certificate(server, cert):
    status, _, body = server.get("/health")
    assert status == 200 and json.loads(body)["status"] == "ready"
    with websockets_sync.connect(f"wss://127.0.0.1:{server.port}/v1/realtime",
                                 ssl=ssl.create_default_context(cafile=cert[0])) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "session.created"
    log = (server.tmpdir.parent / f"server-{server.port}.log").read_text()
    assert f"https://127.0.0.1:{server.port}" in log and f"wss://127.0.0.1:{server.port}/v1/realtime" in log


def _refused(*flags: str) -> str:
    """Start the server with these flags; it must exit at once with one line on stderr, which is returned."""
    done = subprocess.run([sys.executable, str(ROOT / "server.py"), "--ckpt-dir", "/nonexistent", *flags],
                          capture_output=True, text=True, timeout=REFUSAL_TIMEOUT_S)
    assert done.returncode != 0 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    return done.stderr


def test_bad_certificate_files_are_one_line_errors(cert, tmp_path):
    assert "--ssl-certfile /nowhere/cert.pem: no such file" in _refused("--ssl-certfile", "/nowhere/cert.pem",
                                                                        "--ssl-keyfile", str(cert[1]))
    assert "needs both --ssl-certfile" in _refused("--ssl-certfile", str(cert[0]))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    assert f"cannot use certificate {garbage}" in _refused("--ssl-certfile", str(garbage), "--ssl-keyfile",
                                                          str(cert[1]))
