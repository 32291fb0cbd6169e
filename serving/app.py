"""The Flask application: routes only. Parsing, encoding and queueing live beside it."""
from __future__ import annotations

from flask import Flask, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from werkzeug.exceptions import HTTPException

from omni.audio import CHUNK_SECONDS, SAMPLE_RATE, load_audio
from omni_engine import AudioInputError
from .asgi import DISCONNECTED_KEY
from .formats import MIMETYPES, PCM_HEADERS, encode
from .parse import ApiError, parse_chat
from .service import EngineService

DEFAULT_MAX_BYTES = 16 * 1024 * 1024
RETRY_AFTER_S = 2


def _never() -> bool:
    return False


def _decode(audio: bytes):
    try:
        samples = load_audio(audio)
    except AudioInputError as e:
        raise ApiError(400, str(e)) from e
    seconds = samples.size / SAMPLE_RATE
    if seconds > CHUNK_SECONDS:
        raise ApiError(400, f"the audio is {seconds:.1f} s long; the model hears at most {CHUNK_SECONDS} s")
    return samples


def create_app(service: EngineService, max_bytes: int = DEFAULT_MAX_BYTES) -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = max_bytes

    @app.errorhandler(ApiError)
    def api_error(e: ApiError):
        return jsonify(error=e.message), e.status, e.headers

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        return jsonify(error=f"{e.name}: {e.description}"), e.code

    @app.get("/health")
    def health():
        engine = service.engine
        body = {"status": service.status, "queue_depth": service.queue.depth, "max_queue": service.queue.max_waiting,
                "busy": service.queue.busy}
        if engine is not None:
            body.update(family=engine.family, mode=engine.mode, device=str(engine.device),
                        dtype=str(engine.dtype).removeprefix("torch."),
                        sample_rate=engine.sample_rate, can_see=engine.can_see)
        if service.current is not None:
            body["current"] = {"id": service.current.id, "steps": service.current.steps}
        if service.load_error:
            body["error"] = service.load_error
        return jsonify(body), 200 if engine is not None else 503

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(service.metrics.registry), mimetype=CONTENT_TYPE_LATEST)

    @app.get("/requests/<request_id>")
    def request_record(request_id: str):
        record = service.record_json(request_id)
        if record is None:
            raise ApiError(404, f"no recent request {request_id!r}")
        return jsonify(record)

    def accept(disconnected):
        """Parse and check a /chat request: the request and the engine's (not yet started) chunks."""
        req = parse_chat(request)
        samples = _decode(req.audio)
        try:  # checks the options and decodes the image now; generation starts when the body is read
            chunks = service.engine.stream(samples, sample_rate=SAMPLE_RATE, image=req.image, cancel=disconnected,
                                           **req.options)
        except ValueError as e:
            raise ApiError(400, str(e)) from e
        return req, samples.size / SAMPLE_RATE, chunks

    @app.post("/chat")
    def chat():
        if service.engine is None:
            service.reject("not_ready")
            raise ApiError(503, f"the model is {service.status}", {"Retry-After": str(RETRY_AFTER_S)})
        disconnected = request.environ.get(DISCONNECTED_KEY, _never)
        try:
            req, seconds, chunks = accept(disconnected)
        except ApiError:
            service.reject("bad_request")
            raise
        admitted = service.admit(seconds)
        if admitted is None:
            service.reject("busy")
            raise ApiError(503, f"the server is busy ({service.queue.max_waiting} requests already waiting)",
                           {"Retry-After": str(RETRY_AFTER_S)})
        ticket, record = admitted
        if not service.wait_turn(ticket, record, disconnected):
            return jsonify(error="the client left while waiting"), 499
        events = service.answer(ticket, record, chunks, disconnected)
        headers = {"X-Request-Id": record.id, "Cache-Control": "no-store", **PCM_HEADERS}
        response = Response(encode(req.format, events), mimetype=MIMETYPES[req.format], headers=headers)
        response.call_on_close(lambda: service.finish(ticket, record))
        return response

    return app
