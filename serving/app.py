"""The Flask application: routes only. Parsing, encoding and queueing live beside it."""
from __future__ import annotations

from collections.abc import Callable, Iterator

from flask import Flask, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from werkzeug.exceptions import HTTPException

from omni import CHUNK_SECONDS, INPUT_SAMPLE_RATE, OmniChunk, OmniEngine, load_audio
from .asgi import DISCONNECTED_KEY
from .formats import MIMETYPES, PCM_HEADERS, encode
from .index import OPEN_PATHS, add_index_routes
from .openai_audio import register as register_openai
from .parse import ApiError, ChatRequest, engine_options, parse_chat
from .security import AccessPolicy
from .service import EngineService, Record, Refused

DEFAULT_MAX_BYTES = 16 * 1024 * 1024
RETRY_AFTER_S = 2
OPEN_ROUTES = ("/health", *OPEN_PATHS)  # served without the API key (still subject to the Host and Origin checks):
# /health for monitoring, the talk page and its files because they hold no secret (the user types the key in)
TOKEN_HEADER = "X-Request-Token"  # the secret that lets a client read its own answer's record


def _never() -> bool:
    return False


def _open_answer(engine: OmniEngine, req: ChatRequest, record: Record,
                 disconnected: Callable[[], bool]) -> Iterator[OmniChunk]:
    """The answer's chunks, not started yet; a ValueError names what is wrong with the request.

    The question is decoded here, once: the 30 s refusal and the record need its length before the
    engine's turn. The engine gets the samples at its own rate, so its check of them decodes nothing.
    """
    samples = load_audio(req.audio)  # AudioInputError (a ValueError): not audio, empty, silent
    seconds = samples.size / INPUT_SAMPLE_RATE
    if seconds > CHUNK_SECONDS:
        raise ValueError(f"the audio is {seconds:.1f} s long; the model hears at most {CHUNK_SECONDS} s")
    record.input_seconds = round(seconds, 3)
    # Checks the options and decodes the image now; generation starts when the body is read.
    return engine.stream(samples, sample_rate=INPUT_SAMPLE_RATE, image=req.image, cancel=disconnected,
                         **engine_options(req.options, engine, samples, req.image is not None))


def create_app(service: EngineService, max_bytes: int = DEFAULT_MAX_BYTES,
               policy: AccessPolicy | None = None) -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = max_bytes  # also enforced while reading a body without a length
    _add_guard(app, policy or AccessPolicy(), max_bytes)
    _add_info_routes(app, service)
    _add_chat(app, service)
    register_openai(app, service)  # /v1/models, /v1/audio/*, /v1/chat/completions
    return app


def _add_guard(app: Flask, policy: AccessPolicy, max_bytes: int) -> None:
    """Who may ask and how much, checked before every route; every refusal as JSON `{"error": ...}`."""
    @app.before_request
    def guard():
        refusal = policy.refusal(request.environ, needs_key=request.path not in OPEN_ROUTES)
        if refusal is not None:
            headers = {"WWW-Authenticate": "Bearer"} if refusal.status == 401 else {}
            raise ApiError(refusal.status, refusal.message, headers)
        if request.content_length is not None and request.content_length > max_bytes:
            raise ApiError(413, f"the request body is {request.content_length} bytes; at most {max_bytes} "
                                "are accepted")

    @app.errorhandler(ApiError)
    def api_error(e: ApiError):
        return jsonify(error=e.message), e.status, e.headers

    @app.errorhandler(Refused)
    def refused(e: Refused):  # not loaded yet, or the queue is full: 503, with Retry-After where it can help
        return jsonify(error=e.message), 503, ({"Retry-After": str(RETRY_AFTER_S)} if e.retry else {})

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        return jsonify(error=f"{e.name}: {e.description}"), e.code


def _add_info_routes(app: Flask, service: EngineService) -> None:
    add_index_routes(app, service)

    @app.get("/health")
    def health():
        engine = service.engine
        body = {"status": service.status, "queue_depth": service.queue.depth, "max_queue": service.queue.max_waiting,
                "busy": service.queue.busy, "running": service.queue.running, "max_batch": service.queue.max_running,
                "realtime_capacity": service.realtime_capacity, "conversations": service.conversations,
                "speculative_turns": service.speculative_turns}
        if engine is not None:
            body.update(family=engine.family, mode=engine.mode, mode_reason=engine.mode_reason,
                        device=str(engine.device), dtype=str(engine.dtype).removeprefix("torch."),
                        sample_rate=engine.sample_rate, can_see=engine.can_see)
        if service.load_error:
            body["error"] = service.load_error
        return jsonify(body), 200 if engine is not None else 503

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(service.metrics.registry), mimetype=CONTENT_TYPE_LATEST)

    @app.get("/requests/<request_id>")
    def request_record(request_id: str):
        record = service.record_json(request_id, request.headers.get(TOKEN_HEADER, ""))
        if record is None:  # the same answer for an unknown id and a wrong token
            raise ApiError(404, f"no recent request with that id and {TOKEN_HEADER}")
        return jsonify(record)


def _add_chat(app: Flask, service: EngineService) -> None:
    @app.post("/chat")
    def chat():
        service.check_ready()
        disconnected = request.environ.get(DISCONNECTED_KEY, _never)
        try:
            req = parse_chat(request)
        except ApiError:
            service.reject("bad_request")
            raise
        # Admission comes before decoding: a decode holds a place in the same bounded queue as an answer.
        turn = service.admit()
        try:
            chunks = turn.prepare(lambda: _open_answer(service.engine, req, turn.record, disconnected))
        except ValueError as e:
            raise ApiError(400, str(e)) from e
        if not turn.wait(disconnected):
            return jsonify(error="the client left while waiting"), 499
        headers = {"X-Request-Id": turn.record.id, TOKEN_HEADER: turn.record.token, "Cache-Control": "no-store",
                   **PCM_HEADERS}
        response = Response(encode(req.format, turn.answer(chunks, disconnected)), mimetype=MIMETYPES[req.format],
                            headers=headers)
        response.call_on_close(turn.finish)
        return response
