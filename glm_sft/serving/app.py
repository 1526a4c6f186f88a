"""The HTTP API: the FastAPI app that reads requests (glm_sft.serving.requests), hands them to the model's thread
(glm_sft.serving.worker, or .batching) and writes the completions (glm_sft.serving.completions), behind an API key
and a bound on the body's size."""

import contextlib
import hmac
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from glm_sft.serving.batching import BatchingWorker
from glm_sft.serving.completions import Completion
from glm_sft.serving.requests import RequestError, RequestReader
from glm_sft.serving.worker import Job, ModelWorker

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024  # a 128k-token prompt, even as \uXXXX escapes, is well under it


def create_app(
    chat,
    *,
    served_name: str | None = None,
    api_key: str | None = None,
    max_new_tokens: int = 512,
    temperature: float = 0.8,
    top_p: float = 0.8,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_batch_size: int = 1,
):
    """The FastAPI app serving `chat` (a glm_sft.inference.ChatModel). `max_batch_size`: how many replies are generated
    together (1: one at a time, through chat.stream_parts); a model that cannot batch (see
    glm_sft.serving.batching.batching_problem) is answered one at a time whatever it says. The model thread is
    `app.state.worker`: after create_app, no other thread may run the model."""
    served_name = served_name or chat.name
    created = int(time.time())
    reader = RequestReader(chat, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    worker = BatchingWorker(chat, max_batch_size) if max_batch_size > 1 else ModelWorker(chat)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        reader.close()
        worker.close()

    app = FastAPI(title="glm-sft", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker = worker

    @app.exception_handler(RequestError)
    async def request_error(request, error: RequestError):
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):
        message = f"{request.method} {request.url.path}: {error.detail}"
        return error_response(RequestError(message, status=error.status_code))

    @app.exception_handler(Exception)
    async def server_error(request, error: Exception):  # a bug: an OpenAI error body, the traceback in the log
        return error_response(RequestError("the server failed on this request; see its log", status=500))

    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)  # inside the key check: added first

    @app.middleware("http")
    async def require_api_key(request: Request, call_next):
        if api_key and request.url.path != "/health":  # the OpenAPI schema too: nothing else answers without it
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                what = "a wrong API key" if given else "no API key"
                return error_response(
                    RequestError(
                        f"the request has {what}; send the header Authorization: Bearer <key>",
                        status=401,
                        code="invalid_api_key",
                    )
                )
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        card = {"id": served_name, "object": "model", "created": created, "owned_by": "glm-sft"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        worker.check_open()  # a 503 while the server shuts down
        raw = await request.body()  # BodyLimit refuses it past max_request_bytes
        chat_request, prompt = await reader.read(raw)  # a request that will not fit is refused here, not queued
        job = worker.submit(chat_request, prompt)
        streaming = False
        try:
            first = await job.events.get()  # generation has started (or failed); waits its turn in the queue
            if first.kind == "error":
                return error_response(first.value)
            completion = Completion(served_name, prompt_tokens=first.value, thinking=chat.thinks)
            if chat_request.stream:
                streaming = True
                return JobStream(completion.chunks(job, chat_request.include_usage), job, worker)
            while (event := await job.events.get()).kind not in ("done", "error"):
                completion.add(event)
        finally:
            if not streaming:  # a stream's response finishes the job once it is sent
                worker.finish(job)
        if event.kind == "error":
            return error_response(event.value)
        return completion.response(event.value)

    return app


def error_response(error: RequestError) -> JSONResponse:
    # A body refused for its size is not read to its end: the connection closes after the answer.
    headers = {"Connection": "close"} if error.status == 413 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets a 413 with an OpenAI error body, at once when its
    Content-Length says so, else as soon as the bytes received pass it (a chunked upload); nothing past it is read."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def too_large(self) -> RequestError:
        return RequestError(
            f"the request body is larger than this server takes ({self.max_bytes} bytes: its --max_request_bytes)",
            status=413,
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await error_response(self.too_large())(scope, receive, send)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self.too_large()  # answered by the app's RequestError handler
            return message

        await self.app(scope, counting_receive, send)


class JobStream(StreamingResponse):
    """Server-sent events; when the response ends for any reason (done, client gone), the job is stopped."""

    def __init__(self, content, job: Job, worker: ModelWorker):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job, self.worker = job, worker

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:
            pass  # the client hung up: nothing more to send
        finally:
            self.worker.finish(self.job)
