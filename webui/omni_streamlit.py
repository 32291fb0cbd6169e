"""Streamlit page: speak into the browser's microphone, hear the answer from `server.py`, keep the conversation.

    streamlit run webui/omni_streamlit.py [-- --server-url http://127.0.0.1:60808 --max-tokens N]

UI only: every request goes through `webui.client`. The recording is made in the user's browser
(`st.audio_input`, 16 kHz WAV), so the page works from another computer, unlike the official page that
records with PyAudio on the server's machine. A camera snapshot is offered when the server's model can see.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `streamlit run webui/omni_streamlit.py` from anywhere

from webui.client import Answer, OmniClient, ServerError, add_server_arguments, server_options  # noqa: E402

INSTALL_HINT = "the Streamlit page needs streamlit: pip install streamlit==1.67.0 (or pip install -r requirements.txt)"
RUN_HINT = "start the page with: streamlit run webui/omni_streamlit.py [-- --server-url URL]"
QUESTION_RATE = 16000  # Hz: what the model hears, so the browser records at that rate
SNAPSHOT_WIDTH = 160  # px: a camera snapshot as the history shows it
STATES = {  # the live state line
    "listening": "Listening: press the microphone, ask your question, press stop.",
    "thinking": "Thinking…",
    "answering": "Answering: the transcript streams in, the audio plays when it is complete.",
}


@dataclass(frozen=True)
class Turn:
    """One question and its answer, as the history shows them."""

    question: bytes  # the recording, a WAV file
    image: bytes | None  # the camera snapshot sent with it
    answer: bytes | None  # the answer as a WAV file; None when nothing came back
    text: str
    note: str  # timings, or why the answer failed
    failed: bool


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Streamlit page for the Mini-Omni server.")
    add_server_arguments(p)
    return p.parse_args(argv)


class Page:
    """One run of the script: Streamlit reruns it from the top on every interaction."""

    def __init__(self, st, client: OmniClient, options: dict[str, int]) -> None:
        self.st = st
        self.client = client
        self.options = options
        st.session_state.setdefault("turns", [])
        st.session_state.setdefault("asked", 0)  # also names the recorder, so each turn gets a fresh one
        st.session_state.setdefault("autoplay", False)

    def render(self) -> None:
        st = self.st
        st.title("Mini-Omni")
        can_see = self.server_line()
        self.history()
        state = st.empty()
        snapshot = st.camera_input("Camera snapshot (optional)", key="camera") if can_see else None
        question = st.audio_input("Your question", sample_rate=QUESTION_RATE, key=f"question-{st.session_state.asked}")
        if question is None:
            state.info(STATES["listening"])
            return
        image = snapshot.getvalue() if snapshot is not None else None
        st.session_state.turns.append(self.ask(state, question.getvalue(), image))
        st.session_state.asked += 1
        st.session_state.autoplay = True
        st.rerun()

    def server_line(self) -> bool:
        """Say which server the page talks to and whether it is up; return whether its model can see."""
        try:
            health = self.client.health()
        except ServerError as e:
            self.st.error(str(e))
            return False
        self.st.caption(f"Server {self.client.url}: {health.status}" + (" · it can see" if health.can_see else ""))
        return health.can_see

    def ask(self, state, question: bytes, image: bytes | None) -> Turn:
        st = self.st
        self.user_message(question, image)
        reply = Answer()
        with st.chat_message("assistant"):
            state.info(STATES["thinking"])
            live_text = st.empty()
            try:
                for chunk in self.client.ask(question, image, **self.options):
                    reply.add(chunk)
                    state.info(STATES["answering"])
                    live_text.text(reply.text)
            except ServerError as e:
                return Turn(question, image, reply.wav() if reply.pcm else None, reply.text, str(e), failed=True)
        reply.finish()
        return Turn(question, image, reply.wav(), reply.text, reply.timing(), failed=False)

    def user_message(self, question: bytes, image: bytes | None) -> None:
        with self.st.chat_message("user"):
            self.st.audio(question, format="audio/wav")
            if image is not None:
                self.st.image(image, width=SNAPSHOT_WIDTH)

    def history(self) -> None:
        st = self.st
        turns = st.session_state.turns
        for i, turn in enumerate(turns):
            self.user_message(turn.question, turn.image)
            with st.chat_message("assistant"):
                if turn.answer is not None:  # only the newest answer plays by itself, once
                    latest = i == len(turns) - 1 and st.session_state.autoplay
                    st.audio(turn.answer, format="audio/wav", autoplay=latest)
                if turn.text:
                    st.text(turn.text)  # plain: a transcript is no markdown
                (st.error if turn.failed else st.caption)(turn.note)
        st.session_state.autoplay = False


def main() -> None:
    try:
        import streamlit as st
        from streamlit import runtime
    except ImportError as e:
        raise SystemExit(INSTALL_HINT) from e
    if not runtime.exists():
        raise SystemExit(RUN_HINT)
    args = parse_args(sys.argv[1:])
    st.set_page_config(page_title="Mini-Omni")
    Page(st, OmniClient(args.server_url), server_options(args)).render()


if __name__ == "__main__":
    main()
