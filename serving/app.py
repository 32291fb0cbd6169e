"""The Flask application: routes only. Parsing, encoding and queueing live beside it."""
from __future__ import annotations

from collections.abc import Iterator

from flask import Flask, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from werkzeug.exceptions import HTTPException

from omni import CHUNK_SECONDS, INPUT_SAMPLE_RATE, AudioInputError, OmniChunk, load_audio
from .asgi import DISCONNECTED_KEY
from .formats import MIMETYPES, PCM_HEADERS, encode
from .index import index_html
from .parse import ApiError, ChatRequest, parse_chat
from .security import AccessPolicy
from .service import EngineService

DEFAULT_MAX_BYTES = 16 * 1024 * 1024
RETRY_AFTER_S = 2
OPEN_ROUTES = ("/health",)  # served without the API key (still subject to the Host and Origin checks)
TOKEN_HEADER = "X-Request-Token"  # the secret that lets a client read its own answer's record


def _never() -> bool:
    return False


def _decode(audio: bytes):
    try:
        samples = load_audio(audio)
    except AudioInputError as e:
        raise ApiError(400, str(e)) from e
    seconds = samples.size / INPUT_SAMPLE_RATE
    if seconds > CHUNK_SECONDS:
        raise ApiError(400, f"the audio is {seconds:.1f} s long; the model hears at most {CHUNK_SECONDS} s")
    return samples


def create_app(service: EngineService, max_bytes: int = DEFAULT_MAX_BYTES,
               policy: AccessPolicy | None = None) -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = max_bytes  # also enforced while reading a body without a length
    policy = policy or AccessPolicy()

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

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        return jsonify(error=f"{e.name}: {e.description}"), e.code

    @app.get("/")
    def index():
        return Response(index_html(service), mimetype="text/html")

    @app.get("/health")
    def health():
        engine = service.engine
        body = {"status": service.status, "queue_depth": service.queue.depth, "max_queue": service.queue.max_waiting,
                "busy": service.queue.busy, "running": service.queue.running, "max_batch": service.queue.max_running}
        if engine is not None:
            body.update(family=engine.family, mode=engine.mode, device=str(engine.device),
                        dtype=str(engine.dtype).removeprefix("torch."),
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

    def decode_and_check(req: ChatRequest, disconnected) -> tuple[Iterator[OmniChunk], float]:
        """The engine's (not yet started) chunks for an admitted request, and its input length in seconds."""
        samples = _decode(req.audio)
        try:  # checks the options and decodes the image now; generation starts when the body is read
            chunks = service.engine.stream(samples, sample_rate=INPUT_SAMPLE_RATE, image=req.image, cancel=disconnected,
                                           **req.options)
        except ValueError as e:
            raise ApiError(400, str(e)) from e
        return chunks, round(samples.size / INPUT_SAMPLE_RATE, 3)

    @app.post("/chat")
    def chat():
        if service.engine is None:
            service.reject("not_ready")
            if service.load_error:  # retrying will not help: say so, without Retry-After
                raise ApiError(503, f"the model failed to load ({service.load_error}); fix the checkpoint and "
                                    "restart the server")
            raise ApiError(503, f"the model is {service.status}", {"Retry-After": str(RETRY_AFTER_S)})
        disconnected = request.environ.get(DISCONNECTED_KEY, _never)
        try:
            req = parse_chat(request)
        except ApiError:
            service.reject("bad_request")
            raise
        # Admission comes before decoding: a decode holds a place in the same bounded queue as an answer.
        admitted = service.admit()
        if admitted is None:
            service.reject("busy")
            raise ApiError(503, f"the server is busy ({service.queue.max_waiting} requests already waiting)",
                           {"Retry-After": str(RETRY_AFTER_S)})
        ticket, record = admitted
        try:
            chunks, record.input_seconds = decode_and_check(req, disconnected)
        except ApiError:
            record.outcome = "bad_request"
            service.finish(ticket, record)
            raise
        if not service.wait_turn(ticket, record, disconnected):
            return jsonify(error="the client left while waiting"), 499
        events = service.answer(ticket, record, chunks, disconnected)
        headers = {"X-Request-Id": record.id, TOKEN_HEADER: record.token, "Cache-Control": "no-store",
                   **PCM_HEADERS}
        response = Response(encode(req.format, events), mimetype=MIMETYPES[req.format], headers=headers)
        response.call_on_close(lambda: service.finish(ticket, record))
        return response

    return app
