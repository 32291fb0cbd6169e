"""The server's ASGI application around one engine, built the same way for both hosts: uvicorn
(`python server.py`) and a Ray Serve replica (`serving/ray_app.py`).

    service = EngineService(load, max_queue); service.start()
    app = asgi_app(service, policy, max_bytes, max_sessions, idle_timeout_s)
"""
from __future__ import annotations

from .app import create_app
from .asgi import AsgiApp, WsgiBridge, combine
from .openai_errors import reshape_bridge_errors
from .realtime.transport import RealtimeEndpoint
from .security import AccessPolicy
from .service import EngineService

DEFAULT_MAX_QUEUE = 4  # requests that may wait behind the running ones (--max-queue)
THREADS_BESIDE_QUEUE = 3  # /health, /metrics and a spare beside the admitted (running and waiting) requests


def policy_check(policy: AccessPolicy):
    """The WebSocket handshake's check: the same Host, Origin and API-key rules as the HTTP routes."""
    def check(environ: dict) -> tuple[int, str] | None:
        refusal = policy.refusal(environ)
        return None if refusal is None else (refusal.status, refusal.message)
    return check


def asgi_app(service: EngineService, policy: AccessPolicy, max_bytes: int, max_sessions: int,
             idle_timeout_s: float) -> AsgiApp:
    """`/v1/realtime` (WebSocket) and the Flask routes on one ASGI app, both admitted through `service`."""
    # A thread for every request the service admits (the engine's batch and the queue behind it), and spares.
    http = WsgiBridge(create_app(service, max_bytes, policy), max_bytes,
                      lambda: service.capacity + THREADS_BESIDE_QUEUE)
    http = reshape_bridge_errors(http)  # its own refusals (a body over --max-bytes) in OpenAI's shape on /v1/
    realtime = RealtimeEndpoint(service, max_sessions, access=policy_check(policy), idle_timeout_s=idle_timeout_s)
    return combine(http, {"/v1/realtime": realtime})
