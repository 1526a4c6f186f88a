"""Serve a fine-tuned GLM model over an OpenAI-compatible API: POST /v1/chat/completions and GET /v1/models.

    python serve.py --adapter output/demo                          # http://127.0.0.1:8000/v1
    python serve.py --model output/glm4-export --port 8080         # a full fine-tune or an exported directory
    python serve.py --adapter output/demo --api_key sk-local       # clients send Authorization: Bearer sk-local
    python serve.py --adapter output/demo --host 0.0.0.0 --api_key sk-local   # reachable from other machines

Any OpenAI client works against it (base_url http://127.0.0.1:8000/v1). Replies are rendered with the template and
stop ids the model was trained with; a request with `tools` gets its calls back as `tool_calls` (finish_reason
"tool_calls"), parsed by the family's own parser, the one chat_cli uses. A thinking family's reasoning comes apart
from the answer, as `reasoning_content`; `chat_template_kwargs` ({"enable_thinking": false}) reach the template.
One model in one process: requests wait in a queue and one thread that owns the model answers them in turn. A
request that cannot be served (bad JSON, an unknown role, a prompt longer than the context, a tool result with no
call) gets a 400 with an OpenAI error body.
"""

import argparse
import asyncio
import contextlib
import hmac
import json
import os
import queue
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from glm_sft import exit_on_user_error
from glm_sft.inference import add_model_arguments, check_model_arguments, encode_prompt, load_from_arguments
from glm_sft.template import CONTROL_TOKENS
from glm_sft.tools import call_or_text, canonical_tools, json_type_name, parse_arguments, tool_call

API_KEY_VARIABLE = "GLM_SFT_API_KEY"
ROLES = ("system", "developer", "user", "assistant", "tool")  # developer: OpenAI's newer name for system
TOOL_CHOICES = ("auto", "none")


# ---------------------------------------------------------------------------------------------------------------
# Requests: OpenAI's chat completion body -> our canonical conversation and generation settings.


class RequestError(Exception):
    """A request the server cannot serve: answered with `status` and an OpenAI error body."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code
        self.kind = {401: "authentication_error", 404: "not_found_error"}.get(status, "invalid_request_error")
        if status >= 500:
            self.kind = "server_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    messages: list[dict]  # canonical rows (glm_sft's data model): tool call arguments as objects
    tools: list[dict] | None
    parse_calls: bool  # tools given and tool_choice "auto": a reply that calls a function becomes tool_calls
    max_tokens: int | None
    temperature: float
    top_p: float
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    template_kwargs: dict = field(default_factory=dict)  # chat_template_kwargs: the template's switches


def parse_chat_request(body, *, temperature: float, top_p: float) -> ChatRequest:
    """The request a chat completion body asks for; RequestError on the first thing that is wrong with it.
    `temperature` and `top_p` are the server's defaults for a body that does not set them."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body is a JSON {json_type_name(body)}; expected an object")
    given = {key: value for key, value in body.items() if value is not None}
    if "messages" not in given:
        raise RequestError('"messages" is required: a list of {"role", "content"} objects', "messages")
    if given.get("n", 1) != 1:
        raise RequestError('"n" must be 1: one model answers one choice per request', "n")
    if given.get("logprobs") is True:
        raise RequestError('"logprobs" is not supported by this server', "logprobs")
    tools = None
    if given.get("tools"):
        tools, problems = canonical_tools(given["tools"], '"tools"')
        if problems:
            raise RequestError(problems[0], "tools")
    tool_choice = given.get("tool_choice", "auto")
    if tool_choice not in TOOL_CHOICES:
        raise RequestError(
            f'"tool_choice" {json.dumps(tool_choice, ensure_ascii=False)} is not supported; use "auto" or "none"',
            "tool_choice",
        )
    if tool_choice == "none":
        tools = None  # the model is not shown the tools, so it cannot call them
    stream = _boolean(given, "stream", False)
    stream_options = given.get("stream_options", {})
    if not isinstance(stream_options, dict):
        raise RequestError('"stream_options" must be an object such as {"include_usage": true}', "stream_options")
    if "max_completion_tokens" in given and "max_tokens" in given:
        raise RequestError('give "max_tokens" or "max_completion_tokens", not both', "max_tokens")
    max_tokens_key = "max_completion_tokens" if "max_completion_tokens" in given else "max_tokens"
    template_kwargs = given.get("chat_template_kwargs", {})
    if not isinstance(template_kwargs, dict):
        raise RequestError(
            '"chat_template_kwargs" must be an object such as {"enable_thinking": false}', "chat_template_kwargs"
        )
    _boolean(template_kwargs, "enable_thinking", True, where="chat_template_kwargs.")
    return ChatRequest(
        messages=canonical_messages(given["messages"]),
        tools=tools,
        parse_calls=tools is not None,
        max_tokens=_integer(given, max_tokens_key, None, minimum=1),
        temperature=_number(given, "temperature", temperature, 0.0, 2.0, "between 0 (greedy) and 2"),
        top_p=_number(given, "top_p", top_p, 0.0, 1.0, "above 0 and at most 1", low_open=True),
        stop=_stop_strings(given.get("stop")),
        seed=_integer(given, "seed", None, minimum=-(2**63), maximum=2**64 - 1),
        stream=stream,
        include_usage=stream and _boolean(stream_options, "include_usage", False, where="stream_options."),
        template_kwargs=template_kwargs,
    )


def _boolean(values: dict, key: str, default: bool, where: str = "") -> bool:
    value = values.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f'"{where}{key}" must be true or false, not {json_type_name(value)}', f"{where}{key}")
    return value


def _integer(values: dict, key: str, default, *, minimum: int, maximum: int | None = None):
    if key not in values:
        return default
    value = values[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f'"{key}" must be an integer, not {json_type_name(value)}', key)
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise RequestError(f'"{key}" is {value}; it must be {bounds}', key)
    return value


def _number(values: dict, key: str, default: float, low: float, high: float, bounds: str, low_open=False) -> float:
    if key not in values:
        return default
    value = values[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(f'"{key}" must be a number, not {json_type_name(value)}', key)
    if value > high or value < low or (low_open and value == low):
        raise RequestError(f'"{key}" is {value}; it must be {bounds}', key)
    return float(value)


def _stop_strings(value) -> list[str]:
    if value is None:
        return []
    strings = [value] if isinstance(value, str) else value
    if not isinstance(strings, list) or not all(isinstance(text, str) and text for text in strings):
        raise RequestError('"stop" must be a non-empty string or a list of non-empty strings', "stop")
    return strings


def canonical_messages(messages) -> list[dict]:
    """OpenAI chat messages as glm_sft's canonical rows: system/user/assistant/tool messages with string content,
    assistant `tool_calls` with the arguments as objects and `reasoning_content` (a thinking family's reasoning) kept,
    and each call's result right after it, in the calls' order (matched by tool_call_id when the results name one)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError('"messages" must be a non-empty list of {"role", "content"} objects', "messages")
    rows, waiting = [], []  # waiting: the calls of the last assistant message that have no result yet
    results: list[tuple[int, dict]] = []  # (index of the call answered, result row) for the waiting calls
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} is a JSON {json_type_name(message)}; expected an object", where)
        role = message.get("role")
        if role not in ROLES:
            shown = f"role {json.dumps(role, ensure_ascii=False)}" if "role" in message else "no role"
            raise RequestError(f"{where} has {shown}; expected one of {', '.join(ROLES)}", f"{where}.role")
        if role == "tool":
            if not waiting:
                raise RequestError(f"{where} is a tool result with no call before it", where)
            answered = _answered_call(message, waiting, results, where)
            results.append((answered, {"role": "tool", "content": _text(message, where, required=True)}))
            if len(results) == len(waiting):
                rows += [row for _, row in sorted(results, key=lambda pair: pair[0])]
                waiting, results = [], []
            continue
        if waiting:
            answered = {index for index, _ in results}
            missing = ", ".join(
                call["id"] or call["function"]["name"] for index, call in enumerate(waiting) if index not in answered
            )
            raise RequestError(
                f"{where} follows tool calls that have no result ({missing}); send a tool message for each call",
                where,
            )
        if role == "assistant" and message.get("tool_calls"):
            waiting = _calls(message["tool_calls"], f"{where}.tool_calls")
            content = _text(message, where, required=False)
            row = {"role": "assistant", "content": content, "tool_calls": [call["row"] for call in waiting]}
        else:
            row = {"role": "system" if role == "developer" else role, "content": _text(message, where, True)}
        if role == "assistant" and message.get("reasoning_content") is not None:
            reasoning = message["reasoning_content"]
            if not isinstance(reasoning, str):
                raise RequestError(
                    f"{where} has reasoning_content of type {json_type_name(reasoning)}; expected a string",
                    f"{where}.reasoning_content",
                )
            _reject_control_tokens(reasoning, where)
            row["reasoning_content"] = reasoning
        rows.append(row)
    if waiting:
        raise RequestError(
            f"the last message calls {', '.join(call['function']['name'] for call in waiting)}; send the results as "
            "tool messages to get an answer",
            "messages",
        )
    return rows


def _answered_call(message: dict, waiting: list[dict], results: list, where: str) -> int:
    """The index (in `waiting`) of the call a tool message answers: the one its tool_call_id names, else the
    first one not answered yet."""
    answered = {index for index, _ in results}
    call_id = message.get("tool_call_id")
    if call_id is not None and any(call["id"] for call in waiting):
        for index, call in enumerate(waiting):
            if call["id"] == call_id and index not in answered:
                return index
        raise RequestError(
            f"{where} answers tool_call_id {json.dumps(call_id, ensure_ascii=False)}, which is not a call waiting "
            "for its result",
            f"{where}.tool_call_id",
        )
    return next(index for index in range(len(waiting)) if index not in answered)


def _calls(value, where: str) -> list[dict]:
    """An assistant message's tool_calls: [{"id", "function": {"name"}, "row": the canonical call}]."""
    if not isinstance(value, list):
        raise RequestError(f"{where} is a JSON {json_type_name(value)}; expected a list of calls", where)
    calls = []
    for number, call in enumerate(value):
        here = f"{where}[{number}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise RequestError(f'{here} must be {{"type": "function", "function": {{"name", "arguments"}}}}', here)
        arguments, problem = parse_arguments(function.get("arguments", {}))
        if problem:
            raise RequestError(f"{here}: the arguments of {function['name']} {problem}", f"{here}.function.arguments")
        _reject_control_tokens(function["name"] + json.dumps(arguments, ensure_ascii=False), here)
        calls.append({"id": call.get("id"), "function": function, "row": tool_call(function["name"], arguments)})
    return calls


def _text(message: dict, where: str, required: bool) -> str:
    """A message's content as text: a string, or a list of text parts (joined); null only where not required."""
    content = message.get("content")
    if content is None and not required:
        return ""
    if isinstance(content, list):
        if not all(isinstance(part, dict) and part.get("type") == "text" for part in content):
            raise RequestError(f"{where}.content: only text parts are supported", f"{where}.content")
        content = "".join(str(part.get("text", "")) for part in content)
    if not isinstance(content, str):
        shown = "no content" if "content" not in message else f"content of type {json_type_name(content)}"
        raise RequestError(f"{where} has {shown}; expected a string", f"{where}.content")
    _reject_control_tokens(content, where)
    return content


def _reject_control_tokens(text: str, where: str) -> None:
    token = next((token for token in CONTROL_TOKENS if token in text), None)
    if token:
        raise RequestError(f"{where} contains the control token {token}, which would change the chat format", where)


# ---------------------------------------------------------------------------------------------------------------
# Generation: one thread owns the model and answers queued requests one at a time.


class ReplyText:
    """Pieces of a streamed reply, passed on as they may be sent: cut at the first stop string (a piece that could
    be the start of one is held back until it is known not to be) and without the trailing whitespace, which is
    sent only once more text follows. So the streamed pieces join to exactly the non-streamed reply."""

    def __init__(self, stop_strings: list[str]):
        self.stop_strings = stop_strings
        self.held = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self.held + piece
        found = [text.find(stop) for stop in self.stop_strings if stop in text]
        if found:
            self.stopped, self.held = True, ""
            return text[: min(found)].rstrip()
        partial = max((self._partial_stop(text, stop) for stop in self.stop_strings), default=0)
        cut = len(text[: len(text) - partial].rstrip())
        self.held = text[cut:]
        return text[:cut]

    def finish(self) -> str:
        """What was held back, once the reply has ended: the start of a stop string that never came, not the
        trailing whitespace."""
        held, self.held = self.held, ""
        return "" if self.stopped else held.rstrip()

    @staticmethod
    def _partial_stop(text: str, stop: str) -> int:
        """The length of the longest end of `text` that begins `stop`."""
        return next((size for size in range(min(len(stop) - 1, len(text)), 0, -1) if stop.startswith(text[-size:])), 0)


@dataclass
class Event:
    kind: str  # "started" (prompt_tokens), "text" / "reasoning" (a piece), "call" (name, arguments), "done", "error"
    value: object = None


class Job:
    """One request on its way through the worker; its events arrive on the event loop's queue."""

    def __init__(self, request: ChatRequest, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.loop = loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()  # the client went away: generation stops at the next token

    def emit(self, kind: str, value=None) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody is listening
            self.loop.call_soon_threadsafe(self.events.put_nowait, Event(kind, value))


class ModelWorker:
    """The one thread that touches the model and its tokenizer; jobs run in the order they were submitted."""

    def __init__(self, chat, max_new_tokens: int):
        self.chat = chat
        self.max_new_tokens = max_new_tokens
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self.serve_jobs, name="model-worker", daemon=True)
        self.thread.start()

    def submit(self, request: ChatRequest) -> Job:
        job = Job(request, asyncio.get_running_loop())
        self.jobs.put(job)
        return job

    def close(self) -> None:
        self.jobs.put(None)

    def serve_jobs(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set():
                continue
            try:
                self.answer(job)
            except RequestError as error:
                job.emit("error", error)
            except Exception:  # a bug, not the request: report it, keep serving
                traceback.print_exc()
                job.emit("error", RequestError("the server failed to generate a reply; see its log", status=500))

    def answer(self, job: Job) -> None:
        import torch

        request, chat = job.request, self.chat
        messages = [dict(message) for message in request.messages]
        switches = chat.switches(request.template_kwargs)
        prompt = encode_prompt(chat.tokenizer, messages, request.tools, switches)  # the one inference path's prompt
        room = chat.context - len(prompt)  # what the context leaves for the reply
        max_new_tokens = request.max_tokens or min(self.max_new_tokens, room)
        if max_new_tokens > room or room < 1:
            asked = f", and max_tokens asks for {max_new_tokens} more" if request.max_tokens else ""
            raise RequestError(
                f"this model's maximum context length is {chat.context} tokens; the messages take {len(prompt)}"
                f"{asked}: shorten the messages" + (" or lower max_tokens" if request.max_tokens else ""),
                "messages",
                code="context_length_exceeded",
            )
        job.emit("started", len(prompt))
        if request.seed is not None:
            torch.manual_seed(request.seed)
        settings = dict(
            max_new_tokens=max_new_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            template_kwargs=request.template_kwargs,
        )
        usage = {}
        reply = ReplyText(request.stop)  # stop strings cut the answer, not the reasoning
        if request.parse_calls:
            parsed = call_or_text(chat, messages, request.tools, usage=usage, **settings)
            if parsed.reasoning:
                job.emit("reasoning", parsed.reasoning)
            if text := reply.feed(parsed.content):
                job.emit("text", text)
            for call in parsed.calls:
                job.emit("call", call)
            if parsed.calls:
                usage["finish_reason"] = "tool_calls"
        else:
            client_left = False
            parts = chat.stream_parts(messages, stop=job.cancelled, usage=usage, **settings)
            with contextlib.closing(parts) as pieces:
                for kind, piece in pieces:
                    if kind == "reasoning":
                        job.emit("reasoning", piece)
                    elif text := reply.feed(piece):
                        job.emit("text", text)
                    client_left = job.cancelled.is_set()
                    if reply.stopped or client_left:
                        break
            if client_left:
                done = usage.get("completion_tokens", 0)
                print(f"a client left mid-reply: stopped after {done} of {max_new_tokens} tokens", file=sys.stderr)
        if text := reply.finish():
            job.emit("text", text)
        if reply.stopped and usage.get("finish_reason") != "tool_calls":
            usage["finish_reason"] = "stop"
        job.emit("done", usage)


# ---------------------------------------------------------------------------------------------------------------
# The HTTP API.


def create_app(
    chat,
    *,
    served_name: str | None = None,
    api_key: str | None = None,
    max_new_tokens: int = 512,
    temperature: float = 0.8,
    top_p: float = 0.8,
):
    """The FastAPI app serving `chat` (a glm_sft.inference.ChatModel)."""
    served_name = served_name or chat.name
    created = int(time.time())
    worker = ModelWorker(chat, max_new_tokens)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        worker.close()

    app = FastAPI(title="glm-sft", lifespan=lifespan, docs_url=None, redoc_url=None)

    def error_response(error: RequestError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestError)
    async def request_error(request, error: RequestError):
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):
        message = f"{request.method} {request.url.path}: {error.detail}"
        return error_response(RequestError(message, status=error.status_code))

    @app.middleware("http")
    async def require_api_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
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
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RequestError(f"the request body is not valid JSON ({error})") from None
        chat_request = parse_chat_request(body, temperature=temperature, top_p=top_p)
        job = worker.submit(chat_request)
        try:
            first = await job.events.get()  # the prompt fits (started) or not (error); waits its turn in the queue
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        if first.kind == "error":
            return error_response(first.value)
        completion = Completion(served_name, prompt_tokens=first.value, thinking=chat.thinks)
        if chat_request.stream:
            return JobStream(completion.chunks(job, chat_request.include_usage), job)
        try:
            while (event := await job.events.get()).kind not in ("done", "error"):
                completion.add(event)
        finally:
            job.cancelled.set()
        if event.kind == "error":
            return error_response(event.value)
        return completion.response(event.value)

    return app


class JobStream(StreamingResponse):
    """Server-sent events; when the response ends for any reason (done, client gone), the job is stopped."""

    def __init__(self, content, job: Job):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:
            pass  # the client hung up: nothing more to send
        finally:
            self.job.cancelled.set()


class Completion:
    """One chat completion as it is generated, written out in the OpenAI API's shapes."""

    def __init__(self, model: str, prompt_tokens: int, thinking: bool = False):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.thinking = thinking  # a thinking family: the message carries reasoning_content (null when none)
        self.text = ""
        self.reasoning = ""
        self.calls = []

    def add(self, event: Event) -> dict:
        """Take a text or call event; returns the chunk delta that stands for it."""
        if event.kind == "call":
            function = {
                "name": event.value["name"],
                "arguments": json.dumps(event.value["arguments"], ensure_ascii=False),
            }
            call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": function}
            self.calls.append(call)
            return {"tool_calls": [{"index": len(self.calls) - 1, **call}]}
        if event.kind == "reasoning":
            self.reasoning += event.value
            return {"reasoning_content": event.value}
        self.text += event.value
        return {"content": event.value}

    def usage(self, generated: dict) -> dict:
        completion_tokens = generated.get("completion_tokens", 0)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def response(self, generated: dict) -> dict:
        message = {"role": "assistant", "content": (self.text or None) if self.calls else self.text}
        if self.thinking:
            message["reasoning_content"] = self.reasoning or None
        if self.calls:
            message["tool_calls"] = self.calls
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": generated["finish_reason"]}
        return {**self.head("chat.completion"), "choices": [choice], "usage": self.usage(generated)}

    def chunk(self, delta: dict, finish_reason=None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self.event({**self.head("chat.completion.chunk"), "choices": [choice]})

    @staticmethod
    def event(data) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def chunks(self, job: Job, include_usage: bool):
        """The server-sent events of a streamed completion: the role, each piece (or the call), the finish reason,
        the usage when asked for, then [DONE]."""
        yield self.chunk({"role": "assistant", "content": ""})
        while (event := await job.events.get()).kind not in ("done", "error"):
            if delta := self.add(event):
                yield self.chunk(delta)
        if event.kind == "error":
            yield self.event(event.value.body())
        else:
            yield self.chunk({}, event.value["finish_reason"])
            if include_usage:
                yield self.event(
                    {**self.head("chat.completion.chunk"), "choices": [], "usage": self.usage(event.value)}
                )
        yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------------------------
# The command.


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: any free port)")
    parser.add_argument(
        "--api_key",
        "--api-key",
        default=None,
        help=f"require Authorization: Bearer KEY (default: ${API_KEY_VARIABLE})",
    )
    parser.add_argument(
        "--served_model_name", "--served-model-name", help="the model id clients see (default: --adapter or --model)"
    )
    parser.add_argument(
        "--max_new_tokens", "--max-new-tokens", type=int, default=512, help="reply length when max_tokens is not set"
    )
    parser.add_argument("--temperature", type=float, default=0.8, help="when a request sets none; 0 means greedy")
    parser.add_argument("--top_p", "--top-p", type=float, default=0.8, help="when a request sets none")
    args = parser.parse_args(argv)
    check_model_arguments(parser, args)
    if not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    if args.api_key is None:
        args.api_key = os.environ.get(API_KEY_VARIABLE) or None
    return args


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    chat = load_from_arguments(args)
    app = create_app(
        chat,
        served_name=args.served_model_name,
        api_key=args.api_key,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
    )

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                shown = f"[{host}]" if ":" in host else host
                key = "API key required" if args.api_key else "no API key"
                print(f"serving {chat.name} ({chat.family}) at http://{shown}:{port}/v1 ({key})", flush=True)
                if not args.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
                    print(f"warning: listening on {args.host} with no API key: anyone who reaches it can use it")

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    AnnouncingServer(config).run()  # a port in use ends it with one uvicorn error line and a non-zero exit


if __name__ == "__main__":
    main()
