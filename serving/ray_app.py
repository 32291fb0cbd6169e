"""The server as a Ray Serve application: replicas of one deployment, each loading one engine and serving
the same ASGI app as `python server.py` (`/chat`, `/v1/realtime`, `/health`, `/metrics`, the OpenAI
routes) behind Ray's proxy. Needs the `ray` extra (`pip install .[ray]`); docs/scale-out.md says how to run it.

    serve run deploy/serve.yaml
    serve run serving.ray_app:build_app ckpt_dir=checkpoint num_replicas=2

`build_app(args)` takes the server's flags (snake_case: `ckpt_dir`, `mode`, `max_batch`, `max_queue`,
`max_sessions`, `api_key`, `allow_origin`, ...) and the deployment's scale (`num_replicas`, or
`min_replicas`/`max_replicas` to autoscale, `num_cpus`, `num_gpus`, `max_queued_requests`). The address
is Ray's (`http_options` of the config file, loopback by default), not `--host`/`--port`.

Each replica admits requests as the server does (the engine's batch, then `max_queue` waiting, then 503);
Ray sends a replica at most that many requests plus its Realtime sessions (`max_ongoing_requests`) and
keeps the rest in the proxy's queue (`max_queued_requests`, 503 beyond it). Ray started with
`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serving.ray_app:proxy_middlewares` gives its proxy `CloseLostSessions`:
a Realtime session whose replica died is closed with a code and a reason instead of dropped.
"""
from __future__ import annotations

import logging
import os
import threading
from types import UnionType
from dataclasses import asdict, dataclass, field, fields
from typing import get_args, get_origin, get_type_hints

from ray import serve
from ray.serve import Application
from ray.serve.metrics import Gauge
from starlette.middleware import Middleware

from omni import AUTO_MODE, DEFAULT_MAX_BATCH, OmniEngine
from .app import DEFAULT_MAX_BYTES
from .asgi import AsgiApp, Receive, Scope, Send
from .realtime.transport import DEFAULT_IDLE_TIMEOUT_S, DEFAULT_MAX_SESSIONS
from .security import API_KEY_ENV, AccessPolicy
from .service import EngineService
from .stack import DEFAULT_MAX_QUEUE, asgi_app

log = logging.getLogger("omni.ray")

REPLICA_HEADER = b"x-omni-replica"  # names the replica (its Ray actor) that answered a request or session
HEALTH_CHECK_PERIOD_S = 5.0  # how often Ray asks a replica whether its engine is ready
HEALTH_CHECK_TIMEOUT_S = 30.0  # a replica that does not answer within this is unhealthy
METRICS_PERIOD_S = 5.0  # how often a replica copies its Prometheus metrics into Ray's metrics export
METRIC_PREFIX = "omni_"  # the families copied (the process_* ones Ray reports itself, per worker)
DEFAULT_MAX_QUEUED = 16  # requests Ray's proxy holds while every replica is full; 503 beyond
# Ray's proxy wraps its ASGI app in the middlewares this environment variable's function returns (read by each
# proxy when it starts, so it is set where Ray starts: `ray start`, `serve run`).
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "serving.ray_app:proxy_middlewares"
REPLICA_LOST_CODE = 1011  # WebSocket "internal error": the server could not go on with the session
REPLICA_LOST_REASON = "the replica serving this session stopped; open a new session"


@dataclass(frozen=True)
class ServerOptions:
    """`python server.py`'s flags that shape one replica (their defaults, their meaning)."""

    ckpt_dir: str = "checkpoint"
    device: str = "auto"
    mode: str = AUTO_MODE
    max_batch: int | None = None
    max_queue: int = DEFAULT_MAX_QUEUE
    max_bytes: int = DEFAULT_MAX_BYTES
    max_sessions: int = DEFAULT_MAX_SESSIONS
    realtime_admission: bool = True  # False: --no-realtime-admission
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S
    api_key: str | None = None  # default: $MINI_OMNI_API_KEY on the replica's machine
    allow_origin: tuple[str, ...] = ()
    allow_host: tuple[str, ...] = ()


@dataclass(frozen=True)
class ScaleOptions:
    """How many replicas, and what each one holds. `num_replicas` fixes the count; else Ray autoscales
    between `min_replicas` and `max_replicas` on the requests each replica has in flight."""

    num_replicas: int | None = None
    min_replicas: int = 1
    max_replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_queued_requests: int = DEFAULT_MAX_QUEUED
    extra: dict = field(default_factory=dict)  # any other deployment option, passed to Ray as is


def split_options(args: dict) -> tuple[ServerOptions, ScaleOptions]:
    """The builder's arguments (the config file's `args:`) as server and scale options; a key that is
    neither is refused by name."""
    server_keys, scale_keys = {f.name for f in fields(ServerOptions)}, {f.name for f in fields(ScaleOptions)}
    unknown = sorted(set(args) - server_keys - scale_keys)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; the server's are {sorted(server_keys)}, the deployment's "
                         f"{sorted(scale_keys)}")
    server = {k: _typed(ServerOptions, k, v) for k, v in args.items() if k in server_keys}
    scale = ScaleOptions(**{k: _typed(ScaleOptions, k, v) for k, v in args.items() if k in scale_keys})
    if scale.num_replicas is None and not 1 <= scale.min_replicas <= scale.max_replicas:
        raise ValueError(f"autoscaling needs 1 <= min_replicas <= max_replicas, got {scale.min_replicas} and "
                         f"{scale.max_replicas}")
    return ServerOptions(**server), scale


def _typed(options: type, name: str, value: object) -> object:
    """`value` as the field's type: `serve run ... key=value` gives strings, a config file YAML's types."""
    hint = get_type_hints(options)[name]
    if isinstance(hint, UnionType):  # `int | None`: the int
        hint = next(t for t in get_args(hint) if t is not type(None))
    if get_origin(hint) is tuple:
        return tuple(value.split(",")) if isinstance(value, str) else tuple(value)
    if isinstance(value, str) and hint in (int, float):
        return hint(value)
    if isinstance(value, str) and hint is bool:
        if value.lower() not in ("true", "false"):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value.lower() == "true"
    return value


def deployment_options(server: ServerOptions, scale: ScaleOptions) -> dict:
    """Ray's options for the deployment, from the engine's admission: a replica runs `max_batch` answers
    and queues `max_queue`; its Realtime sessions hold a request each for their whole life."""
    max_batch = server.max_batch or DEFAULT_MAX_BATCH["cuda" if scale.num_gpus else "cpu"]
    options = {
        "max_ongoing_requests": max_batch + server.max_queue + server.max_sessions,
        "max_queued_requests": scale.max_queued_requests,
        "ray_actor_options": {"num_cpus": scale.num_cpus, "num_gpus": scale.num_gpus},
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
    }
    if scale.num_replicas is not None:
        options["num_replicas"] = scale.num_replicas
    else:  # a replica is busy when its batch is full: then add one, up to max_replicas
        options["autoscaling_config"] = {"min_replicas": scale.min_replicas, "max_replicas": scale.max_replicas,
                                         "target_ongoing_requests": max_batch}
    return {**options, **scale.extra}


def build_app(args: dict) -> Application:
    """`serve run`'s application builder: `import_path: serving.ray_app:build_app` with `args:`."""
    server, scale = split_options(args)
    return OmniReplica.options(**deployment_options(server, scale)).bind(asdict(server))


def with_replica_header(app: AsgiApp, replica: str) -> AsgiApp:
    """`app`, naming the replica in every HTTP response and WebSocket handshake (which replica answered)."""
    async def tagged(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_tagged(message: dict) -> None:
            if message["type"] in ("http.response.start", "websocket.accept"):
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER, replica.encode())]}
            await send(message)
        await app(scope, receive, send_tagged)
    return tagged


class CloseLostSessions:
    """Ray's proxy, around its own ASGI app: a WebSocket session whose replica died gets a close frame with a
    code and reason. Without it the proxy drops the connection bare (the client sees 1006, no reason): a dead
    replica sends no close, and the proxy sends none for it. A session closed by either end is left alone."""

    def __init__(self, app: AsgiApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        seen: set[str] = set()

        async def watched_receive() -> dict:
            message = await receive()
            seen.add(message["type"])
            return message

        async def watched_send(message: dict) -> None:
            seen.add(message["type"])
            await send(message)

        await self.app(scope, watched_receive, watched_send)
        if "websocket.accept" in seen and not seen & {"websocket.close", "websocket.disconnect"}:
            await send({"type": "websocket.close", "code": REPLICA_LOST_CODE, "reason": REPLICA_LOST_REASON})


def proxy_middlewares() -> list[Middleware]:
    """The proxy's middlewares (`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serving.ray_app:proxy_middlewares`)."""
    return [Middleware(CloseLostSessions)]


class MetricsMirror:
    """Copies a replica's Prometheus samples into Ray's metrics (tagged with the replica by Ray Serve), so
    one scrape of each node's Ray metrics port reads every replica's figures; counters and histogram
    buckets arrive as gauges of their running totals."""

    def __init__(self, registry, period_s: float = METRICS_PERIOD_S) -> None:
        self.registry, self.period_s = registry, period_s
        self.gauges: dict[str, Gauge] = {}
        self.stop = threading.Event()
        threading.Thread(target=self._run, name="metrics-mirror", daemon=True).start()

    def _run(self) -> None:
        while not self.stop.wait(self.period_s):
            self.copy()

    def copy(self) -> None:
        for family in self.registry.collect():
            if not family.name.startswith(METRIC_PREFIX):
                continue
            for sample in family.samples:
                gauge = self.gauges.get(sample.name)
                if gauge is None:
                    gauge = self.gauges[sample.name] = Gauge(sample.name, family.documentation,
                                                             tag_keys=tuple(sorted(sample.labels)))
                gauge.set(sample.value, tags=sample.labels)


@serve.deployment(name="mini-omni")
@serve.ingress()
class OmniReplica:
    """One engine and the server's ASGI app around it."""

    def __init__(self, options: dict) -> None:
        opts = ServerOptions(**options)
        self.service = EngineService(lambda: OmniEngine(opts.ckpt_dir, device=opts.device, mode=opts.mode,
                                                        max_batch=opts.max_batch), opts.max_queue,
                                     opts.realtime_admission)
        # Served only once loaded: a failed load is not raised here but reported by check_health, which
        # keeps the replica out of routing and tells `serve status` why.
        self.service.start().result()
        policy = AccessPolicy(opts.api_key or os.environ.get(API_KEY_ENV), frozenset(opts.allow_origin),
                              frozenset(opts.allow_host))
        replica = serve.get_replica_context().replica_id.to_full_id_str()
        self.asgi = with_replica_header(asgi_app(self.service, policy, opts.max_bytes, opts.max_sessions,
                                                opts.idle_timeout), replica)
        self.metrics = MetricsMirror(self.service.metrics.registry)

    def __serve_build_asgi_app__(self) -> AsgiApp:
        return self.asgi

    def check_health(self) -> None:
        """Ray's health check: the engine's readiness (a failed load names its error)."""
        if self.service.engine is None:
            raise RuntimeError(f"the engine is {self.service.status}: {self.service.load_error or 'not loaded'}")
