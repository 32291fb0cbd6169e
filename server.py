"""Serve the engine over HTTP: `POST /chat` streams the spoken answer as it is generated.

    python server.py [--ckpt-dir DIR] [--host 127.0.0.1] [--port 60808] [--device auto] [--mode exact|fast|baseline]
                     [--max-queue 4] [--max-bytes N]

`GET /` lists the routes; `--mode` is explained by `--help` (exact, the default, gives the official tokens).
"""
from __future__ import annotations

import argparse
import logging

from omni_engine import MODE_HELP
from serving.app import DEFAULT_MAX_BYTES, create_app
from serving.service import EngineService

THREADS_BESIDE_QUEUE = 4  # the running request, /health, /metrics and a spare beside the waiting ones


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Mini-Omni streaming speech server.")
    p.add_argument("--ckpt-dir", default="checkpoint", help="checkpoint directory (downloaded if it does not exist)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    p.add_argument("--port", type=int, default=60808)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--mode", default="exact", choices=["exact", "fast", "baseline"], help=MODE_HELP)
    p.add_argument("--max-queue", type=int, default=4, help="requests that may wait behind the running one")
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="largest request body accepted")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from waitress import serve

    from omni_engine import OmniEngine

    service = EngineService(lambda: OmniEngine(args.ckpt_dir, device=args.device, mode=args.mode), args.max_queue)
    service.start()
    app = create_app(service, args.max_bytes)
    logging.getLogger("omni.server").info("listening on http://%s:%d", args.host, args.port)
    # channel_request_lookahead lets waitress notice a client that hangs up while its answer streams.
    serve(app, host=args.host, port=args.port, threads=args.max_queue + THREADS_BESIDE_QUEUE,
          channel_request_lookahead=1, ident="mini-omni")


if __name__ == "__main__":
    main()
