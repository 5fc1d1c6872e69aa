"""The FastAPI app of `bertforge serve`: routes, limits, errors, the page.

    app = create_app({"minilm": bertforge.load("all-MiniLM-L6-v2")}, ServeSettings(api_key="s3cret"))

Routes: `POST /v1/embeddings` (OpenAI-compatible, float and base64), `/similarity`, `/rerank`,
`/fill-mask`, `/classify`, `/qa`, `/inspect`, `/tokenize`; `GET /info`, `/health`, `/metrics`, `/`
(the page) and FastAPI's `/docs`. Model work goes through one `Batcher` per model (dynamic batching)
and runs on one compute thread shared by all models; the handlers only tokenize and format.

Errors are OpenAI-shaped `{"error": {"message", "type", "code"}}`: 400 a model without the needed head
(the message names its head), 401 a missing/wrong Bearer key, 404 an unknown model, 413 a body, list
or text over the limits, 415 a body that is not JSON, 422 invalid or empty input (or too long with
`truncate: false`), 503 + Retry-After a full queue. `Guard` (ASGI middleware) applies auth, the body
limit and the content type before any parsing, and records every request in the metrics.
"""

from __future__ import annotations

import hmac
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException

from bertforge._version import __version__
from bertforge.api import Model
from bertforge.serve.core import ApiError, Server, ServeSettings, error_response
from bertforge.serve.routes import router

log = logging.getLogger("bertforge.serve")
OPEN_PATHS = ("/health", "/", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/favicon.ico")


# ----------------------------------------------------------------------------- middleware


class Guard:
    """Auth, body size, content type and metrics, before FastAPI parses anything (pure ASGI)."""

    def __init__(self, app, server: Server) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            problem = self.check(scope)
            if problem is None and scope["method"] in ("POST", "PUT", "PATCH"):
                body, problem = await self.read_body(receive)
                if problem is None:
                    receive = _replay(body, receive)
            if problem is not None:
                return await error_response(*problem)(scope, receive, send_status)
            await self.app(scope, receive, send_status)
        finally:
            route = scope["path"] if scope["path"] in self.server.paths else "other"
            self.server.metrics.observe_request(route, scope["method"], status[0], time.perf_counter() - start)

    def check(self, scope) -> tuple | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key = self.server.settings.api_key
        if key and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            given = headers.get("authorization", "")
            if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), key.encode())):
                return 401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'", \
                    {"WWW-Authenticate": "Bearer"}
        limit = self.server.settings.max_body_bytes
        if headers.get("content-length", "0").isdigit() and int(headers.get("content-length", "0")) > limit:
            return 413, f"request body over {limit:,} bytes: send fewer or shorter texts per request", None
        if scope["method"] == "POST" and not headers.get("content-type", "").startswith("application/json"):
            return 415, "the request body must be JSON: send 'Content-Type: application/json'", None
        return None

    async def read_body(self, receive) -> tuple[bytes, tuple | None]:
        chunks, size, limit = [], 0, self.server.settings.max_body_bytes
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", (400, "the client went away", None)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", (413, f"request body over {limit:,} bytes: send fewer or shorter texts per request", None)
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks), None


def _replay(body: bytes, receive):
    """A receive() that hands the app the body already read, then passes on the client's messages
    (so a disconnect still reaches the app)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


# ----------------------------------------------------------------------------- the app


def create_app(models: dict[str, Model], settings: ServeSettings | None = None) -> FastAPI:
    """The ASGI app serving `models` (name -> loaded `Model`)."""
    settings = settings or ServeSettings()
    server = Server(models, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for served in server.served.values():
            served.batcher.start()
        for name, served in server.served.items():  # warm-up: one batch per model through the real path
            start = time.perf_counter()
            await server.embed(served, ["bertforge warm-up batch: the quick brown fox."] * 4, True)
            log.info("model %s ready (%s, dim %d, warm-up %.0f ms)", name, served.model.head, served.model.dim,
                     1000 * (time.perf_counter() - start))
        server.ready = True
        if settings.public_url:
            log.info("bertforge serve: the page is at %s  (API docs: %sdocs)", settings.public_url, settings.public_url)
        try:
            yield
        finally:
            server.ready = False
            for served in server.served.values():
                await served.batcher.stop()
            server.executor.shutdown(wait=True)

    app = FastAPI(title="bertforge serve", version=__version__, lifespan=lifespan,
                  description="Embeddings (OpenAI-compatible), similarity, fill-mask, classification and QA "
                              "for BERT models trained or loaded by bertforge.")
    app.state.server = server
    app.include_router(router)

    add_error_handlers(app)
    app = _wrap(app, server, settings)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error as an OpenAI-shaped body: ours, pydantic's (422, naming the field) and routing's."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return error_response(422, f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})")
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        where = loc[0] if loc else "body"  # union members (input.str, input.list[str]) say little: name the field
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        detail = ".".join(loc)
        return error_response(422, f"{where}: {first.get('msg')} ({detail}){more}" if len(loc) > 1
                              else f"{where}: {first.get('msg')}{more}")

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):  # a bug, not a user error: log it, answer one line
        log.exception("error while serving %s %s", request.method, request.url.path)
        return error_response(500, f"internal error ({type(exc).__name__}); the server log has the traceback")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


def _wrap(app: FastAPI, server: Server, settings: ServeSettings):
    server.paths = {getattr(r, "path", None) for r in [*app.routes, *router.routes]}
    app.add_middleware(Guard, server=server)
    if settings.cors_origins:  # outermost, so that errors from Guard carry the CORS headers too
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    return app


__all__ = ["ServeSettings", "create_app"]
