"""Serve the engine: `POST /chat` streams the spoken answer as it is generated, and `/v1/realtime` speaks
the OpenAI Realtime protocol over a WebSocket, on the same host and port.

    python server.py [--ckpt-dir DIR] [--host 127.0.0.1] [--port 60808] [--device auto] [--max-queue 4]
                     [--max-sessions 4]
"""
from __future__ import annotations

import argparse
import logging

from serving.app import DEFAULT_MAX_BYTES, create_app
from serving.asgi import WsgiBridge, combine
from serving.realtime_ws import DEFAULT_MAX_SESSIONS, RealtimeEndpoint
from serving.service import EngineService

THREADS_BESIDE_QUEUE = 4  # the running request, /health, /metrics and a spare beside the waiting ones
CONNECTION_LIMIT = 100  # open connections beyond which uvicorn answers 503
WS_MAX_FRAME = 8 * 1024 * 1024  # largest WebSocket message: 30 s of pcm16 24 kHz is 1.4 MB, 1.9 MB in base64


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
    p.add_argument("--max-sessions", type=int, default=DEFAULT_MAX_SESSIONS,
                   help="open /v1/realtime sessions at most; more are refused at the handshake")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from omni_engine import OmniEngine

    service = EngineService(lambda: OmniEngine(args.ckpt_dir, device=args.device, mode=args.mode), args.max_queue)
    service.start()
    http = WsgiBridge(create_app(service, args.max_bytes), args.max_bytes, args.max_queue + THREADS_BESIDE_QUEUE)
    app = combine(http, {"/v1/realtime": RealtimeEndpoint(service, args.max_sessions)})
    logging.getLogger("omni.server").info("listening on http://%s:%d (WebSocket: ws://%s:%d/v1/realtime)",
                                          args.host, args.port, args.host, args.port)
    # uvicorn: one asyncio loop for all sockets (HTTP and WebSocket); Flask runs on the bridge's threads.
    uvicorn.run(app, host=args.host, port=args.port, ws="websockets-sansio", ws_max_size=WS_MAX_FRAME,
                ws_per_message_deflate=False, lifespan="off", limit_concurrency=CONNECTION_LIMIT,
                server_header=False, headers=[("server", "mini-omni")], log_config=None, access_log=False)


if __name__ == "__main__":
    main()
