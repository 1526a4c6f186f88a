"""Requests: an OpenAI chat completion body read into glm_sft's canonical conversation and generation settings, its
bounds, and the OpenAI error body a request that cannot be served gets.

JSON is read as json.loads reads it, then bounded before anything recurses into it: nesting deeper than
glm_sft.jsonio.MAX_JSON_DEPTH, integers longer than Python converts in linear time, and lone surrogates (which no
tokenizer encodes) are refused with the field they are in. NaN and Infinity parse, so the field that holds one names
itself ('"temperature" is NaN'); duplicate keys keep the last value, as in most JSON readers.
"""

import asyncio
import copy
import json
import math
import re
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from glm_sft.inference import encode_prompt
from glm_sft.jsonio import MAX_JSON_DEPTH, json_type_name
from glm_sft.replies import parse_arguments, tool_call
from glm_sft.switches import TEMPLATE_SWITCHES
from glm_sft.template import control_token_in
from glm_sft.tools import canonical_tools

ROLES = ("system", "developer", "user", "assistant", "tool")  # developer: OpenAI's newer name for system
TOOL_CHOICES = ("auto", "none")
# Longer integers are refused: converting them is quadratic (Python's own bound, 4300 digits, unless set otherwise).
MAX_INTEGER_DIGITS = sys.get_int_max_str_digits() or 4300
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # "\ud800" alone in JSON: a string no tokenizer can encode


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
    """chat_template_kwargs: only the template's switches (glm_sft.switches.TEMPLATE_SWITCHES), each of its type; a
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
    if token := control_token_in(text):
        raise RequestError(f"{where} contains the control token {token}, which would change the chat format", where)


@dataclass
class Prompt:
    ids: list[int] = field(repr=False)  # the prompt, encoded once: the model generates from these ids
    max_new_tokens: int  # the reply's: max_tokens, else the server's default cut to what the context leaves

    @property
    def tokens(self) -> int:
        return len(self.ids)


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
        """The prompt's ids and the reply's room; RequestError when they do not fit in the model's context."""
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
        return Prompt(prompt, max_new_tokens)
