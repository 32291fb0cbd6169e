"""The `mini-omni-server` command (`python server.py` in a checkout). Serve the engine: `POST /chat` streams
the spoken answer as it is generated, and `/v1/realtime` speaks the OpenAI Realtime protocol over a
WebSocket, on the same host and port.

    python server.py [--ckpt-dir DIR] [--host 127.0.0.1] [--port 60808] [--device auto] [--mode auto|exact|fast|baseline]
                     [--max-batch N] [--max-queue 4] [--max-sessions 4] [--no-realtime-admission]
                     [--no-speculative-turns] [--max-bytes N] [--api-key KEY] [--allow-origin ORIGIN]
                     [--allow-host NAME] [--log-level info]
                     [--ssl-certfile CERT --ssl-keyfile KEY]

`GET /` is the talk page (`--ssl-certfile/--ssl-keyfile` serve it over HTTPS, which a browser on another host
needs before it lends the page its microphone); `--help` explains every flag (`--mode auto`, the default, is exact where
this machine keeps up with it, else fast; `--mode exact` gives the official tokens).
"""
from __future__ import annotations

import argparse
import logging
import os
import ssl

from omni import AUTO_MODE, DEFAULT_MAX_BATCH, MODE_HELP, MODE_NAMES, OmniEngine, sweep_stale_temp_dirs

from .app import DEFAULT_MAX_BYTES
from .realtime.transport import DEFAULT_IDLE_TIMEOUT_S, DEFAULT_MAX_SESSIONS
from .security import ANY_ORIGIN, API_KEY_ENV, AccessPolicy, RedactQuery, is_loopback_bind
from .service import EngineService
from .stack import DEFAULT_MAX_QUEUE, asgi_app

CONNECTION_LIMIT = 100  # open connections beyond which uvicorn answers 503
WS_MAX_FRAME = 8 * 1024 * 1024  # largest WebSocket message: 30 s of pcm16 24 kHz is 1.4 MB, 1.9 MB in base64
MAX_HEADER_BYTES = 64 * 1024  # request line and headers; a longer URL is refused
SHUTDOWN_GRACE_S = 5  # on SIGTERM, open answers and sessions get this long before they are cut
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def positive_seconds(text: str) -> float:
    """An argparse type: a number of seconds above zero."""
    seconds = float(text)
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text!r}")
    return seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Mini-Omni streaming speech server.")
    p.add_argument("--ckpt-dir", default="checkpoint", help="checkpoint directory (downloaded if it does not exist)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    p.add_argument("--port", type=int, default=60808)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--mode", default=AUTO_MODE, choices=MODE_NAMES,
                   help=f"{MODE_HELP}. Default {AUTO_MODE}: a live answer must keep up with its audio")
    p.add_argument("--max-batch", type=int, default=None,
                   help=f"requests decoded together in one batch (default: {DEFAULT_MAX_BATCH['cpu']} on CPU, "
                        f"{DEFAULT_MAX_BATCH['cuda']} on a GPU)")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="requests that may wait behind the running ones")
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="largest request body accepted")
    p.add_argument("--max-sessions", type=int, default=DEFAULT_MAX_SESSIONS,
                   help="open /v1/realtime sessions at most; more are refused at the handshake")
    p.add_argument("--no-realtime-admission", dest="realtime_admission", action="store_false",
                   help="admit by the counts above only, not also by how many answers this machine speaks at "
                        "once in real time (measured decode steps, docs/server.md)")
    p.add_argument("--no-speculative-turns", dest="speculative_turns", action="store_false",
                   help="start a /v1/realtime turn's answer only once the VAD's silence_duration_ms has passed, not "
                        "already at the first silence after speech (the same answer, heard later)")
    p.add_argument("--idle-timeout", type=positive_seconds, default=DEFAULT_IDLE_TIMEOUT_S, metavar="SECONDS",
                   help="close a /v1/realtime session after this long with no client event and no answer running")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' on every route but /health (default: ${API_KEY_ENV})")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a browser origin allowed besides loopback ones, e.g. https://omni.example.org; "
                        f"'{ANY_ORIGIN}' allows any web page (repeatable)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="a host name clients may use besides IP addresses, localhost and this machine's names "
                        "(repeatable)")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                   help="the least severe records logged, the server's and uvicorn's alike")
    p.add_argument("--ssl-certfile", metavar="CERT",
                   help="serve HTTPS and wss:// with this PEM certificate (with --ssl-keyfile): browsers lend a page "
                        "the microphone only on localhost and over HTTPS (docs/server.md shows how to make one)")
    p.add_argument("--ssl-keyfile", metavar="KEY", help="the certificate's private key, PEM, not encrypted")
    return p.parse_args(argv)


def tls_options(args: argparse.Namespace) -> dict[str, str]:
    """uvicorn's TLS options, checked before the model loads: a missing or unusable file ends the program with
    one line that names it."""
    cert, key = args.ssl_certfile, args.ssl_keyfile
    if cert is None and key is None:
        return {}
    if cert is None or key is None:
        raise SystemExit("error: HTTPS needs both --ssl-certfile CERT and --ssl-keyfile KEY")
    for flag, path in (("--ssl-certfile", cert), ("--ssl-keyfile", key)):
        if not os.path.isfile(path):
            raise SystemExit(f"error: {flag} {path}: no such file")
    try:  # the load uvicorn does at start-up; an encrypted key fails here rather than prompting for a password
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key, password=lambda: b"")
    except (ssl.SSLError, OSError) as e:
        raise SystemExit(f"error: cannot use certificate {cert} with key {key}: {e}") from None
    return {"ssl_certfile": cert, "ssl_keyfile": key}


def warn_if_exposed(args: argparse.Namespace, log: logging.Logger) -> None:
    """Say what a non-loopback bind exposes, and how to protect it."""
    if is_loopback_bind(args.host):
        return
    log.warning("listening on %s: anyone who can reach this address can use the model (/chat%s). %s",
                args.host, ", /metrics and the answers' records" if not args.api_key else "",
                "An API key is required on every route but /health." if args.api_key else
                f"Protect it with --api-key (or ${API_KEY_ENV}), a firewall, or keep --host 127.0.0.1 and use an "
                "SSH tunnel.")
    if ANY_ORIGIN in args.allow_origin:
        log.warning("--allow-origin '*': any web page the user opens may call this server")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    tls = tls_options(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # every logger's records, uvicorn's included, pass here
        handler.addFilter(RedactQuery())
    import uvicorn

    from .http11 import LimitedH11Protocol

    log = logging.getLogger("omni.server")
    if swept := sweep_stale_temp_dirs():
        log.info("removed %d temporary directories left by a stopped server", swept)
    service = EngineService(lambda: OmniEngine(args.ckpt_dir, device=args.device, mode=args.mode,
                                                     max_batch=args.max_batch), args.max_queue,
                            args.realtime_admission, args.speculative_turns)
    service.start()
    policy = AccessPolicy(args.api_key, frozenset(args.allow_origin), frozenset(args.allow_host))
    app = asgi_app(service, policy, args.max_bytes, args.max_sessions, args.idle_timeout)
    warn_if_exposed(args, log)
    http, ws = ("https", "wss") if tls else ("http", "ws")
    log.info("listening on %s://%s:%d (talk page; WebSocket: %s://%s:%d/v1/realtime)", http, args.host, args.port,
             ws, args.host, args.port)
    # uvicorn: one asyncio loop for all sockets (HTTP and WebSocket); Flask runs on the bridge's threads,
    # which also refuse a body over --max-bytes from its declared length or as soon as it passes it.
    # Our h11 protocol (it answers an over-long request line) and asyncio by name: uvicorn would otherwise pick
    # httptools and uvloop where installed (the [ray] extra installs them), and httptools ignores the header limit.
    uvicorn.run(app, host=args.host, port=args.port, http=LimitedH11Protocol, loop="asyncio",
                ws="websockets-sansio", ws_max_size=WS_MAX_FRAME,
                ws_per_message_deflate=False, lifespan="off", limit_concurrency=CONNECTION_LIMIT,
                h11_max_incomplete_event_size=MAX_HEADER_BYTES, timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
                server_header=False, **tls,
                headers=[("server", "mini-omni")], log_config=None, access_log=False)


if __name__ == "__main__":
    main()
