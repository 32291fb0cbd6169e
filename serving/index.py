"""`GET /`: the server's own talk page (`serving/talk/`), which also says what this server is and lists its
routes; the same list as JSON for a client that asks for `application/json` (or at `GET /routes`).

The page is plain HTML and JavaScript served from this package (no build step, nothing from another site):
it talks to `/v1/realtime` on this same origin, so it works on loopback, through an SSH tunnel and behind
a reverse proxy. It holds no secret: with `--api-key` the user types the key into the page, which sends it
as the WebSocket subprotocol the Realtime API defines for browsers.
"""
from __future__ import annotations

from html import escape
from pathlib import Path

from flask import Flask, Response, jsonify, request

from .formats import ENCODERS
from .service import EngineService

TALK_DIR = Path(__file__).parent / "talk"
# The page's files, by the name in their URL (/talk/<name>): a fixed list, so no path reaches beyond them.
TALK_FILES = {"talk.js": "text/javascript", "worklets.js": "text/javascript", "talk.css": "text/css"}
OPEN_PATHS = ("/", "/routes", *(f"/talk/{name}" for name in TALK_FILES))  # served without the API key
ROUTES_MARK = "<!--routes-->"  # where the page's template takes the route table
# The other web pages run as their own processes (see the README); these are their default addresses.
PAGES = (
    ("Gradio page", "http://127.0.0.1:7860/", "python -m webui.omni_gradio"),
    ("Streamlit page", "http://127.0.0.1:8501/", "streamlit run webui/omni_streamlit.py"),
)
ROUTES = (
    ("GET", "/", "this page: talk to the model (hands-free or press to talk) over /v1/realtime"),
    ("POST", "/chat", "a spoken question (JSON {\"audio\": base64}, multipart audio=@q.wav, or a raw audio body); "
                      "the spoken answer streams back. ?format= " + " | ".join(ENCODERS)),
    ("GET", "/health", "ready / loading / failed, model, device, queue"),
    ("GET", "/metrics", "Prometheus metrics"),
    ("GET", "/routes", "this list as JSON (also GET / with Accept: application/json)"),
    ("GET", "/requests/<id>", "the record of a recent answer (its text, timing), by its X-Request-Id, for the "
                              "client sending its X-Request-Token"),
    ("WebSocket", "/v1/realtime", "the OpenAI Realtime protocol (GA; beta with OpenAI-Beta: realtime=v1): live "
                                  "spoken conversation, pcm16 24 kHz"),
    ("GET", "/v1/models", "the loaded model (OpenAI's shape)"),
    ("POST", "/v1/audio/speech", "OpenAI's text to speech: JSON {\"input\"}, mp3 | opus | aac | flac | wav | pcm"),
    ("POST", "/v1/audio/transcriptions", "OpenAI's transcription (multipart file=@q.wav): the model's own ASR"),
    ("POST", "/v1/chat/completions", "OpenAI's chat completions with input_audio parts; the last user message "
                                     "is answered, in text or speech"),
)


def add_index_routes(app: Flask, service: EngineService) -> None:
    @app.get("/")
    def index():
        if request.accept_mimetypes.best_match(["text/html", "application/json"]) == "application/json":
            return jsonify(routes_json(service))
        return Response(index_html(service), mimetype="text/html", headers={"Cache-Control": "no-store"})

    @app.get("/routes")
    def routes():
        return jsonify(routes_json(service))

    @app.get("/talk/<name>")
    def talk_file(name: str):
        if name not in TALK_FILES:
            return jsonify(error=f"no file {name!r}; the page's files are {sorted(TALK_FILES)}"), 404
        return Response((TALK_DIR / name).read_bytes(), mimetype=TALK_FILES[name])


def routes_json(service: EngineService) -> dict:
    engine = service.engine
    return {"status": service.status, "model": engine.family if engine is not None else None,
            "routes": [{"method": m, "path": p, "what": what} for m, p, what in ROUTES],
            "pages": [{"name": name, "url": url, "start": cmd} for name, url, cmd in PAGES]}


def index_html(service: EngineService) -> str:
    engine = service.engine
    model = f"{engine.family} on {engine.device} ({engine.mode} mode)" if engine is not None else "not loaded yet"
    routes = "".join(f"<tr><td>{m}</td><td>{_link(m, p)}</td><td>{escape(what)}</td></tr>" for m, p, what in ROUTES)
    pages = "".join(f"<li><a href=\"{url}\">{name}</a> (if started: <code>{escape(cmd)}</code>)</li>"
                    for name, url, cmd in PAGES)
    about = (
        f"<p>Status when this page was served: <b>{escape(service.status)}</b>; model: {escape(model)}.</p>"
        f"<h3>Routes</h3><table>{routes}</table>"
        f"<h3>Other web pages</h3><ul>{pages}</ul>"
        "<h3>Try it from a shell</h3><pre>curl -s \"http://127.0.0.1:60808/chat?format=wav\" "
        "-F audio=@data/samples/output1.wav -o /tmp/answer.wav</pre>"
    )
    return (TALK_DIR / "index.html").read_text().replace(ROUTES_MARK, about)


def _link(method: str, path: str) -> str:
    return f"<a href=\"{path}\">{path}</a>" if method == "GET" and "<" not in path else escape(path)
