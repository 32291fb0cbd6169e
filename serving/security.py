"""Who may use the server: the Host names that are this server's, the browser origins allowed to call it,
and the optional API key.

Any web page open in the user's browser can send requests to a server on this machine. Two checks stop it:
- Origin: browsers name the page's origin on every cross-origin request (and on every POST or WebSocket
  handshake); only loopback origins (the project's own pages), the server's own origin and the origins given
  with `--allow-origin` are served. A request without Origin does not come from a web page (curl, the SDK).
- Host: a page on a rebinding domain (a DNS name that first resolves to the attacker, then to 127.0.0.1)
  calls the server with its own name in Host. Only IP literals, `localhost`, this machine's names and the
  names given with `--allow-host` are served: a rebinding domain is none of them.
"""
from __future__ import annotations

import hmac
import ipaddress
import logging
import re
import socket
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

ANY_ORIGIN = "*"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WEBSOCKET_KEY_PREFIX = "openai-insecure-api-key."  # the key as a WebSocket subprotocol (browser clients)
KEY_QUERY_PARAMETER = "api_key"  # the key in the URL, for clients that cannot set headers
API_KEY_ENV = "MINI_OMNI_API_KEY"  # the key from the environment (server and pages) keeps it out of `ps`
# A query string's values in a log line: uvicorn logs each WebSocket's path with its query, and a key may be
# given there under any spelling parse_qs decodes (api%5Fkey=...), so every value is blanked, not only api_key's.
_QUERY_VALUE = re.compile(r"([?&][^=&\s\"']*=)[^&\s\"']*")


class RedactQuery(logging.Filter):
    """Blanks the values of query strings in log records, so no `?api_key=KEY` reaches a log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = _QUERY_VALUE.sub(r"\1<redacted>", message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


@dataclass(frozen=True)
class Refusal:
    """Why a request is not served: HTTP `status` (401 or 403) and a message for the client."""

    status: int
    message: str


def _host_name(host: str) -> str:
    """'Host' header -> bare lower-case name: '[::1]:8080' -> '::1', 'LocalHost.:80' -> 'localhost'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _is_loopback(name: str) -> bool:
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def machine_names() -> frozenset[str]:
    """This machine's own host names, which a client on the network may use in Host."""
    names = {socket.gethostname(), socket.getfqdn()}
    return frozenset(n.lower().rstrip(".") for n in names if n)


def is_loopback_bind(host: str) -> bool:
    """Whether a `--host` value keeps the server on this machine only."""
    return _is_loopback(host.strip().strip("[]").lower())


@dataclass(frozen=True)
class AccessPolicy:
    """The server's rules for who may call it; `refusal(environ)` applies them to one WSGI request."""

    api_key: str | None = None
    allowed_origins: frozenset[str] = frozenset()  # beyond loopback origins; "*" allows every origin
    allowed_hosts: frozenset[str] = frozenset()  # Host names beyond IP literals, localhost and this machine's
    own_names: frozenset[str] = field(default_factory=machine_names)

    def host_allowed(self, host: str | None) -> bool:
        if not host:  # HTTP/1.0 without Host: not a browser
            return True
        name = _host_name(host)
        return (_is_ip(name) or _is_loopback(name) or name in self.own_names
                or name in {_host_name(h) for h in self.allowed_hosts})

    def origin_allowed(self, origin: str | None, host: str | None) -> bool:
        if origin is None:  # not sent by a web page
            return True
        if ANY_ORIGIN in self.allowed_origins:
            return True
        parts = urlsplit(origin.strip().lower())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return False  # "null" (sandboxed frames, file:// pages) and anything odd
        if _is_loopback(parts.hostname) or (host and parts.netloc == host.strip().lower()):
            return True
        return origin.strip().lower().rstrip("/") in {o.lower().rstrip("/") for o in self.allowed_origins}

    def key_given(self, environ: dict) -> str | None:
        auth = environ.get("HTTP_AUTHORIZATION", "")
        if auth[:7].lower() == "bearer ":
            return auth[7:].strip()
        for proto in environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL", "").split(","):
            if proto.strip().startswith(WEBSOCKET_KEY_PREFIX):
                return proto.strip().removeprefix(WEBSOCKET_KEY_PREFIX)
        values = parse_qs(environ.get("QUERY_STRING", "")).get(KEY_QUERY_PARAMETER)
        return values[0] if values else None

    def key_ok(self, environ: dict) -> bool:
        if self.api_key is None:
            return True
        given = self.key_given(environ)
        return given is not None and hmac.compare_digest(given.encode(), self.api_key.encode())

    def refusal(self, environ: dict, needs_key: bool = True) -> Refusal | None:
        """None if the request may be served, else why not. `needs_key=False` for the open routes (/health)."""
        host = environ.get("HTTP_HOST")
        if not self.host_allowed(host):
            return Refusal(403, "this server does not answer to that Host name (start it with --allow-host NAME "
                                "to add one)")
        if not self.origin_allowed(environ.get("HTTP_ORIGIN"), host):
            return Refusal(403, "requests from this web page's origin are not allowed (start the server with "
                                "--allow-origin ORIGIN to allow one)")
        if needs_key and not self.key_ok(environ):
            return Refusal(401, "a valid API key is required: send 'Authorization: Bearer <key>'")
        return None
