"""Serve the engine over HTTP: `POST /chat` streams the spoken answer as it is generated.

    python server.py [--ckpt-dir DIR] [--host 127.0.0.1] [--port 60808] [--device auto] [--max-queue 4]
                     [--api-key KEY] [--allow-origin ORIGIN] [--allow-host NAME]
"""
from __future__ import annotations

import argparse
import logging
import os

from omni.audio import sweep_stale_temp_dirs
from serving.app import DEFAULT_MAX_BYTES, create_app
from serving.security import ANY_ORIGIN, API_KEY_ENV, AccessPolicy, is_loopback_bind
from serving.service import EngineService

THREADS_BESIDE_QUEUE = 4  # the running request, /health, /metrics and a spare beside the waiting ones
MAX_HEADER_BYTES = 64 * 1024  # request line and headers; a longer URL is refused by waitress


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Mini-Omni streaming speech server.")
    p.add_argument("--ckpt-dir", default="checkpoint", help="checkpoint directory (downloaded if it does not exist)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    p.add_argument("--port", type=int, default=60808)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--mode", default="exact", choices=["exact", "fast", "baseline"],
                   help="exact: the official tokens (default); fast: int8 + trimmed encoder on CPU")
    p.add_argument("--max-queue", type=int, default=4, help="requests that may wait behind the running one")
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="largest request body accepted")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' on every route but /health (default: ${API_KEY_ENV})")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a browser origin allowed besides loopback ones, e.g. https://omni.example.org; "
                        f"'{ANY_ORIGIN}' allows any web page (repeatable)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="a host name clients may use besides IP addresses, localhost and this machine's names "
                        "(repeatable)")
    return p.parse_args(argv)


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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from waitress import serve

    from omni_engine import OmniEngine

    log = logging.getLogger("omni.server")
    if swept := sweep_stale_temp_dirs():
        log.info("removed %d temporary directories left by a stopped server", swept)
    service = EngineService(lambda: OmniEngine(args.ckpt_dir, device=args.device, mode=args.mode), args.max_queue)
    service.start()
    policy = AccessPolicy(args.api_key, frozenset(args.allow_origin), frozenset(args.allow_host))
    app = create_app(service, args.max_bytes, policy)
    warn_if_exposed(args, log)
    log.info("listening on http://%s:%d", args.host, args.port)
    # channel_request_lookahead lets waitress notice a client that hangs up while its answer streams;
    # max_request_body_size answers 413 from the declared length, or as soon as a chunked body passes it.
    serve(app, host=args.host, port=args.port, threads=args.max_queue + THREADS_BESIDE_QUEUE,
          channel_request_lookahead=1, ident="mini-omni", max_request_body_size=args.max_bytes,
          max_request_header_size=MAX_HEADER_BYTES)


if __name__ == "__main__":
    main()
