"""`GET /`: a small page saying what this server is, its routes, and where the web pages are."""
from __future__ import annotations

from html import escape

from .formats import ENCODERS
from .service import EngineService

# The web pages run as their own processes (see the README); these are their default addresses.
PAGES = (
    ("Gradio page", "http://127.0.0.1:7860/", "python -m webui.omni_gradio"),
    ("Streamlit page", "http://127.0.0.1:8501/", "streamlit run webui/omni_streamlit.py"),
)
ROUTES = (
    ("POST", "/chat", "a spoken question (JSON {\"audio\": base64}, multipart audio=@q.wav, or a raw audio body); "
                      "the spoken answer streams back. ?format= " + " | ".join(ENCODERS)),
    ("GET", "/health", "ready / loading / failed, model, device, queue"),
    ("GET", "/metrics", "Prometheus metrics"),
    ("GET", "/requests/<id>", "the record of a recent answer (its text, timing), by its X-Request-Id, for the "
                              "client sending its X-Request-Token"),
    ("WebSocket", "/v1/realtime", "the OpenAI Realtime protocol (GA; beta with OpenAI-Beta: realtime=v1): live "
                                  "spoken conversation, pcm16 24 kHz"),
)


def index_html(service: EngineService) -> str:
    engine = service.engine
    model = f"{engine.family} on {engine.device} ({engine.mode} mode)" if engine is not None else "not loaded yet"
    routes = "".join(f"<tr><td>{m}</td><td>{_link(m, p)}</td><td>{escape(what)}</td></tr>" for m, p, what in ROUTES)
    pages = "".join(f"<li><a href=\"{url}\">{name}</a> (if started: <code>{escape(cmd)}</code>)</li>"
                    for name, url, cmd in PAGES)
    return (
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Mini-Omni server</title></head><body>"
        "<h1>Mini-Omni server</h1>"
        "<p>Speech in, speech out: ask a question out loud, hear the answer as it is generated.</p>"
        f"<p>Status: <b>{escape(service.status)}</b>; model: {escape(model)}.</p>"
        f"<h2>Routes</h2><table>{routes}</table>"
        f"<h2>Web pages</h2><ul>{pages}</ul>"
        "<h2>Try it</h2><pre>curl -s \"http://127.0.0.1:60808/chat?format=wav\" -F audio=@data/samples/output1.wav "
        "-o /tmp/answer.wav</pre></body></html>"
    )


def _link(method: str, path: str) -> str:
    return f"<a href=\"{path}\">{path}</a>" if method == "GET" and "<" not in path else escape(path)
