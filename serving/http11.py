"""uvicorn's HTTP/1.1 protocol (h11), with one change: a request whose line or headers pass the server's limit
gets a JSON answer the client can read.

uvicorn answers it with a plain-text 400 and closes the socket at once; the client, still sending the rest of
its request, then gets a connection reset instead of the answer. Here it gets 414 (the request line alone is
too long) or 431 (the headers), with a JSON body like every other refusal, and the connection lingers, reading
and dropping what the client still sends, before it closes.
"""
from __future__ import annotations

import json

from uvicorn.protocols.http.h11_impl import H11Protocol

LINGER_S = 5.0  # how long a refused connection keeps reading (and dropping) the rest of its request
STATUS = {414: "URI Too Long", 431: "Request Header Fields Too Large"}


class LimitedH11Protocol(H11Protocol):
    """Pass it to `uvicorn.run(http=...)` with `h11_max_incomplete_event_size` as the limit."""

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        self.max_head_bytes = config.h11_max_incomplete_event_size
        self.lingering = False

    def data_received(self, data: bytes) -> None:
        if not self.lingering:
            super().data_received(data)

    def eof_received(self) -> None:
        if self.lingering:  # the client has sent all it had: the answer is out, the socket may close
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        head = self.conn.trailing_data[0]
        if self.max_head_bytes is None or len(head) <= self.max_head_bytes:
            super().send_400_response(msg)
            return
        status, what = (414, "request line") if b"\r\n" not in head[:self.max_head_bytes] else \
            (431, "request line and headers")
        body = json.dumps({"error": f"{what} over {self.max_head_bytes} bytes, the most this server reads: "
                                    "shorten the URL or send large values in the body"}).encode()
        self.logger.warning("refused a request: %s over %d bytes (%d)", what, self.max_head_bytes, status)
        self.transport.write(f"HTTP/1.1 {status} {STATUS[status]}\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        self.lingering = True
        self.transport.write_eof()  # the answer, then end of stream; reading goes on until the client is done
        self.loop.call_later(LINGER_S, self.transport.close)
