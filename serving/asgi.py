"""One port for everything: the Flask routes (through a small WSGI bridge) and the `/v1/realtime` WebSocket.

The server is uvicorn, an ASGI server that runs on Linux, macOS and Windows and speaks WebSocket itself.
Flask stays a WSGI application: the bridge below runs each request on a bounded thread pool, passes the
body in (refusing one over `max_bytes` before reading it all), streams the response back chunk by chunk
with the socket's back-pressure, and tells the application when the client hangs up through
`environ["omni.client_disconnected"]`, so an answer nobody reads stops within one decode step.
"""
from __future__ import annotations

import asyncio
import io
import json
import sys
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]
DISCONNECTED_KEY = "omni.client_disconnected"  # environ key: a callable, True once the client has gone


def wsgi_environ(scope: Scope, body: bytes) -> dict[str, Any]:
    """The WSGI environ of an ASGI `http` (or `websocket`) scope, as PEP 3333 spells it."""
    server = scope.get("server") or ("127.0.0.1", 80)
    client = scope.get("client") or ("", 0)
    environ = {
        "REQUEST_METHOD": scope.get("method", "GET"),
        "SCRIPT_NAME": scope.get("root_path", "").encode().decode("latin-1"),
        "PATH_INFO": scope["path"].encode().decode("latin-1"),
        "QUERY_STRING": scope.get("query_string", b"").decode("latin-1"),
        "SERVER_NAME": str(server[0]), "SERVER_PORT": str(server[1]),
        "REMOTE_ADDR": str(client[0]), "REMOTE_PORT": str(client[1]),
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "wsgi.version": (1, 0), "wsgi.url_scheme": scope.get("scheme", "http").replace("ws", "http"),
        "wsgi.input": io.BytesIO(body), "wsgi.input_terminated": True, "wsgi.errors": sys.stderr,
        "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
    }
    for raw_name, raw_value in scope.get("headers", []):
        name, value = raw_name.decode("latin-1").upper().replace("-", "_"), raw_value.decode("latin-1")
        if name in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            environ[name] = value
            continue
        key = f"HTTP_{name}"
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ


async def send_json(send: Send, status: int, body: dict, kind: str = "http", close: bool = False,
                    extra_headers: dict[str, str] | None = None) -> None:
    """A whole JSON response; `kind="websocket"` refuses a WebSocket handshake with it; `close` ends the
    connection after it (the rest of an unread body is not read)."""
    data = json.dumps(body).encode()
    headers = [(b"Content-Type", b"application/json"), (b"Content-Length", str(len(data)).encode())]
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (extra_headers or {}).items()]
    if close:
        headers.append((b"Connection", b"close"))
    prefix = "websocket.http" if kind == "websocket" else "http"
    await send({"type": f"{prefix}.response.start", "status": status, "headers": headers})
    await send({"type": f"{prefix}.response.body", "body": data})


class WsgiBridge:
    """Serve a WSGI app under ASGI: a bounded pool of threads, streamed bodies, hang-up detection.

    `threads()` says how many requests may run at once; the server's grows once when its engine has
    loaded (the running requests then come from the engine's batch size), and the pool follows it.
    """

    def __init__(self, app: Callable, max_bytes: int, threads: Callable[[], int]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.threads = threads
        self.size = threads()
        self.pool = ThreadPoolExecutor(max_workers=self.size, thread_name_prefix="http")

    def _current_pool(self) -> ThreadPoolExecutor:
        """The pool, replaced when `threads()` has changed (runs on the event loop's thread only, so no
        request is handed to a pool being shut down); the old one's threads finish their requests."""
        if (size := self.threads()) != self.size:
            old, self.size = self.pool, size
            self.pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="http")
            old.shutdown(wait=False)
        return self.pool

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await self._read_body(scope, receive)
        if body is None:
            await send_json(send, 413, {"error": f"Request Entity Too Large: the body exceeds {self.max_bytes} "
                                                 "bytes (--max-bytes)"}, close=True)
            return
        gone = threading.Event()
        watcher = asyncio.create_task(self._watch(receive, gone))
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._current_pool(), self._run, scope, body, send, loop, gone)
        finally:  # also on server shutdown: the thread then stops its answer at the next decode step
            gone.set()
            watcher.cancel()

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole request body, or None (without reading on) once it is over the limit."""
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                return None
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.max_bytes:
                return None
            if not message.get("more_body", False):
                break
        return b"".join(parts)

    @staticmethod
    async def _watch(receive: Receive, gone: threading.Event) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()

    def _run(self, scope: Scope, body: bytes, send: Send, loop: asyncio.AbstractEventLoop,
             gone: threading.Event) -> None:
        """On a pool thread: call the app and push its body to the client as it is produced."""
        def push(message: dict) -> None:
            asyncio.run_coroutine_threadsafe(send(message), loop).result()

        started: list[dict] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc_info=None):
            started[:] = [{"type": "http.response.start", "status": int(status.split(" ", 1)[0]),
                           "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]}]
            return lambda data: push({"type": "http.response.body", "body": data, "more_body": True})

        environ = wsgi_environ(scope, body)
        environ[DISCONNECTED_KEY] = gone.is_set
        result = self.app(environ, start_response)
        try:
            head_sent = False
            for data in result:
                if gone.is_set():
                    break
                if not head_sent:
                    push(started[0])
                    head_sent = True
                if data:
                    push({"type": "http.response.body", "body": data, "more_body": True})
            if not gone.is_set():
                if not head_sent:
                    push(started[0])
                push({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if hasattr(result, "close"):
                result.close()  # runs the app's call_on_close hooks: the answer's turn is released


def combine(http: AsgiApp, websockets: dict[str, AsgiApp]) -> AsgiApp:
    """The server's ASGI app: WebSocket routes by path, HTTP requests to `http`. There is no lifespan
    scope: server.py runs uvicorn with `lifespan="off"` (the engine loads in the background instead)."""
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await http(scope, receive, send)
        elif scope["type"] == "websocket":
            route = websockets.get(scope["path"].rstrip("/"))
            if route is None:
                await receive()  # websocket.connect
                await send_json(send, 404, {"error": f"no WebSocket route {scope['path']!r}; "
                                                     f"try {sorted(websockets)}"}, kind="websocket")
                return
            await route(scope, receive, send)
    return app
