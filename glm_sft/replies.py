"""Generated replies read back: the reasoning split off (whole or while streaming), tool calls parsed from each
family's native form into the canonical shape, and the calls' arguments as they are written and read.

The canonical call is {"type": "function", "function": {"name": str, "arguments": {...}}}; `parse_reply` is the inverse
of rendering a reply with the family's template.
"""

import ast
import re
import sys
from dataclasses import dataclass, field
from typing import Any

from glm_sft.jsonio import json_type_name, loads_json
from glm_sft.template import XML_TOOL_FAMILIES, family_thinks


class MalformedCall(ValueError):
    """A reply that starts a tool call (a function name as metadata) whose arguments cannot be read."""


def is_function_name(name: str) -> bool:
    """A name that can stand alone on the metadata line: non-empty, one line, no surrounding spaces."""
    return bool(name) and name == name.strip() and "\n" not in name and "<|" not in name


def parse_arguments(value: Any) -> tuple[dict | None, str | None]:
    """Call arguments as a dict, from a dict or a JSON string holding an object; or (None, what is wrong)."""
    if isinstance(value, str):
        value, problem = loads_json(value)
        if problem:
            return None, problem.replace("is not", "are not", 1) if problem.startswith(
                "is not"
            ) else f"are refused: the JSON {problem}"
    if not isinstance(value, dict):
        return None, f"are of type {json_type_name(value)}; expected a JSON object"
    return value, None


def tool_call(name: str, arguments: dict) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_XML_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_XML_ARGUMENT = re.compile(r"\s*<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>\s*", re.DOTALL)


@dataclass
class Reply:
    """A generated reply read back: the reasoning (thinking families; "" otherwise), the text, and the calls
    [{"name", "arguments"}] in the order the model made them (GLM-4.5 and later may make several in one turn).
    `unread`: why the calls it starts could not be read, when call_or_text gave it back as text (not compared)."""

    content: str
    calls: list[dict] = field(default_factory=list)
    reasoning: str = ""
    unread: str = field(default="", compare=False)

    def message(self) -> dict:
        """The reply as a canonical assistant message, as the templates render it back into the history."""
        message = {"role": "assistant", "content": self.content}
        if self.reasoning:
            message["reasoning_content"] = self.reasoning
        if self.calls:
            message["tool_calls"] = [tool_call(call["name"], call["arguments"]) for call in self.calls]
        return message


def split_reasoning(text: str, in_reasoning: bool = False) -> tuple[str, str]:
    """(reasoning, answer) of a thinking family's reply: the `<think>...</think>` block it opens with, and the rest.

    A reply whose generation prompt already opened the block (GLM-Z1's `<|assistant|>\n<think>`, GLM-4.7's
    `<|assistant|><think>`) starts inside it: say so with `in_reasoning`, or pass the text with that `<think>` (as
    ChatModel.raw_reply gives it); a `</think>` with no `<think>` before it is read the same way. A reply cut before
    its `</think>` is all reasoning, with an empty answer. Both parts are stripped."""
    stripped = text.lstrip()
    if stripped.startswith(THINK_OPEN):
        stripped, in_reasoning = stripped[len(THINK_OPEN) :], True
    elif THINK_CLOSE in stripped and THINK_OPEN not in stripped.partition(THINK_CLOSE)[0]:
        in_reasoning = True
    if not in_reasoning:
        return "", stripped.strip()
    reasoning, _, answer = stripped.partition(THINK_CLOSE)
    return reasoning.strip(), answer.strip()


class ReasoningStream:
    """split_reasoning for a reply that arrives piece by piece: feed() the pieces, then finish(); each returns the
    ("reasoning" | "answer", text) parts they let through. Whatever the piece boundaries, the parts of each kind join
    to what split_reasoning gives for the whole text: a piece that may begin a tag is held back until it is known,
    and whitespace at the end of a part only goes out once more text follows. `thinking` False (the other families):
    everything is answer."""

    def __init__(self, thinking: bool = True, in_reasoning: bool = False):
        self.kind = "reasoning" if in_reasoning else ("start" if thinking else "answer")
        self.buffer = ""  # text not passed on yet
        self.space = ""  # whitespace at the end of the current part, held back
        self.started = False  # the current part has passed text on (its leading whitespace is dropped)

    def feed(self, piece: str) -> list[tuple[str, str]]:
        self.buffer += piece
        parts = []
        while True:
            if self.kind == "start":
                stripped = self.buffer.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self.buffer, self.kind = stripped[len(THINK_OPEN) :], "reasoning"
                elif stripped.startswith(THINK_CLOSE):  # GLM-4.7's prompt with thinking off closes an empty block
                    self.buffer, self.kind = stripped[len(THINK_CLOSE) :], "answer"
                elif THINK_OPEN.startswith(stripped) or THINK_CLOSE.startswith(stripped):  # nothing yet, or a tag
                    return parts
                else:
                    self.kind = "answer"
            elif self.kind == "reasoning":
                before, closed, after = self.buffer.partition(THINK_CLOSE)
                if not closed:
                    held = partial_tag_length(self.buffer, THINK_CLOSE)
                    self._pass(parts, self.buffer[: len(self.buffer) - held])
                    self.buffer = self.buffer[len(self.buffer) - held :]
                    return parts
                self._pass(parts, before)
                self.buffer, self.kind, self.space, self.started = after, "answer", "", False
            else:
                self._pass(parts, self.buffer)
                self.buffer = ""
                return parts

    def finish(self) -> list[tuple[str, str]]:
        """What was held back once the reply has ended (a tag that never completed is text); not trailing space."""
        if self.kind == "start":
            self.kind = "answer"
        parts = []
        self._pass(parts, self.buffer)
        self.buffer = self.space = ""
        return parts

    def _pass(self, parts: list, text: str) -> None:
        text = self.space + text if self.started else text.lstrip()
        body = text.rstrip()
        self.space = text[len(body) :]
        if body:
            parts.append((self.kind, body))
            self.started = True


def partial_tag_length(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag`."""
    return next((size for size in range(min(len(tag) - 1, len(text)), 0, -1) if tag.startswith(text[-size:])), 0)


def parse_reply(text: str, family: str, tools: list[dict] | None = None) -> Reply:
    """A generated reply read back into its reasoning, text and calls: the inverse of rendering.

    `text` is what the model wrote after `<|assistant|>`, special tokens kept or not, the stop token removed (for a
    thinking family, with the `<think>` its generation prompt wrote: see split_reasoning).
    - glm4, chatglm3, glm4_0414, glmz1: `{metadata}\n{content}`; a metadata line (the function name) makes it a call,
      its arguments a JSON object (ChatGLM3: a fenced python `tool_call(key=value, ...)` block). Text before a call
      (`...<|assistant|>name\n{...}`) is the reply's content.
    - glm45, glm46, glm47: text, then `<tool_call>{name}<arg_key>k</arg_key><arg_value>v</arg_value>...</tool_call>`
      blocks, whitespace between the tags or not; a value that parses as JSON is that value, other values are strings,
      as the template writes them (a parameter `tools` types as "string" stays a string).
    Raises MalformedCall when a call's arguments cannot be read.
    """
    reasoning, answer = split_reasoning(text) if family_thinks(family) else ("", text)
    if family in XML_TOOL_FAMILIES:
        return _xml_reply(answer, reasoning, tools)
    if reasoning or THINK_CLOSE in text:
        answer = "\n" + answer  # the answer follows </think>, not <|assistant|>: it opens with no metadata line
    parts = [part for part in answer.split("<|assistant|>") if part.strip()] or [""]
    texts, calls = [], []
    for part in parts:
        metadata, newline, content = part.partition("\n")
        if not metadata.strip():
            texts.append(content)
            continue
        if not newline:  # one line with no metadata line before it: text
            texts.append(part)
            continue
        name = metadata.strip()
        if family == "chatglm3":
            calls.append({"name": name, "arguments": _python_call_arguments(name, content)})
            continue
        arguments, problem = parse_arguments(content.strip())
        if problem:
            raise MalformedCall(f"the call to {name} has arguments that {problem}: {content.strip()[:200]}")
        calls.append({"name": name, "arguments": arguments})
    return Reply("\n".join(texts).strip(), calls, reasoning)


def _xml_reply(text: str, reasoning: str, tools: list[dict] | None) -> Reply:
    """GLM-4.5's XML calls: the text before the first <tool_call>, and each call in turn."""
    start = text.find("<tool_call>")
    if start < 0:
        return Reply(text.strip(), [], reasoning)
    calls, position = [], start
    for match in _XML_CALL.finditer(text, start):
        if text[position : match.start()].strip():
            raise MalformedCall(f"text between tool calls: {text[position : match.start()].strip()[:200]}")
        calls.append(_xml_call(match.group(1), tools))
        position = match.end()
    if text[position:].strip():
        raise MalformedCall(f"a tool call that is not closed by </tool_call>: {text[position:].strip()[:200]}")
    return Reply(text[:start].strip(), calls, reasoning)


def _xml_call(body: str, tools: list[dict] | None) -> dict:
    """One <tool_call> block's body: `{name}` then <arg_key>/<arg_value> pairs, whitespace between them or not."""
    name_end = body.find("<arg_key>")
    position = len(body) if name_end < 0 else name_end
    name = body[:position].strip()
    if not is_function_name(name) or "<" in name:
        raise MalformedCall(f"a tool call with no function name: <tool_call>{body[:200]}</tool_call>")
    string_keys = _string_parameters(name, tools)
    arguments = {}
    for match in _XML_ARGUMENT.finditer(body, position):
        if match.start() != position:
            break
        key, value = match.group(1).strip(), match.group(2)
        if key in arguments:
            raise MalformedCall(f"the call to {name} passes {key} twice: {body.strip()[:200]}")
        arguments[key] = value if key in string_keys else _xml_value(value)
        position = match.end()
    if body[position:].strip():
        raise MalformedCall(f"the call to {name} has arguments that are not <arg_key>/<arg_value> pairs: {body[:200]}")
    return {"name": name, "arguments": arguments}


def _xml_value(value: str) -> Any:
    """A value as the template wrote it: JSON for anything but a string, which is written as it is."""
    parsed, problem = loads_json(value)
    return value if problem else parsed


def _string_parameters(name: str, tools: list[dict] | None) -> set[str]:
    """The parameters of function `name` that its definition types as strings (their values are never JSON)."""
    for tool in tools or []:
        function = tool.get("function", tool)
        if function.get("name") == name:
            properties = (function.get("parameters") or {}).get("properties") or {}
            typed = {key: schema.get("type") for key, schema in properties.items() if isinstance(schema, dict)}
            return {key for key, kind in typed.items() if kind == "string"}
    return set()


def is_python_call(content: Any) -> bool:
    """ChatGLM3's form of a call's body: a fenced python block, or a bare tool_call(...)."""
    return isinstance(content, str) and content.strip().startswith(("```", "tool_call("))


def python_call_arguments(name: str, content: str) -> tuple[dict | None, str | None]:
    """The arguments of ChatGLM3's ```python\ntool_call(key=value, ...)\n``` block, or (None, what is wrong)."""
    try:
        return _python_call_arguments(name, content), None
    except MalformedCall as error:
        return None, str(error)


def _python_call_arguments(name: str, content: str) -> dict:
    """The keyword arguments of ChatGLM3's ```python\\ntool_call(key=value, ...)\\n``` block, as Python literals."""
    code = content.strip()
    if code.startswith("```"):
        code = code.split("\n", 1)[1] if "\n" in code else ""
        code = code.rsplit("```", 1)[0]
    try:
        expression = ast.parse(code.strip(), mode="eval").body
    except SyntaxError as error:
        raise MalformedCall(f"the call to {name} is not Python ({error.msg}): {content.strip()[:200]}") from None
    except (RecursionError, MemoryError):
        raise MalformedCall(f"the call to {name} is nested too deeply to read: {content.strip()[:200]}") from None
    if not (isinstance(expression, ast.Call) and isinstance(expression.func, ast.Name) and not expression.args):
        raise MalformedCall(f"the call to {name} is not tool_call(key=value, ...): {content.strip()[:200]}")
    arguments = {}
    for keyword in expression.keywords:
        if keyword.arg is None:
            raise MalformedCall(f"the call to {name} uses **: {content.strip()[:200]}")
        try:
            arguments[keyword.arg] = ast.literal_eval(keyword.value)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            raise MalformedCall(
                f"the call to {name} passes {keyword.arg}= something that is not a literal: {content.strip()[:200]}"
            ) from None
    return arguments


def call_or_text(chat, messages: list[dict], tools: list[dict], **settings) -> Reply:
    """The model's next reply with `tools` offered, read by parse_reply: its calls, or text. A reply whose calls cannot
    be read is given back as the text the model wrote (its reasoning apart), with a warning and why in `unread`."""
    raw = chat.raw_reply(messages, tools=tools, **settings)
    try:
        return parse_reply(raw, chat.family, tools)
    except MalformedCall as error:
        print(f"warning: {error}", file=sys.stderr)
        reasoning, answer = split_reasoning(raw) if family_thinks(chat.family) else ("", raw)
        return Reply(answer.strip(), [], reasoning, unread=str(error))
