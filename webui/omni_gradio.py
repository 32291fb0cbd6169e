"""Gradio page: upload or record a question and hear the answer stream back from `server.py`.

    python -m webui.omni_gradio [--server-url http://127.0.0.1:60808] [--port 7860] [--max-tokens N]

UI only: every request goes through `webui.client`. The answer plays as its chunks arrive
(`gr.Audio(streaming=True)`), the transcript fills in beside it, and the page shows the time to the
first audio and the total time. The image input appears only when the server's model can see.
"""
from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from webui.client import Answer, OmniClient, ServerError, add_server_arguments, server_options, wav_bytes

INSTALL_HINT = "the Gradio page needs gradio: pip install gradio==6.31.0 (or pip install -r requirements.txt)"
DEFAULT_PORT = 7860
NO_QUESTION = "Upload or record a question first."


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


def answer(client: OmniClient, options: dict[str, int], audio_path: str | None,
           image_path: str | None) -> Iterator[tuple[bytes | None, str, str]]:
    """Ask the server; yield (a WAV chunk to play or None, transcript so far, status line)."""
    if not audio_path:
        yield None, "", NO_QUESTION
        return
    image = Path(image_path).read_bytes() if image_path else None
    reply = Answer()
    yield None, "", "Thinking…"
    try:
        for chunk in client.ask(Path(audio_path).read_bytes(), image, **options):
            reply.add(chunk)
            yield wav_bytes(chunk.pcm, chunk.sample_rate), reply.text, f"Speaking… {reply.timing()}"
    except ServerError as e:
        yield None, reply.text, f"⚠️ {e}"
        return
    reply.finish()
    yield None, reply.text, f"Done: {reply.timing()}"


def build_page(gr, client: OmniClient, options: dict[str, int]):
    with gr.Blocks(title="Mini-Omni", analytics_enabled=False) as page:
        gr.Markdown("# Mini-Omni\nAsk a question out loud: upload a recording or use the microphone.")
        server_line = gr.Markdown(elem_id="server")
        with gr.Row():
            question = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Your question",
                                elem_id="question")
            image = gr.Image(type="filepath", label="Image (optional)", visible=False, elem_id="image")
        ask = gr.Button("Ask", variant="primary")
        spoken = gr.Audio(label="Answer", streaming=True, autoplay=True, interactive=False, elem_id="answer")
        transcript = gr.Textbox(label="Transcript", lines=3, interactive=False, elem_id="transcript")
        status = gr.Markdown(elem_id="status")

        def on_load():
            can_see, line = server_state(client)
            return gr.update(visible=can_see), line

        def on_ask(audio_path, image_path):
            for wav, text, line in answer(client, options, audio_path, image_path):
                # A streaming player takes only chunks: no chunk is gr.skip(), not None, which would open a stream.
                yield gr.skip() if wav is None else wav, text, line

        page.load(on_load, outputs=[image, server_line])
        # A new question first clears the last answer's player, then streams the new one into it.
        gr.on([question.upload, question.stop_recording, ask.click], lambda: None, outputs=[spoken]).then(
            on_ask, inputs=[question, image], outputs=[spoken, transcript, status])
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
