"""Serve a fine-tuned GLM model over an OpenAI-compatible API: POST /v1/chat/completions and GET /v1/models.

    python serve.py --adapter output/demo                          # http://127.0.0.1:8000/v1
    python serve.py --model output/glm4-export --port 8080         # a full fine-tune or an exported directory
    python serve.py --adapter output/demo --api_key sk-local       # clients send Authorization: Bearer sk-local
    python serve.py --adapter output/demo --host 0.0.0.0 --api_key sk-local   # reachable from other machines

Any OpenAI client works against it (base_url http://127.0.0.1:8000/v1). Replies are rendered with the template and
stop ids the model was trained with; a request with `tools` gets its calls back as `tool_calls` (finish_reason
"tool_calls"), parsed by the family's own parser, the one chat_cli uses. A thinking family's reasoning comes apart
from the answer, as `reasoning_content`; `chat_template_kwargs` ({"enable_thinking": false}) reach the template.
One model in one process, owned by one thread. The requests that arrive together are generated together, up to
--max_batch_size (16) at a time, each joining the running batch at the next step and leaving it when its reply ends;
each gets the reply it gets alone, greedy token for token (--max_batch_size 1: one at a time). A request that cannot
be served (bad JSON, an unknown role, a prompt longer than the context, a tool result with no call) gets a 400 with an
OpenAI error body.

On SIGTERM or Ctrl-C the server stops accepting, answers the requests still waiting with a 503, gives the replies being
written --shutdown_timeout seconds (30) to finish and ends the others with an error event and `data: [DONE]`; it exits
with 0 after SIGTERM, 130 after Ctrl-C. A second signal ends the wait at once.

Input is bounded before it costs the model anything: a body over --max_request_bytes (default 4 MiB) gets a 413 as
soon as its Content-Length says so, or as its bytes pass the limit; bodies are read, checked and their prompts counted
on a thread of their own, so a prompt longer than the context gets its 400 without waiting for the model. With
--api_key, every path but /health (the OpenAPI schema included) needs the key.
"""

import argparse
import asyncio
import contextlib
import copy
import hmac
import json
import math
import os
import queue
import re
import signal
import sys
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from glm_sft import exit_on_user_error
from glm_sft.inference import (
    add_model_arguments,
    check_model_arguments,
    cut_at_stop,
    encode_prompt,
    load_from_arguments,
)
from glm_sft.jsonio import json_type_name
from glm_sft.replies import (
    MalformedCall,
    ReasoningStream,
    Reply,
    call_or_text,
    parse_arguments,
    parse_reply,
    split_reasoning,
    tool_call,
)
from glm_sft.template import CONTROL_TOKENS, TEMPLATE_SWITCHES, THINKING_FAMILIES
from glm_sft.tools import canonical_tools

API_KEY_VARIABLE = "GLM_SFT_API_KEY"
ROLES = ("system", "developer", "user", "assistant", "tool")  # developer: OpenAI's newer name for system
TOOL_CHOICES = ("auto", "none")
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024  # a 128k-token prompt, even as \uXXXX escapes, is well under it
MAX_JSON_DEPTH = 100  # arrays and objects nested deeper are refused: the template and the tokenizer recurse into them
# Longer integers are refused: converting them is quadratic (Python's own bound, 4300 digits, unless set otherwise).
MAX_INTEGER_DIGITS = sys.get_int_max_str_digits() or 4300
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # "\ud800" alone in JSON: a string no tokenizer can encode
DEFAULT_MAX_BATCH_SIZE = 16  # replies generated together
DEFAULT_SHUTDOWN_TIMEOUT = 30.0  # seconds the replies being written get to finish at shutdown
SHUTDOWN_MARGIN = 10.0  # seconds after that for their last events to be sent


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


def read_json_body(raw: bytes):
    """The request body as JSON; RequestError when it is not JSON, or is JSON this server will not take: nested more
    than MAX_JSON_DEPTH deep, an integer of more than MAX_INTEGER_DIGITS digits, a string with a lone surrogate."""
    try:
        body = json.loads(raw, parse_int=_json_integer)
    except RecursionError:  # nested deeper than the parser goes, so deeper than MAX_JSON_DEPTH too
        raise RequestError(f"the request body nests arrays or objects more than {MAX_JSON_DEPTH} deep") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise RequestError(f"the request body is not valid JSON ({error})") from None
    _check_json_values(body)
    return body


def _json_integer(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise RequestError(
            f"the request body holds an integer of {len(digits.lstrip('-'))} digits; at most {MAX_INTEGER_DIGITS} "
            "are taken"
        )
    return int(digits)


def _check_json_values(body) -> None:
    """RequestError for the first string (or key) with a lone surrogate, or for nesting deeper than MAX_JSON_DEPTH;
    walked without recursion, whatever the depth."""
    if isinstance(body, str):
        _check_text(body, None)
    pending = [(body, 1, None)] if isinstance(body, dict | list) else []  # (container, depth, where: see _json_path)
    while pending:
        container, depth, where = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise RequestError(f"the request body nests arrays or objects more than {MAX_JSON_DEPTH} deep")
        for key, value in container.items() if isinstance(container, dict) else enumerate(container):
            if isinstance(key, str):
                _check_text(key, where, "has a key with")
            if isinstance(value, str):
                _check_text(value, (where, key))
            elif isinstance(value, dict | list):
                pending.append((value, depth + 1, (where, key)))


def _check_text(text: str, where, what: str = "holds") -> None:
    if LONE_SURROGATE.search(text):
        path = _json_path(where)
        raise RequestError(
            f"{path or 'the request body'} {what} a lone surrogate (such as \\ud800), which is not text", path
        )


def _json_path(where) -> str | None:
    """`messages[0].content` for (((None, "messages"), 0), "content")."""
    keys = []
    while where is not None:
        where, key = where
        keys.append(key)
    path = ""
    for key in reversed(keys):
        path += f"[{key}]" if isinstance(key, int) else f".{key}" if path else key
    return path or None


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
        template_kwargs=_template_switches(given.get("chat_template_kwargs", {})),
    )


def _template_switches(value) -> dict:
    """chat_template_kwargs: only the template's switches (glm_sft.template.TEMPLATE_SWITCHES), each of its type; a
    switch that is null is left out. Nothing else may reach the template's arguments."""
    if not isinstance(value, dict):
        raise RequestError(
            '"chat_template_kwargs" must be an object such as {"enable_thinking": false}', "chat_template_kwargs"
        )
    switches = {}
    for key, switch in value.items():
        where = f"chat_template_kwargs.{key}"
        if key not in TEMPLATE_SWITCHES:
            raise RequestError(
                f'"chat_template_kwargs" holds {json.dumps(key, ensure_ascii=False)}, which is not a template switch; '
                f"the switches are {', '.join(TEMPLATE_SWITCHES)}",
                where,
            )
        if switch is None:
            continue
        if TEMPLATE_SWITCHES[key] is bool:
            switches[key] = _boolean(value, key, False, where="chat_template_kwargs.")
        elif not isinstance(switch, str):
            raise RequestError(f'"{where}" must be a string, not {json_type_name(switch)}', where)
        else:
            _reject_control_tokens(switch, where)
            switches[key] = switch
    return switches


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
    if isinstance(value, float) and not math.isfinite(value):  # NaN and Infinity, which Python's JSON reads
        raise RequestError(f'"{key}" is {json.dumps(value)}; it must be a number {bounds}', key)
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


@dataclass
class Prompt:
    tokens: int  # the prompt's length
    max_new_tokens: int  # the reply's: max_tokens, else the server's default cut to what the context leaves
    ids: list[int] = field(default_factory=list, repr=False)  # the prompt itself, as the model thread would encode it


class RequestReader:
    """Reads chat completion bodies on a thread of its own, beside the event loop and the model's thread: the JSON and
    its checks, parse_chat_request, and the prompt counted with a copy of the model's tokenizer (the model thread's
    is never shared: encoding sets flags on it). So a prompt longer than the context is refused without waiting for
    the model, and a big body never holds up the model. One body at a time, which bounds the memory bodies take: a
    request read behind a big body waits for it (about 2 s for a 4 MB prompt on a CPU core)."""

    def __init__(self, chat, *, max_new_tokens: int, temperature: float, top_p: float):
        self.chat = chat
        self.tokenizer = copy.deepcopy(chat.tokenizer)
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="request-reader")

    async def read(self, raw: bytes) -> tuple[ChatRequest, Prompt]:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.parse, raw)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    def parse(self, raw: bytes) -> tuple[ChatRequest, Prompt]:
        try:
            request = parse_chat_request(read_json_body(raw), temperature=self.temperature, top_p=self.top_p)
            return request, self.fit(request)
        except RequestError:
            raise
        except Exception:  # a bug, not the request: report it, keep serving
            traceback.print_exc()
            raise RequestError("the server failed to read the request; see its log", status=500) from None

    def fit(self, request: ChatRequest) -> Prompt:
        """The prompt's length and the reply's room; RequestError when they do not fit in the model's context."""
        chat = self.chat
        messages = [dict(message) for message in request.messages]
        switches = chat.switches(request.template_kwargs)  # the model's defaults, the request's switches over them
        prompt = encode_prompt(self.tokenizer, messages, request.tools, switches)  # the one inference path's prompt
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
        return Prompt(len(prompt), max_new_tokens, prompt)


# ---------------------------------------------------------------------------------------------------------------
# Generation: one thread owns the model. With --max_batch_size above 1 it generates the replies of the requests waiting
# together, a token of each in one forward pass: a request joins the running batch between two steps and leaves it
# when its reply ends (in-flight batching). With 1, it answers them one at a time, through ChatModel.stream_parts.


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


def shutting_down(message: str) -> RequestError:
    return RequestError(message, status=503, code="server_shutting_down")


def generation_failed() -> RequestError:  # a bug, not the request: the traceback is in the log
    return RequestError("the server failed to generate a reply; see its log", status=500)


class Job:
    """One request on its way through the worker; its events arrive on the event loop's queue. It waits in the queue
    until the model thread begins it; a job refused before that never reaches the model."""

    def __init__(self, request: ChatRequest, prompt: Prompt, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.prompt = prompt
        self.loop = loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()  # the client went away, or the server cut it: generation stops
        self.begun = False
        self.cut_at_shutdown = False
        self._lock = threading.Lock()  # begin (the model thread) against refuse (the event loop)

    def emit(self, kind: str, value=None) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody is listening
            self.loop.call_soon_threadsafe(self.events.put_nowait, Event(kind, value))

    def begin(self) -> bool:
        """The model thread takes the job: False when it was refused (or its client left) while it waited."""
        with self._lock:
            self.begun = not self.cancelled.is_set()
            return self.begun

    def refuse(self, error: RequestError) -> bool:
        """Answer a job that has not begun with `error` (on the event loop); False when it has begun."""
        with self._lock:
            if self.begun:
                return False
            self.cancelled.set()
        self.events.put_nowait(Event("error", error))
        return True

    def cut(self, error: RequestError) -> None:
        """End a job that has begun with `error` now (on the event loop); its generation stops at the next token."""
        self.cut_at_shutdown = True
        self.cancelled.set()
        self.events.put_nowait(Event("error", error))

    def report_stop(self, done: int) -> None:
        """Say in the log why a reply stopped before its end: its client left, or the server cut it."""
        why = "cut at shutdown" if self.cut_at_shutdown else "a client left mid-reply"
        print(f"{why}: stopped after {done} of {self.prompt.max_new_tokens} tokens", file=sys.stderr, flush=True)


class ReplyEvents:
    """A reply on its way to the client as events: the reasoning and the answer piece by piece, the answer cut at the
    first stop string (ReplyText); or, for a request with tools, the parsed reply: its calls, or text."""

    def __init__(self, job: Job):
        self.job = job
        self.text = ReplyText(job.request.stop)  # stop strings cut the answer, not the reasoning

    def part(self, kind: str, piece: str) -> bool:
        """Pass a ("reasoning" | "answer", piece) part on; True once a stop string has ended the answer."""
        if kind == "reasoning":
            self.job.emit("reasoning", piece)
        elif text := self.text.feed(piece):
            self.job.emit("text", text)
        return self.text.stopped

    def parsed(self, reply, usage: dict) -> None:
        """Pass a whole reply on, read by the family's parser (glm_sft.replies.Reply)."""
        if reply.reasoning:
            self.job.emit("reasoning", reply.reasoning)
        self.part("answer", reply.content)
        for call in reply.calls:
            self.job.emit("call", call)
        if reply.calls:
            usage["finish_reason"] = "tool_calls"

    def done(self, usage: dict) -> None:
        if text := self.text.finish():
            self.job.emit("text", text)
        if self.text.stopped and usage.get("finish_reason") != "tool_calls":
            usage["finish_reason"] = "stop"
        self.job.emit("done", usage)


class ModelWorker:
    """The one thread that touches the model and its tokenizer; jobs run one at a time, in the order they came.

    Shutdown (see begin_shutdown): the jobs still waiting are refused with a 503, those begun get a grace period."""

    def __init__(self, chat):
        self.chat = chat
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.open_jobs: set[Job] = set()  # submitted and not answered yet (used on the event loop only)
        self.closing = False
        self.grace_timer: asyncio.TimerHandle | None = None
        self.thread = threading.Thread(target=self.run, name="model-worker", daemon=True)  # joined by close()
        self.thread.start()

    def check_open(self) -> None:
        if self.closing:
            raise shutting_down("the server is shutting down and takes no new requests")

    def submit(self, request: ChatRequest, prompt: Prompt) -> Job:
        self.check_open()
        job = Job(request, prompt, asyncio.get_running_loop())
        self.open_jobs.add(job)
        self.jobs.put(job)
        return job

    def finish(self, job: Job) -> None:
        """The job's response has ended (answered, refused, or its client left): its generation stops."""
        job.cancelled.set()
        self.open_jobs.discard(job)

    def begin_shutdown(self, grace: float) -> None:
        """Stop taking requests: those waiting for the model get a 503 now, the replies being generated get `grace`
        seconds to finish, then end with an error (end_running). On the event loop."""
        if self.closing:
            return
        self.closing = True
        refusal = shutting_down("the server is shutting down: this request was not started; send it again")
        refused = sum(job.refuse(refusal) for job in list(self.open_jobs))
        running = sum(job.begun and not job.cancelled.is_set() for job in self.open_jobs)
        print(
            f"shutting down: {running} replies being written get up to {grace:g} s to finish; {refused} waiting "
            "requests refused (503)",
            file=sys.stderr,
            flush=True,
        )
        self.grace_timer = asyncio.get_running_loop().call_later(grace, self.end_running)

    def end_running(self) -> None:
        """End the replies still being generated with an error event (the grace period is over). On the event loop."""
        if not self.closing:  # a second signal before the shutdown began: it begins with no grace period
            return
        if self.grace_timer is not None:
            self.grace_timer.cancel()
        error = shutting_down("the server shut down before this reply was finished")
        running = [job for job in self.open_jobs if job.begun and not job.cancelled.is_set()]
        for job in running:
            job.cut(error)
        if running:
            print(f"shutdown: {len(running)} replies ended unfinished", file=sys.stderr, flush=True)

    def close(self, timeout: float = 120) -> bool:
        """Stop every job and the model thread (at its next token); True once the thread has ended. On the event loop
        (the app's shutdown), or after it has closed."""
        self.closing = True
        if self.thread.is_alive():
            for job in list(self.open_jobs):
                with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody is waiting
                    job.refuse(shutting_down("the server is shutting down"))
                job.cancelled.set()
            self.jobs.put(None)
            self.thread.join(timeout)
        return not self.thread.is_alive()

    def run(self) -> None:
        import torch

        with torch.no_grad():  # thread-local: set in the thread that generates
            self.serve_jobs()

    def serve_jobs(self) -> None:
        while (job := self.jobs.get()) is not None:
            if not job.begin():
                continue
            try:
                self.answer(job)
            except RequestError as error:
                job.emit("error", error)
            except Exception:  # a bug, not the request: report it, keep serving
                traceback.print_exc()
                job.emit("error", generation_failed())

    def answer(self, job: Job) -> None:
        import torch

        request, chat = job.request, self.chat
        messages = [dict(message) for message in request.messages]
        max_new_tokens = job.prompt.max_new_tokens  # the prompt was counted and fits: see RequestReader
        job.emit("started", job.prompt.tokens)
        if request.seed is not None:
            torch.manual_seed(request.seed)
        settings = dict(
            max_new_tokens=max_new_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            template_kwargs=request.template_kwargs,
        )
        usage = {}
        reply = ReplyEvents(job)
        if request.parse_calls:
            reply.parsed(call_or_text(chat, messages, request.tools, usage=usage, **settings), usage)
        else:
            stopped = False  # by the client or the server (stream_parts sets job.cancelled itself as it closes)
            parts = chat.stream_parts(messages, stop=job.cancelled, usage=usage, **settings)
            with contextlib.closing(parts) as pieces:
                for kind, piece in pieces:
                    stopped = job.cancelled.is_set()
                    if reply.part(kind, piece) or stopped:
                        break
            if stopped:
                job.report_stop(usage.get("completion_tokens", 0))
        reply.done(usage)


class BatchingWorker(ModelWorker):
    """The model thread of in-flight batching: up to `max_batch_size` replies are generated together, one token of
    each per forward pass. Between two steps the requests waiting join (each prompt prefilled alone, as generate
    would), and the replies that ended leave. Each reply is the one its request gets alone: the same prompt, the
    same logits processors as model.generate, the same greedy tokens (padding is masked, positions are each row's own);
    a sampled reply draws from a generator of its own, seeded by its `seed`."""

    def __init__(self, chat, max_batch_size: int):
        self.max_batch_size = max_batch_size
        self.most_rows = 0  # the most replies generated together so far
        self.rules = GenerationRules(chat)
        self.problem: str | None = None  # why this model cannot batch (see batching_problem): one at a time then
        self.checked = threading.Event()
        super().__init__(chat)
        self.checked.wait()

    def run(self) -> None:
        import torch

        # The check runs the model, so in the model thread: on a small CPU, a model that has run in another thread
        # (whose OpenMP threads then keep cores busy) runs about half as fast.
        with torch.no_grad():
            try:
                self.problem = batching_problem(self.chat)
            finally:
                self.checked.set()
            if self.problem:
                print(f"note: replies are generated one at a time: {self.problem}", file=sys.stderr, flush=True)
                super().serve_jobs()
            else:
                self.serve_jobs()

    def serve_jobs(self) -> None:
        batch = RunningBatch(self.chat.model)
        rows: list[Row] = []
        while True:
            waiting = self.take_jobs(block=not rows, room=self.max_batch_size - len(rows))
            if None in waiting:  # close(): every job was stopped
                return
            rows += [row for job in waiting if (row := self.start(job, batch)) is not None]
            rows = self.drop_ended(rows, batch)
            if not rows:
                continue
            self.most_rows = max(self.most_rows, len(rows))
            try:
                logits = batch.step([row.ids[-1] for row in rows])
                for index, token in enumerate(self.next_tokens(rows, logits)):
                    rows[index].take(token)
            except Exception:  # a bug (or out of memory): these replies fail, the server goes on
                traceback.print_exc()
                for row in rows:
                    row.job.emit("error", generation_failed())
                batch.keep([])
                rows = []

    @staticmethod
    def next_tokens(rows: list["Row"], logits) -> list[int]:
        """Each row's next token: greedy rows without processors all at once, the sampled rows of the same settings
        and no seed in one call, the others each on its own."""
        tokens = logits.float().argmax(-1).tolist()
        shared: dict[Decoding, list[int]] = {}
        for index, row in enumerate(rows):
            if row.shares_sampling:
                shared.setdefault(row.decoding, []).append(index)
            elif row.chooses:
                tokens[index] = row.choose(logits[index])
        for decoding, indexes in shared.items():
            for index, token in zip(indexes, decoding.sample(logits[indexes]), strict=True):
                tokens[index] = token
        return tokens

    def take_jobs(self, block: bool, room: int) -> list:
        """The jobs waiting, up to `room` (None in the list: the worker is closing); waits for one when `block`."""
        taken = []
        while len(taken) < room:
            try:
                job = self.jobs.get(block=block and not taken)
            except queue.Empty:
                break
            taken.append(job)
            if job is None:
                break
        return taken

    def start(self, job: Job, batch: "RunningBatch") -> "Row | None":
        """Begin a job: its prompt prefilled into the batch, its first token taken."""
        if not job.begin():
            return None
        job.emit("started", job.prompt.tokens)
        rows_before = batch.rows
        try:
            row = Row(job, self.chat, self.rules)
            logits = batch.add(row.prompt_ids)
            row.take(row.choose(logits[0]))
            return row
        except Exception:  # a bug (or out of memory): this reply fails, the others go on
            traceback.print_exc()
            if batch.rows > rows_before:
                batch.keep(list(range(rows_before)))
            job.emit("error", generation_failed())
            return None

    @staticmethod
    def drop_ended(rows: list["Row"], batch: "RunningBatch") -> list["Row"]:
        """The rows still generating; those whose reply ended (or whose client left) leave the batch."""
        kept = []
        for index, row in enumerate(rows):
            if not row.ended and row.job.cancelled.is_set():
                row.job.report_stop(len(row.ids))
                row.ended = True
            if not row.ended:
                kept.append(index)
        if len(kept) < len(rows):
            batch.keep(kept)
        return [rows[index] for index in kept]


class Row:
    """One reply in the batch: its tokens, how the next is chosen, and the reply on its way to the client (decoded
    piece by piece as ChatModel.stream_parts decodes it, or, with tools, read whole as call_or_text reads it)."""

    def __init__(self, job: Job, chat, rules: "GenerationRules"):
        import torch
        from transformers import TextStreamer

        request = job.request
        self.job, self.chat = job, chat
        self.prompt_ids = job.prompt.ids
        self.ids: list[int] = []  # generated so far, the end-of-turn token included
        self.ended = False
        self.stop_ids = set(chat.stop_ids)
        self.decoding = rules.for_request(request.temperature, request.top_p)
        self.generator = None  # a seed's own: the same seed, the same sample, whatever else is in the batch
        if self.decoding.sampling and request.seed is not None:
            self.generator = torch.Generator(device=chat.model.device).manual_seed(request.seed)
        # sampled from the global generator, in one call with the other rows of the same settings
        self.shares_sampling = self.decoding.sampling and self.decoding.reads_logits_only and self.generator is None
        self.chooses = self.decoding.sampling or len(self.decoding.processors) > 0  # else the batch's greedy token
        self.reply = ReplyEvents(job)
        self.whole = request.parse_calls  # a reply that may be a call is read whole
        if not self.whole:
            self.pieces: list[str] = []
            # TextStreamer's pieces, those stream_parts yields, collected instead of printed. A thinking family's
            # <think> and </think> may be special tokens: kept, to tell the reasoning apart.
            self.decoder = TextStreamer(chat.tokenizer, skip_special_tokens=not chat.thinks)
            self.decoder.on_finalized_text = lambda text, stream_end=False: self.pieces.append(text)
            self.parts = ReasoningStream(thinking=chat.thinks)
            self.send(self.parts.feed(chat.opening(self.prompt_ids)))

    def choose(self, logits) -> int:
        """The next token from this row's logits: model.generate's processors, then greedy or a sample."""
        import torch

        decoding = self.decoding
        if decoding.sampling and decoding.reads_logits_only:
            return decoding.sample(logits.unsqueeze(0), self.generator)[0]
        scores = logits.float().unsqueeze(0)
        if len(decoding.processors):
            input_ids = torch.tensor([self.prompt_ids + self.ids], device=logits.device)
            scores = decoding.processors(input_ids, scores)
        if not decoding.sampling:
            return int(scores.argmax(-1))
        return int(torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=self.generator))

    def take(self, token: int) -> None:
        """Add the token chosen; pass on the text it completes; end the reply at an end-of-turn token, a stop
        string or max_new_tokens."""
        import torch

        self.ids.append(token)
        stop_token = token in self.stop_ids
        if not self.whole:
            self.decoder.put(torch.tensor([] if stop_token else [token], dtype=torch.long))  # as stream_parts filters
            if self.send(self.decoded_parts()):
                self.end()
                return
        if stop_token or len(self.ids) >= self.job.prompt.max_new_tokens:
            self.end()

    def decoded_parts(self):
        """The reasoning and answer parts of the pieces decoded since the last call."""
        pieces, self.pieces = self.pieces, []
        for piece in pieces:
            yield from self.parts.feed(piece)

    def send(self, parts) -> bool:
        """Pass parts on until a stop string ends the answer; True once one has."""
        return any(self.reply.part(kind, piece) for kind, piece in parts)

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        new_ids = cut_at_stop(self.ids, self.stop_ids)
        usage = {
            "prompt_tokens": len(self.prompt_ids),
            "completion_tokens": len(self.ids),
            "finish_reason": "length" if len(new_ids) == len(self.ids) >= self.job.prompt.max_new_tokens else "stop",
        }
        if self.whole:
            raw = self.chat.opening(self.prompt_ids) + self.chat.tokenizer.decode(new_ids, skip_special_tokens=False)
            self.reply.parsed(read_reply(raw, self.chat.family, self.job.request.tools), usage)
        elif not self.reply.text.stopped:
            self.decoder.end()
            if not self.send(self.decoded_parts()):
                self.send(self.parts.finish())
        self.reply.done(usage)


def read_reply(raw: str, family: str, tools: list[dict]):
    """glm_sft.tools.call_or_text's reading of a reply written whole: its calls, or text (a reply whose calls cannot
    be read is the text the model wrote, its reasoning apart, with a warning)."""
    try:
        return parse_reply(raw, family, tools)
    except MalformedCall as error:
        print(f"warning: {error}", file=sys.stderr)
        reasoning, answer = split_reasoning(raw) if family in THINKING_FAMILIES else ("", raw)
        return Reply(answer.strip(), [], reasoning)


@dataclass(eq=False)
class Decoding:
    """How the next token of a request is chosen: model.generate's logits processors, then greedy or a sample."""

    processors: object  # a LogitsProcessorList, empty for plain greedy decoding
    sampling: bool
    reads_logits_only: bool  # temperature, top-k, top-p, min-p: rows with the same settings share one call

    def sample(self, logits, generator=None) -> list[int]:
        """Sampled tokens for rows of logits ([rows, vocab]) whose processors read the logits only."""
        import torch

        scores = self.processors(torch.empty(len(logits), 0, dtype=torch.long, device=logits.device), logits.float())
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=generator)[:, 0].tolist()


class GenerationRules:
    """model.generate's logits processors for a request's settings, as generate builds them (the model's generation
    config under the request's temperature and top_p, the family's stop ids): none for plain greedy decoding."""

    def __init__(self, chat):
        self.chat = chat
        self.known: dict[tuple[float, float], Decoding] = {}

    def for_request(self, temperature: float, top_p: float) -> Decoding:
        from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        key = (temperature, top_p) if temperature > 0 else (0.0, 1.0)
        if key not in self.known:
            if len(self.known) >= 64:  # requests may send any number of settings
                self.known.clear()
            chat = self.chat
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {}
            config, _ = chat.model._prepare_generation_config(
                None,
                eos_token_id=chat.stop_ids,
                pad_token_id=chat.tokenizer.pad_token_id,
                **(sampling or {"do_sample": False}),
            )
            # What generate applies to each step's logits; transformers' own continuous batching builds them alike.
            processors = chat.model._get_logits_processor(config)
            warpers = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper)
            reads_logits_only = all(isinstance(processor, warpers) for processor in processors)
            self.known[key] = Decoding(processors, temperature > 0, reads_logits_only)
        return self.known[key]


class BatchingUnsupported(Exception):
    """The model's cache cannot be shared by rows of different lengths."""


class RunningBatch:
    """The rows generating together and their one key/value cache: each row's cache is left-padded to the longest,
    the padding masked, and each row given its own positions, so one forward pass takes the next token of every row.
    A row joins with its prompt's cache (prefilled alone, as model.generate prefills it) and leaves when its reply
    ends; the padding that every row left has on its left is cut away."""

    def __init__(self, model):
        import inspect

        self.model = model
        self.cache = None
        self.mask = None  # [rows, length]: 1 for a token, 0 for padding
        self.padded = False
        self.positions: list[int] = []  # each row's next position: its tokens so far
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model's own forward
        keeps = "logits_to_keep" in inspect.signature(base.forward).parameters
        self.only_last = {"logits_to_keep": 1} if keeps else {}  # as generate asks: the last position's logits

    @property
    def rows(self) -> int:
        return len(self.positions)

    def add(self, prompt_ids: list[int]):
        """Prefill a row's prompt and let it join; returns its next-token logits ([1, vocab])."""
        import torch
        from transformers.cache_utils import DynamicLayer

        device = self.model.device
        input_ids = torch.tensor([prompt_ids], device=device)
        positions = torch.arange(len(prompt_ids), device=device).unsqueeze(0)
        output = self.model(input_ids=input_ids, position_ids=positions, use_cache=True, **self.only_last)
        cache = output.past_key_values
        layers = getattr(cache, "layers", None)
        if not layers or any(type(layer) is not DynamicLayer for layer in layers):
            kinds = sorted({type(layer).__name__ for layer in layers or []}) or [type(cache).__name__]
            raise BatchingUnsupported(f"its cache ({', '.join(kinds)}) cannot be padded and shared")
        length = len(prompt_ids)
        if self.cache is None:
            self.cache, self.mask = cache, torch.ones(1, length, dtype=torch.long, device=device)
        else:  # the new tensors first, then all at once: a failure leaves the batch as it was
            width = max(self.mask.shape[1], length)
            joined = [
                (
                    torch.cat([left_pad(mine.keys, width), left_pad(joining.keys, width)]),
                    torch.cat([left_pad(mine.values, width), left_pad(joining.values, width)]),
                )
                for mine, joining in zip(self.cache.layers, layers, strict=True)
            ]
            mask = torch.zeros(self.rows + 1, width, dtype=torch.long, device=device)
            mask[:-1, width - self.mask.shape[1] :] = self.mask
            mask[-1, width - length :] = 1
            for layer, (keys, values) in zip(self.cache.layers, joined, strict=True):
                layer.keys, layer.values = keys, values
            self.mask, self.padded = mask, bool((mask == 0).any())
        self.positions.append(length)
        return output.logits[:, -1]

    def step(self, tokens: list[int]):
        """One forward pass: each row's last token in; each row's next-token logits out ([rows, vocab])."""
        import torch

        device = self.model.device
        mask = torch.cat([self.mask, torch.ones(self.rows, 1, dtype=torch.long, device=device)], dim=1)
        output = self.model(
            input_ids=torch.tensor(tokens, device=device).unsqueeze(1),
            attention_mask=mask if self.padded else None,  # no padding: no mask, as generate drops an all-ones mask
            position_ids=torch.tensor(self.positions, device=device).unsqueeze(1),
            past_key_values=self.cache,
            use_cache=True,
            **self.only_last,
        )
        self.mask = mask
        self.positions = [position + 1 for position in self.positions]
        return output.logits[:, -1]

    def keep(self, indexes: list[int]) -> None:
        """Keep only these rows (in this order)."""
        import torch

        if not indexes:
            self.cache, self.mask, self.padded, self.positions = None, None, False, []
            return
        rows = torch.tensor(indexes, dtype=torch.long, device=self.mask.device)
        mask = self.mask[rows]
        shared_padding = int((mask.cumsum(dim=1) == 0).sum(dim=1).min())
        self.mask = mask[:, shared_padding:]
        self.padded = bool((self.mask == 0).any())
        self.positions = [self.positions[index] for index in indexes]
        for layer in self.cache.layers:
            layer.keys = layer.keys[rows, :, shared_padding:]
            layer.values = layer.values[rows, :, shared_padding:]


def left_pad(states, width: int):
    """Cached keys or values ([rows, heads, length, dim]) with zeros on the left up to `width` positions."""
    import torch

    missing = width - states.shape[-2]
    if missing == 0:
        return states
    return torch.cat([states.new_zeros(*states.shape[:-2], missing, states.shape[-1]), states], dim=-2)


PROBE_TOKENS = 4


def batching_problem(chat) -> str | None:
    """Why this model's replies cannot be generated together (None: they can). A prefix-tuning adapter keeps virtual
    tokens in the cache; a cache other than the plain dynamic one (GLM-5's indexer) cannot be padded; and, the last
    check, two prompts of different lengths generated together must give the greedy tokens each gives alone."""
    import torch

    peft_config = getattr(chat.model, "active_peft_config", None)
    if getattr(peft_config, "is_prompt_learning", False):
        return "its adapter (P-Tuning v2, prefix tuning) keeps virtual tokens in the cache"
    questions = ("你好", "请用三句话介绍一下你自己。")
    prompts = [chat.prompt_ids([{"role": "user", "content": question}])[0] for question in questions]
    stops = set(chat.stop_ids)
    try:
        with torch.no_grad():
            alone = []
            for ids in prompts:
                input_ids = torch.tensor([ids], device=chat.model.device)
                output = chat.model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=PROBE_TOKENS,
                    do_sample=False,
                    eos_token_id=chat.stop_ids,
                    pad_token_id=chat.tokenizer.pad_token_id,
                )
                alone.append(output[0, len(ids) :].tolist())
            batch = RunningBatch(chat.model)
            together, live = [], []  # live: the rows in the batch (indexes into together), in its order
            for ids in prompts + [None] * PROBE_TOKENS:  # the second prompt joins after the first's first step
                if ids is not None:
                    together.append([int(batch.add(ids)[0].float().argmax())])
                    live.append(len(together) - 1)
                kept = [
                    index
                    for index, row in enumerate(live)
                    if len(together[row]) < PROBE_TOKENS and together[row][-1] not in stops
                ]
                if len(kept) < len(live):
                    batch.keep(kept)
                    live = [live[index] for index in kept]
                if live:
                    logits = batch.step([together[row][-1] for row in live])
                    for index, row in enumerate(live):
                        together[row].append(int(logits[index].float().argmax()))
    except BatchingUnsupported as error:
        return str(error)
    except Exception as error:  # an architecture whose forward does not take a shared cache
        return f"generating two replies together failed ({type(error).__name__}: {error})"
    if together != alone:
        return "replies generated together were not those generated alone"
    return None


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
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_batch_size: int = 1,
):
    """The FastAPI app serving `chat` (a glm_sft.inference.ChatModel). `max_batch_size`: how many replies are generated
    together (1: one at a time, through chat.stream_parts); a model that cannot batch (see batching_problem) is
    answered one at a time whatever it says. The model thread is `app.state.worker`: after create_app, no other
    thread may run the model."""
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
    parser.add_argument(
        "--max_request_bytes",
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help=f"larger request bodies get a 413 before they are read (default {DEFAULT_MAX_REQUEST_BYTES}, 4 MiB; "
        "raise it for a model whose context holds more than about a million characters)",
    )
    parser.add_argument(
        "--max_batch_size",
        "--max-batch-size",
        type=int,
        default=DEFAULT_MAX_BATCH_SIZE,
        help=f"how many replies are generated together (default {DEFAULT_MAX_BATCH_SIZE}; 1: one at a time)",
    )
    parser.add_argument(
        "--shutdown_timeout",
        "--shutdown-timeout",
        type=float,
        default=DEFAULT_SHUTDOWN_TIMEOUT,
        help=f"on SIGTERM or Ctrl-C, the seconds the replies being written get to finish (default "
        f"{DEFAULT_SHUTDOWN_TIMEOUT:g}); those still running then end with an error event",
    )
    args = parser.parse_args(argv)
    check_model_arguments(parser, args)
    if not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    if args.max_request_bytes < 1:
        parser.error("--max_request_bytes must be at least 1")
    if args.max_batch_size < 1:
        parser.error("--max_batch_size must be at least 1")
    if not 0 <= args.shutdown_timeout < math.inf:
        parser.error("--shutdown_timeout must be a number of seconds, 0 or more")
    if args.api_key is None:
        args.api_key = os.environ.get(API_KEY_VARIABLE) or None
    return args


class Server(uvicorn.Server):
    """uvicorn's server, which says where it listens once it does, and shuts down gracefully. On SIGINT or SIGTERM
    it stops accepting connections, answers the requests still waiting for the model with a 503, and gives the replies
    being written `shutdown_timeout` seconds to finish; those still running then end with an error event (and
    `data: [DONE]` when streamed). A second signal ends that wait at once. The model thread has ended before run()
    returns (a thread still in the model when the interpreter exits can abort it)."""

    def __init__(self, config: uvicorn.Config, *, worker: ModelWorker, shutdown_timeout: float, announce):
        super().__init__(config)
        self.worker, self.shutdown_timeout, self.announce = worker, shutdown_timeout, announce
        self.exit_signals: list[int] = []
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None):
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.announce(host, port)

    def handle_exit(self, sig, frame) -> None:  # the signal handler, in the event loop's thread
        self.exit_signals.append(sig)
        if self.should_exit:  # a second signal: the replies still running end now
            self.shutdown_timeout = 0
            if self.loop is not None:
                self.loop.call_soon_threadsafe(self.worker.end_running)
        self.should_exit = True  # the signal is not raised again once the server has stopped, unlike uvicorn's

    async def shutdown(self, sockets=None):
        self.worker.begin_shutdown(self.shutdown_timeout)
        await super().shutdown(sockets=sockets)


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
        max_request_bytes=args.max_request_bytes,
        max_batch_size=args.max_batch_size,
    )

    def announce(host, port):
        shown = f"[{host}]" if ":" in host else host
        key = "API key required" if args.api_key else "no API key"
        print(f"serving {chat.name} ({chat.family}) at http://{shown}:{port}/v1 ({key})", flush=True)
        if not args.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: listening on {args.host} with no API key: anyone who reaches it can use it")

    # uvicorn cuts what is still open this long after the signal: only if the model thread is stuck in one step.
    grace = args.shutdown_timeout + SHUTDOWN_MARGIN
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=grace)
    server = Server(config, worker=app.state.worker, shutdown_timeout=args.shutdown_timeout, announce=announce)
    try:
        server.run()  # a port in use ends it with one uvicorn error line and a non-zero exit
    finally:
        stopped = app.state.worker.close()
    if not stopped:  # the model thread is stuck: leave without finalizing the interpreter under it
        print("error: the model thread did not stop; exiting without it", file=sys.stderr, flush=True)
        os._exit(1)
    if signal.SIGINT in server.exit_signals:
        sys.exit(130)  # Ctrl-C, as every glm-sft script ends on it; SIGTERM ends with 0


if __name__ == "__main__":
    main()
