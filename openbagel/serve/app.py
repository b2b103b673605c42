"""The OpenAI-compatible HTTP API (FastAPI): images/generations, images/edits,
chat/completions, models, plus health, readiness and Prometheus metrics.

Every request builds its own conversation (its own KV caches, guidance
contexts and random generator) from what it sends: nothing of one request can
reach another. Errors use OpenAI's shape, ``{"error": {"message", "type",
"param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from openbagel.errors import InvalidInputError, NumericalError
from openbagel.pipeline import ImageResult, ReasoningSplitter, check_text, split_reasoning
from openbagel.serve.engine import Cancelled, Engine, Job, NotReady, QueueFull
from openbagel.serve.inputs import RequestError, Upload, check_data_url, check_image, check_total_pixels, parse_size
from openbagel.serve.metrics import Metrics
from openbagel.serve.settings import ServeSettings

log = logging.getLogger("openbagel.serve")

#: Status logged (and counted) for a client that went away before its answer.
CLIENT_CLOSED = 499


# ---------------------------------------------------------------------------
# Request bodies


class _Body(BaseModel):
    # unknown fields are refused (a misspelt setting must not be silently
    # dropped), types are strict (no "2" or true for a number), and NaN or
    # Infinity (which Python's JSON reader accepts) is no number
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class _ImageKnobs(_Body):
    """openbagel's own image settings (API-CONVENTIONS.md); None = the model's default."""

    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "jpeg", "webp"] = "png"
    user: str | None = None  # accepted and ignored, as OpenAI clients send it
    seed: int | None = Field(None, ge=0, lt=2**63)
    num_inference_steps: int | None = Field(None, ge=2)
    guidance_scale: float | None = None
    image_guidance_scale: float | None = None
    cfg_interval: list[float] | None = Field(None, min_length=2, max_length=2)
    timestep_shift: float | None = None
    cfg_renorm_type: Literal["global", "channel", "text_channel"] | None = None
    cfg_renorm_min: float | None = None
    think: bool = False

    @field_validator("cfg_interval", mode="before")
    @classmethod
    def _interval(cls, v):
        if isinstance(v, str):  # form fields: "0.4,1.0" or "[0.4, 1.0]"
            return [p for p in v.strip().strip("[]").split(",") if p.strip()]
        return v


class ImageGenerationRequest(_ImageKnobs):
    prompt: str


class ImageEditRequest(_ImageKnobs):
    prompt: str | None = None
    style: str | None = None  # a style preset (outline, pixel, invert) instead of a prompt


def _edit_form_schema() -> dict:
    """The OpenAPI request body of ``images/edits`` (the route reads its multipart
    form itself, so /docs would show no fields): the image files and the fields
    of :class:`ImageEditRequest`, as text form fields."""
    schema = ImageEditRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    files = {"type": "array", "items": {"type": "string", "format": "binary"}}
    properties = {
        "image": {"type": "string", "format": "binary", "description": "the image to edit"},
        "image[]": {**files, "description": "several images: the first is edited, the others join the context"},
        **schema.get("properties", {}),
    }
    form = {"type": "object", "properties": properties, "required": ["image"]}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form}}}}


class _ImageURL(_Body):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; images are always read at the model's size


class _Part(_Body):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: _ImageURL | None = None

    @model_validator(mode="after")
    def _one_kind(self):
        if self.type == "text" and (self.text is None or self.image_url is not None):
            raise ValueError("a text part has 'text' (and no 'image_url')")
        if self.type == "image_url" and (self.image_url is None or self.text is not None):
            raise ValueError("an image_url part has 'image_url' (and no 'text')")
        return self


class _Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_Part] | None = None
    name: str | None = None  # accepted and ignored


class _StreamOptions(_Body):
    include_usage: bool = False


class ChatRequest(_Body):
    model: str | None = None
    messages: list[_Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    stream_options: _StreamOptions | None = None
    reasoning: bool | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    n: int = Field(1, ge=1, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: None = None
    user: str | None = None

    @property
    def think(self) -> bool:
        if self.reasoning is not None:
            return self.reasoning
        return self.reasoning_effort not in (None, "none")


# ---------------------------------------------------------------------------
# Errors


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _error(status: int, message: str, type: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


#: Union-member tags pydantic puts into error locations.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "list", "dict"})


def _validation_error(errors: list[dict]) -> RequestError:
    e = max(errors, key=lambda err: len(err.get("loc", ())))  # the deepest: the most precise
    param = ""
    for p in e.get("loc", ()):
        if p in ("body", "form") or (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS)):
            continue  # not a field: where the body sits, or which member of a union failed
        param += f"[{p}]" if isinstance(p, int) else (f".{p}" if param else str(p))
    param = param or None
    msg = e.get("msg", "invalid value")
    if e.get("type") == "json_invalid":  # the location holds the character offset, not a field
        offset = next((p for p in e.get("loc", ()) if isinstance(p, int)), None)
        at = f" at character {offset}" if offset is not None else ""
        return RequestError(
            f"the body is not valid JSON ({msg}{at}); send a JSON object (Content-Type: application/json)",
            code="invalid_json",
        )
    if param is None and e.get("type") == "missing":  # the whole body
        return RequestError(
            "the request body is empty; send a JSON object with the request's fields (Content-Type: application/json)",
            code="invalid_value",
        )
    if e.get("type") == "finite_number":
        msg = f"{param} must be a finite number (NaN and Infinity are not accepted)"
    elif e.get("type") == "extra_forbidden":
        msg = f"unknown field {param!r}; see the API docs (/docs) for the accepted fields"
    elif e.get("type") == "missing":
        msg = f"{param} is required"
    elif param is None and e.get("type") in ("model_type", "model_attributes_type", "dict_type", "json_invalid"):
        msg = "the body must be a JSON object (Content-Type: application/json)"
    elif param:
        msg = f"{param}: {msg}"
    return RequestError(msg, param=param, code="invalid_value")


# ---------------------------------------------------------------------------
# The guard around every request: id, API key, body size, one log line, metrics


class _Guard:
    """ASGI middleware: request id (``x-request-id``), the API key on ``/v1``,
    a full queue (429 for a model request before its body is read: a burst of
    large bodies the queue refuses holds no memory), the body size limit (the
    body is read here, then replayed), one log line and the request metrics per
    request. The route's own :meth:`Engine.admit` still decides."""

    def __init__(self, app, settings: ServeSettings, metrics: Metrics, engine: Engine):
        self.app, self.settings, self.metrics, self.engine = app, settings, metrics, engine

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"].startswith("/ui"):
            return await self.app(scope, receive, send)  # the web UI's own traffic: not API requests
        rid = "req-" + secrets.token_hex(6)
        scope.setdefault("state", {})["request_id"] = rid
        start = time.perf_counter()
        path = scope["path"]
        status = {"code": CLIENT_CLOSED}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            rejection = self._check(scope)
            body = b""
            if rejection is None:
                body, rejection = await self._read_body(scope, receive)
            if rejection is not None:
                await rejection(scope, receive, send_with_id)
                return
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # after the body: http.disconnect when the client leaves

            try:
                await self.app(scope, replay, send_with_id)
            except Exception:
                if status["code"] == CLIENT_CLOSED:
                    status["code"] = 500  # answered by the outermost error handler
                raise
        finally:
            self._record(scope, rid, path, status["code"], time.perf_counter() - start)

    def _check(self, scope) -> JSONResponse | None:
        key = self.settings.api_key
        if key and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                return _error(
                    401,
                    "missing or wrong API key; send the header Authorization: Bearer YOUR_KEY",
                    "invalid_request_error",
                    code="invalid_api_key",
                )
        if scope["method"] == "POST" and scope["path"] in _ENGINE_ROUTES and self.engine.full:
            return _queue_full(self.settings)
        return None

    async def _read_body(self, scope, receive) -> tuple[bytes, JSONResponse | None]:
        limit = self.settings.limits.max_body_bytes
        too_large = _error(
            413,
            f"request body over the server's limit of {limit} bytes (openbagel serve --max-body-mb)",
            "invalid_request_error",
            code="request_too_large",
        )
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return b"", too_large
        chunks, size = [], 0
        deadline = asyncio.get_running_loop().time() + self.settings.body_timeout
        while True:
            try:  # a body sent slowly (or never) must not hold the connection
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:
                return b"", _error(
                    408,
                    f"the request body did not arrive within {self.settings.body_timeout:g} s "
                    "(openbagel serve --body-timeout); send it at once",
                    "invalid_request_error",
                    code="request_timeout",
                    headers={"Connection": "close"},
                )
            if message["type"] == "http.disconnect":
                return b"", Response(status_code=CLIENT_CLOSED)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None

    def _record(self, scope, rid: str, path: str, code: int, seconds: float) -> None:
        route = path if path in _ROUTES else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
        if scope.get("state", {}).get("stream_cut"):  # a stream the client left: not an answer
            code = CLIENT_CLOSED
        outcome = (
            "ok" if code < 400 else "rejected" if code == 429 else "cancelled" if code == CLIENT_CLOSED
            else "not_ready" if route == "/ready" and code == 503  # a readiness poll while loading: no error
            else "client_error" if code < 500 else "error"
        )  # fmt: skip
        self.metrics.requests.labels(route, outcome).inc()
        self.metrics.latency.labels(route).observe(seconds)
        extra = ""
        prompt = scope.get("state", {}).get("prompt_log")
        if self.settings.log_prompts and prompt:
            extra = f" prompt={prompt!r}"
        log.info("%s %s %s %d %.0f ms%s", rid, scope["method"], path, code, seconds * 1000, extra)


def _queue_full(settings: ServeSettings) -> JSONResponse:
    return _error(
        429,
        f"the server is busy ({settings.max_queue} requests already wait); retry after a moment",
        "rate_limit_error",
        code="queue_full",
        headers={"Retry-After": "1"},
    )


#: The routes whose requests run the model (and wait in its queue).
_ENGINE_ROUTES = ("/v1/images/generations", "/v1/images/edits", "/v1/chat/completions")

_ROUTES = (
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/chat/completions",
    "/v1/models",
    "/health",
    "/ready",
    "/metrics",
)


# ---------------------------------------------------------------------------
# The app


def create_app(settings: ServeSettings | None = None, pipe=None) -> FastAPI:
    """Build the server app; the model loads in the background at startup.

    Args:
        settings: see :class:`~openbagel.serve.settings.ServeSettings`.
        pipe: an already loaded :class:`~openbagel.pipeline.BagelPipeline` to
            serve instead of loading ``settings.model``.
    Returns:
        A FastAPI app; the ASGI middleware for ids, keys, body limits and logs is installed.
    """
    settings = settings or ServeSettings()
    limits = settings.limits
    metrics = Metrics()

    def load():
        if pipe is not None:
            return pipe
        from openbagel.pipeline import BagelPipeline

        return BagelPipeline.from_pretrained(
            settings.model, dtype=settings.dtype, device=settings.device, quant=settings.quant,
            offload=settings.offload, parallel=settings.parallel,
        )  # fmt: skip

    engine = Engine(load, settings.max_queue, settings.max_concurrency, metrics)
    name = settings.served_name
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.close()

    # FastAPIOffline: /docs (Swagger UI) and /redoc load their scripts from
    # the package, not from a CDN, so the documented route works offline
    app = FastAPIOffline(title="openbagel", summary="BAGEL behind an OpenAI-compatible API", lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.settings = engine, metrics, settings
    app.add_middleware(_Guard, settings=settings, metrics=metrics, engine=engine)

    # -- errors -----------------------------------------------------------

    @app.exception_handler(RequestError)
    async def _request_error(request, e: RequestError):
        return _error(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        r = _validation_error(list(e.errors()))
        return _error(400, r.message, r.type, r.param, r.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        code = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _error(e.status_code, str(e.detail), "invalid_request_error", code=code, headers=e.headers)

    @app.exception_handler(InvalidInputError)
    async def _bad_input(request, e: InvalidInputError):
        return _error(400, str(e), "invalid_request_error", code="invalid_value")

    @app.exception_handler(NumericalError)
    async def _numerical(request, e: NumericalError):
        return _error(400, str(e), "invalid_request_error", code="numerical_error")

    @app.exception_handler(QueueFull)
    async def _full(request, e: QueueFull):
        return _queue_full(settings)

    @app.exception_handler(NotReady)
    async def _not_ready(request, e: NotReady):
        if engine.load_error:
            return _error(
                503, f"the model failed to load: {engine.load_error}", "server_error", code="model_load_failed"
            )
        return _error(
            503,
            "the model is still loading; retry shortly",
            "server_error",
            code="model_not_ready",
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(Cancelled)
    async def _cancelled(request, e: Cancelled):
        return Response(status_code=CLIENT_CLOSED)

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):
        log.exception("%s: unexpected error", request.scope.get("state", {}).get("request_id"))
        return _error(500, f"internal error ({type(e).__name__}); see the server log", "server_error")

    # -- helpers ----------------------------------------------------------

    def check_model(model: str | None) -> None:
        if model is not None and model != name:
            raise RequestError(
                f"model {model!r} is not served here; this server serves {name!r} (GET /v1/models)",
                status=404,
                param="model",
                code="model_not_found",
            )

    def check_prompt(p, text: str, param: str = "prompt") -> None:
        try:
            check_text(param, text)
        except InvalidInputError as e:
            raise RequestError(str(e), param=param, code="invalid_value") from None
        if len(text) > limits.max_prompt_tokens * MAX_CHARS_PER_TOKEN:  # refused before tokenising
            raise RequestError(
                f"{param} is {len(text)} characters, more than {limits.max_prompt_tokens} tokens can hold "
                "(openbagel serve --max-prompt-tokens)",
                param=param,
                code="prompt_too_long",
            )
        n = len(p.tokenizer.encode(text))
        if n > limits.max_prompt_tokens:
            raise RequestError(
                f"{param} is {n} tokens; the server's limit is {limits.max_prompt_tokens} (openbagel serve --max-prompt-tokens)",
                param=param,
                code="prompt_too_long",
            )

    def image_kwargs(p, body: _ImageKnobs, defaults) -> dict[str, Any]:
        check_model(body.model)
        if body.response_format == "url":
            raise RequestError(
                "response_format 'url' is not supported (the server keeps no files); use b64_json",
                param="response_format",
                code="invalid_value",
            )
        if body.n > limits.max_n:
            raise RequestError(f"n must be at most {limits.max_n}", param="n", code="invalid_value")
        if body.num_inference_steps is not None and body.num_inference_steps > limits.max_steps:
            raise RequestError(
                f"num_inference_steps must be at most {limits.max_steps}",
                param="num_inference_steps",
                code="invalid_value",
            )
        height = width = None
        if body.size is not None and body.size != "auto":
            width, height = parse_size(body.size)
        interval = tuple(body.cfg_interval) if body.cfg_interval is not None else None
        kw = dict(
            height=height, width=width, num_timesteps=body.num_inference_steps,
            guidance_scale=body.guidance_scale, image_guidance_scale=body.image_guidance_scale,
            timestep_shift=body.timestep_shift, cfg_interval=interval,
            cfg_renorm_type=body.cfg_renorm_type, cfg_renorm_min=body.cfg_renorm_min,
        )  # fmt: skip
        try:  # every setting checked before the request queues
            p.image_settings(defaults, **{**kw, "seed": 0})
        except InvalidInputError as e:
            raise RequestError(str(e), param=_param_of(str(e)), code="invalid_value") from None
        return kw

    def seeds(body: _ImageKnobs) -> list[int]:
        base = body.seed if body.seed is not None else secrets.randbelow(2**31)
        return [(base + i) % 2**63 for i in range(body.n)]  # n different images, never n copies

    def encode(image, fmt: str) -> str:
        buf = io.BytesIO()
        image.save(buf, format={"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt])
        return base64.b64encode(buf.getvalue()).decode("ascii")

    def image_response(results, used_seeds, body: _ImageKnobs) -> dict:
        data = []
        for r, s in zip(results, used_seeds):
            item = {"b64_json": encode(r.image, body.output_format), "seed": s}
            if body.think:
                item["reasoning_content"] = r.reasoning
            data.append(item)
        return {"created": int(time.time()), "data": data, "output_format": body.output_format}

    # -- routes -----------------------------------------------------------

    @app.get("/health")
    async def health():
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        """Readiness: 200 once the model is loaded, 503 while loading or after a failed load."""
        if engine.ready:
            return {"status": "ready", "model": name}
        if engine.load_error:
            return JSONResponse({"status": "failed", "error": engine.load_error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})

    @app.get("/metrics")
    async def prometheus():
        """Prometheus text format."""
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "openbagel"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        check_model(model_id)
        return model_card()

    @app.post("/v1/images/generations")
    async def images_generations(body: ImageGenerationRequest, request: Request):
        """Text to image: ``n`` images with seeds ``seed, seed+1, ...`` (random when no seed)."""
        p = engine.require_pipe()
        kw = image_kwargs(p, body, p.config.t2i)
        check_prompt(p, body.prompt)
        request.scope["state"]["prompt_log"] = body.prompt
        used = seeds(body)
        engine.admit()

        def work(job: Job):
            if body.think:  # each image plans on its own
                out = [p.text_to_image(body.prompt, seed=s, think=True, on_step=job.on_step, **kw) for s in used]
            else:  # one batch: every image in each forward
                batch = p.text_to_image(
                    body.prompt, num_images_per_prompt=len(used), seed=used, on_step=job.on_step, **kw
                )
                out = [ImageResult([image]) for image in batch.images]
            metrics.images.inc(len(out))
            return out

        results = await engine.run(work, Job(metrics), request.is_disconnected)
        return image_response(results, used, body)

    @app.post("/v1/images/edits", openapi_extra=_edit_form_schema())
    async def images_edits(request: Request):
        """Edit one or several uploaded images (multipart ``image``/``image[]`` and ``prompt``)."""
        p = engine.require_pipe()
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise RequestError(
                "images/edits takes multipart/form-data (image files and text fields), as OpenAI's API does",
                code="invalid_request",
            )
        form = await request.form(max_files=limits.max_images, max_fields=64, max_part_size=limits.max_body_bytes)
        files = [*form.getlist("image"), *form.getlist("image[]")]
        fields: dict[str, str] = {}
        for key, value in form.multi_items():
            if key in ("image", "image[]"):
                continue
            if key == "mask":
                raise RequestError(
                    "mask is not supported: BAGEL edits follow the instruction over the whole image; leave out mask",
                    param="mask",
                    code="unsupported",
                )
            if not isinstance(value, str):
                raise RequestError(f"{key} must be a text field, not a file", param=key, code="invalid_value")
            if key in fields:
                raise RequestError(f"{key} is given twice", param=key, code="invalid_value")
            fields[key] = value
        try:
            body = ImageEditRequest.model_validate(fields, strict=False)  # form fields are text: "2" is a number here
        except ValidationError as e:
            raise _validation_error(list(e.errors())) from None
        if not files:
            raise RequestError("image is required (a multipart file field)", param="image", code="invalid_value")
        for f in files:
            if not isinstance(f, UploadFile):
                raise RequestError("image must be a file upload, not a text field", param="image", code="invalid_value")
        kw = image_kwargs(p, body, p.config.edit)  # settings checked before any image is decoded
        datas = [await f.read() for f in files]
        uploads = [
            await run_in_threadpool(check_image, d, limits, "image" if len(datas) == 1 else f"image[{i}]")
            for i, d in enumerate(datas)
        ]  # headers only: pixels are decoded once the request holds an engine slot
        check_total_pixels(uploads, limits, "image")
        from openbagel.pipeline import style_instruction

        try:
            instruction = style_instruction(body.prompt, body.style)
        except InvalidInputError as e:
            raise RequestError(
                str(e), param="prompt" if body.style is None else "style", code="invalid_value"
            ) from None
        check_prompt(p, instruction)
        request.scope["state"]["prompt_log"] = instruction
        used = seeds(body)
        engine.admit()

        def work(job: Job):
            images = [u.decode() for u in uploads]
            if body.think:  # each image plans on its own
                out = [
                    p.edit(images[0], instruction, images=images[1:], seed=s, think=True, on_step=job.on_step, **kw)
                    for s in used
                ]
            else:  # one batch: every image in each forward
                batch = p.edit(
                    images[0], instruction, images=images[1:], num_images_per_prompt=len(used), seed=used,
                    on_step=job.on_step, **kw,
                )  # fmt: skip
                out = [ImageResult([image]) for image in batch.images]
            metrics.images.inc(len(out))
            return out

        results = await engine.run(work, Job(metrics), request.is_disconnected)
        return image_response(results, used, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        """Answers about images and text; ``stream`` for server-sent events, ``reasoning`` for thinking."""
        p = engine.require_pipe()
        check_model(body.model)
        think = body.think
        turns, system, texts = await _read_messages(body, limits)
        check_prompt(p, "\n".join(texts), "messages")
        request.scope["state"]["prompt_log"] = texts[-1] if texts else ""
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is not None and max_tokens > limits.max_tokens:
            which = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
            raise RequestError(f"{which} must be at most {limits.max_tokens}", param=which, code="invalid_value")
        do_sample = (body.temperature or 0) > 0
        try:
            params = p.text_sampling(max_tokens, do_sample, body.temperature or None, body.top_p, think=think)
        except InvalidInputError as e:
            raise RequestError(str(e), code="invalid_value") from None
        cid = "chatcmpl-" + secrets.token_hex(12)
        now = int(time.time())
        engine.admit()

        def start(job: Job):
            from openbagel.pipeline import THINK_UNDERSTAND_PROMPT, make_generator

            prompt = "\n\n".join(([THINK_UNDERSTAND_PROMPT] if think else []) + system) or None
            chat = p.chat(prompt)
            for role, items in turns:
                if role == "assistant":
                    chat.add_answer("".join(items))
                    continue
                for item in items:
                    if isinstance(item, str):
                        chat.add_text(item)
                    else:  # decoded here, holding an engine slot: a queued request holds only its bytes
                        chat.add_image(item.decode(), vae=False)
            prompt_tokens = chat.session.full.cache.length
            pieces = chat.reply_stream(params, make_generator(body.seed), remember=False, on_token=job.on_token)
            return prompt_tokens, pieces

        def finish_reason(job: Job) -> str:
            return "length" if job.tokens >= params.max_new_tokens else "stop"

        def usage(prompt_tokens: int, job: Job) -> dict:
            return {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": job.tokens,
                "total_tokens": prompt_tokens + job.tokens,
            }

        job = Job(metrics)
        if not body.stream:

            def work(job: Job):
                prompt_tokens, pieces = start(job)
                return prompt_tokens, "".join(pieces)

            prompt_tokens, text = await engine.run(work, job, request.is_disconnected)
            message: dict[str, Any] = {"role": "assistant"}
            if think:
                reasoning, answer = split_reasoning(text)  # as understand(think=True) splits it
                message.update(content=answer, reasoning_content=reasoning)
            else:
                message["content"] = text.strip()
            return {
                "id": cid, "object": "chat.completion", "created": now, "model": name,
                "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(job)}],
                "usage": usage(prompt_tokens, job),
            }  # fmt: skip

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def stream_work(job: Job):
            prompt_tokens, pieces = start(job)
            for piece in pieces:
                loop.call_soon_threadsafe(queue.put_nowait, piece)
            return prompt_tokens

        task = asyncio.ensure_future(engine.run(stream_work, job))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            c = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": name,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}  # fmt: skip
            return f"data: {json.dumps(c)}\n\n"

        async def events() -> AsyncIterator[str]:
            splitter = ReasoningSplitter() if think else None
            get = None
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    get = asyncio.ensure_future(queue.get())
                    await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
                    if not get.done():
                        get.cancel()
                        pieces = []
                        while not queue.empty():
                            pieces.append(queue.get_nowait())
                    else:
                        pieces = [get.result()]
                    for piece in pieces:
                        for kind, text in splitter.feed(piece) if splitter else [("content", piece)]:
                            yield chunk({"reasoning_content" if kind == "reasoning" else "content": text})
                    if task.done() and queue.empty():
                        break
                prompt_tokens = task.result()
                for kind, text in splitter.flush() if splitter else []:
                    yield chunk({"reasoning_content" if kind == "reasoning" else "content": text})
                yield chunk({}, finish_reason(job))
                if include_usage:
                    c = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": name,
                         "choices": [], "usage": usage(prompt_tokens, job)}  # fmt: skip
                    yield f"data: {json.dumps(c)}\n\n"
            except (InvalidInputError, RequestError, NumericalError) as e:
                yield f"data: {json.dumps(error_body(str(e), 'invalid_request_error'))}\n\n"
            except Exception as e:
                log.exception("stream failed")
                yield f"data: {json.dumps(error_body(f'internal error ({type(e).__name__})', 'server_error'))}\n\n"
            except BaseException:  # cancelled or closed: the client went away
                request.scope["state"]["stream_cut"] = True
                raise
            finally:
                if get is not None and not get.done():
                    get.cancel()
                if not task.done():  # stop at the next token
                    job.cancel()
                    task.cancel()
                task.add_done_callback(_quiet)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    if settings.ui:
        import gradio as gr

        from openbagel.ui import ModelHandle, build_ui

        blocks = build_ui(settings.model, handle=ModelHandle(engine.model))  # the server's model, loaded once
        key = settings.api_key
        # with an API key, the UI asks for it as the password of a sign-in page (any user name)
        auth = (lambda user, password: hmac.compare_digest(password.encode(), key.encode())) if key else None
        app = gr.mount_gradio_app(
            app, blocks.queue(), path="/ui", footer_links=[], auth=auth, max_file_size=settings.limits.max_body_bytes,
            auth_message="Sign in with the server's API key as the password (any user name).",
        )  # fmt: skip
    return app


def _quiet(task: asyncio.Future) -> None:
    """Collect a finished task's outcome, so that asyncio does not report it as never retrieved."""
    if not task.cancelled():
        task.exception()


#: Characters one token can hold at most, for refusing a huge prompt before tokenising it.
MAX_CHARS_PER_TOKEN = 32
#: Python argument names -> the HTTP field names that carry them.
_FIELDS = {
    "num_timesteps": "num_inference_steps", "image_guidance_scale": "image_guidance_scale",
    "guidance_scale": "guidance_scale", "timestep_shift": "timestep_shift", "cfg_interval": "cfg_interval",
    "cfg_renorm_type": "cfg_renorm_type", "cfg_renorm_min": "cfg_renorm_min", "height": "size", "width": "size",
}  # fmt: skip


def _param_of(message: str) -> str | None:
    """The HTTP field a pipeline error message is about (the first field name it mentions)."""
    found = [(message.find(k), v) for k, v in _FIELDS.items() if k in message]
    return min(found)[1] if found else None


async def _read_messages(body: ChatRequest, limits) -> tuple[list[tuple[str, list]], list[str], list[str]]:
    """Chat messages -> ``(turns, system texts, all texts)``; turns are ``(role, [text | Upload])``,
    images checked from their headers but not decoded.

    Raises:
        RequestError: system messages after the conversation started, an empty
            conversation, a last message that is not the user's, images in
            assistant or system messages, too many images, bad image URLs, more
            than ``limits.max_image_pixels`` pixels over all images.
    """
    turns: list[tuple[str, list]] = []
    system: list[str] = []
    texts: list[str] = []
    uploads: list[Upload] = []
    for i, m in enumerate(body.messages):
        if m.content is None or m.content == [] or (m.role == "user" and m.content == ""):
            raise RequestError(f"messages[{i}].content is empty", param=f"messages[{i}].content", code="invalid_value")
        parts = [m.content] if isinstance(m.content, str) else list(m.content)
        items: list = []
        for j, part in enumerate(parts):
            where = f"messages[{i}].content" + ("" if isinstance(m.content, str) else f"[{j}]")
            if isinstance(part, str):
                items.append(part)
            elif part.type == "text":
                if part.text is None:
                    raise RequestError(f"{where}.text is required for a text part", param=where, code="invalid_value")
                items.append(part.text)
            else:
                if m.role != "user":
                    raise RequestError(
                        f"{where}: only user messages may hold images", param=where, code="invalid_value"
                    )
                if part.image_url is None:
                    raise RequestError(
                        f"{where}.image_url is required for an image_url part", param=where, code="invalid_value"
                    )
                if len(uploads) == limits.max_images:
                    raise RequestError(
                        f"at most {limits.max_images} images per request", param=where, code="invalid_value"
                    )
                upload = await run_in_threadpool(check_data_url, part.image_url.url, limits, f"{where}.image_url")
                uploads.append(upload)
                items.append(upload)
        texts += [t for t in items if isinstance(t, str)]
        if m.role in ("system", "developer"):
            if turns:
                raise RequestError(
                    f"messages[{i}]: system messages must come before the conversation",
                    param=f"messages[{i}]",
                    code="invalid_value",
                )
            system.append("".join(items))
        else:
            turns.append((m.role, items))
    if not turns or turns[-1][0] != "user":
        raise RequestError("the last message must be the user's", param="messages", code="invalid_value")
    check_total_pixels(uploads, limits, "messages")
    return turns, system, texts
