"""Errors of the `/v1/` HTTP routes in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

The server's other routes answer `{"error": "<message>"}`. Every refusal that reaches a `/v1/` client in
that plain shape (the access policy, a full queue, an unknown route, a body over the limit) is rewritten
into OpenAI's, so the `openai` SDK raises its own exception type (`BadRequestError`, `AuthenticationError`...)
carrying our message: in Flask after each response, and around the HTTP bridge for the refusals it makes
itself before Flask runs.
"""
from __future__ import annotations

import json

from flask import Flask, Response, jsonify, request

from .asgi import AsgiApp, Receive, Scope, Send
from .parse import ApiError

PREFIX = "/v1/"
TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
         415: "unsupported_media_type", 499: "client_closed_request", 503: "unavailable"}


class OpenAIError(ApiError):
    """A client error of a `/v1/` route, naming the request field at fault (`param`) and a `code`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message, headers)
        self.param = param
        self.code = code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code or CODES.get(status)}}


def _reshaped(body: bytes, status: int) -> bytes | None:
    """A plain `{"error": "..."}` body in OpenAI's shape; None for any other body."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("error"), str):
        return None
    return json.dumps(error_body(status, data["error"])).encode()


def install(app: Flask) -> None:
    """OpenAI's error shape for every error response on a `/v1/` path of `app`."""
    @app.errorhandler(OpenAIError)
    def openai_error(e: OpenAIError):
        return jsonify(error_body(e.status, e.message, e.param, e.code)), e.status, e.headers

    @app.after_request
    def reshape(response: Response) -> Response:
        if request.path.startswith(PREFIX) and response.status_code >= 400 and response.is_json:
            body = _reshaped(response.get_data(), response.status_code)
            if body is not None:
                response.set_data(body)
        return response


def reshape_bridge_errors(http: AsgiApp) -> AsgiApp:
    """The HTTP bridge's own refusals (a body over `--max-bytes`) in OpenAI's shape on `/v1/` paths; every
    other response passes through untouched, streamed as it comes."""
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PREFIX):
            await http(scope, receive, send)
            return
        held: list[dict] = []  # an error response's start and body, rewritten once complete

        async def reshaping_send(message: dict) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held.append(message)
                return
            if not held:
                await send(message)
                return
            held.append(message)
            if message.get("more_body", False):
                return
            await _send_reshaped(send, held)

        await http(scope, receive, reshaping_send)
    return app


async def _send_reshaped(send: Send, held: list[dict]) -> None:
    start, parts = held[0], held[1:]
    body = b"".join(part.get("body", b"") for part in parts)
    new = _reshaped(body, start["status"])
    if new is None:  # already OpenAI's shape, or not JSON: as it was
        for message in held:
            await send(message)
        return
    headers = [(k, str(len(new)).encode() if k.lower() == b"content-length" else v) for k, v in start["headers"]]
    await send({**start, "headers": headers})
    await send({"type": "http.response.body", "body": new, "more_body": False})
