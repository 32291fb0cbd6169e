"""Gradio page: upload or record a question and hear the answer stream back from `server.py`.

    python -m webui.omni_gradio [--server-url http://127.0.0.1:60808] [--port 7860] [--max-new-tokens N]

UI only: every request goes through `webui.client`. The answer plays as its chunks arrive
(`gr.Audio(streaming=True)`), the transcript fills in below it, and the page shows the time to the
first audio and the total time. A new question or Stop ends the running answer (the server stops it too).
The server line is refreshed every few seconds. The image input appears only when the server's model can see.
"""

import argparse
import itertools
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from functools import partial
from pathlib import Path

from webui.client import Answer, OmniClient, ServerError, add_server_arguments, server_options, wav_bytes

INSTALL_HINT = "the Gradio page needs gradio: pip install gradio==6.31.0 (or the web extra: pip install .[web])"
DEFAULT_PORT = 7860
NO_QUESTION = "Upload or record a question first."
GENERATED = "Generated:"  # the status once the whole answer has arrived (the player may still be playing it)
STOPPED = "Stopped."
HEALTH_POLL_S = 5  # how often the server line is refreshed, so it says when the server stops or comes back


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Gradio page for the Mini-Omni server.")
    add_server_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address the page binds (loopback by default)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    return p.parse_args(argv)


def server_state(client: OmniClient) -> tuple[bool, str]:
    """Whether to show the image input, and the line that says what the page talks to."""
    try:
        health = client.health()
    except ServerError as e:
        return False, f"⚠️ {e}"
    seeing = " It can see: add an image to your question." if health.can_see else ""
    return health.can_see, f"Server {client.url}: {health.status}.{seeing}"


class Turns:
    """The answer each browser session is owed now: a new question or Stop supersedes the running one.

    A superseded answer stops at its next chunk and closes its request, so the server cancels it too.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: dict[str, int] = {}
        self._stopped: set[str] = set()  # sessions whose latest turn is a Stop, not a question
        self._count = itertools.count(1)

    def begin(self, session: str, stop: bool = False) -> int:
        with self._lock:
            self._latest[session] = turn = next(self._count)
            (self._stopped.add if stop else self._stopped.discard)(session)
            return turn

    def state(self, session: str, turn: int) -> str:
        """`wanted`, `superseded` (a newer question runs) or `stopped`."""
        with self._lock:
            if self._latest.get(session) == turn:
                return "wanted"
            return "stopped" if session in self._stopped else "superseded"


def answer(client: OmniClient, options: dict[str, int], audio_path: str | None, image_path: str | None,
           state: Callable[[], str] = lambda: "wanted") -> Iterator[tuple[bytes | None, str, str]]:
    """Ask the server; yield (a WAV chunk to play or None, transcript so far, status line).

    `state()` says whether the answer is still wanted; once it is not, the request is closed (the server stops
    generating), and the last line says "Stopped." after a Stop, nothing when a newer question took over.
    """
    if not audio_path:
        yield None, "", NO_QUESTION
        return
    image = Path(image_path).read_bytes() if image_path else None
    reply = Answer()
    if state() == "wanted":
        yield None, "", "Thinking…"
    try:
        with closing(client.ask(Path(audio_path).read_bytes(), image, **options)) as chunks:
            for chunk in chunks:
                if state() != "wanted":
                    break  # leaving the block closes the request
                reply.add(chunk)
                yield wav_bytes(chunk.pcm, chunk.sample_rate), reply.text, f"Speaking… {reply.timing()}"
    except ServerError as e:
        if state() == "wanted":
            yield None, reply.text, f"⚠️ {e}"
            return
    now = state()
    if now == "wanted":  # the whole answer is generated; the player may still be playing it
        reply.finish()
        yield None, reply.text, f"{GENERATED} {reply.timing()}"
    elif now == "stopped":  # last word of this answer, so no late line of its own can follow the Stop's
        yield None, reply.text, STOPPED


def build_page(gr, client: OmniClient, options: dict[str, int]):
    turns = Turns()
    with gr.Blocks(title="Mini-Omni", analytics_enabled=False) as page:
        gr.Markdown("# Mini-Omni\nAsk a question out loud: upload a recording or use the microphone.")
        server_line = gr.Markdown(elem_id="server")
        with gr.Row():
            question = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Your question",
                                elem_id="question")
            image = gr.Image(type="filepath", label="Image (optional)", visible=False, elem_id="image")
        with gr.Row():
            ask = gr.Button("Ask", variant="primary", elem_id="ask")
            stop = gr.Button("Stop", variant="stop", elem_id="stop")
        spoken = gr.Audio(label="Answer", streaming=True, autoplay=True, interactive=False, elem_id="answer")
        transcript = gr.Textbox(label="Transcript", lines=3, interactive=False, elem_id="transcript")
        status = gr.Markdown(elem_id="status")
        turn = gr.State(0)

        def on_load():
            can_see, line = server_state(client)
            return gr.update(visible=can_see), line

        def on_health():
            return server_state(client)[1]

        def on_start(request: gr.Request):
            # Supersede the running answer (it stops at its next chunk) and clear its player.
            return None, turns.begin(request.session_hash)

        def on_ask(audio_path, image_path, my_turn: int, request: gr.Request):
            state = partial(turns.state, request.session_hash, my_turn)
            for wav, text, line in answer(client, options, audio_path, image_path, state):
                # A streaming player takes only chunks: no chunk is gr.skip(), not None, which would open a stream.
                yield gr.skip() if wav is None else wav, text, line

        def on_stop(request: gr.Request):
            turns.begin(request.session_hash, stop=True)
            return None, STOPPED

        page.load(on_load, outputs=[image, server_line])
        gr.Timer(HEALTH_POLL_S).tick(on_health, outputs=[server_line], show_progress="hidden")
        # Every new question runs and supersedes the one before. Both steps need trigger_mode="multiple":
        # Gradio's default ("once") drops a trigger while the same step still runs for the page, which is
        # how a question asked during an answer used to vanish. concurrency_limit=None: the new answer
        # need not wait for the old one to notice it is superseded.
        gr.on([question.upload, question.stop_recording, ask.click], on_start, outputs=[spoken, turn],
              trigger_mode="multiple").then(on_ask, inputs=[question, image, turn],
                                            outputs=[spoken, transcript, status], concurrency_limit=None,
                                            trigger_mode="multiple")
        # Stop supersedes the answer like a new question (not Gradio's `cancels`, which marks the answer "Error").
        stop.click(on_stop, outputs=[spoken, status], trigger_mode="multiple")
    return page


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import gradio as gr
    except ImportError as e:
        raise SystemExit(INSTALL_HINT) from e
    page = build_page(gr, OmniClient(args.server_url), server_options(args))
    page.launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
