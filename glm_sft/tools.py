"""Tool calling: definitions and calls in the canonical (Hugging Face) shape; generated replies back into calls.

Canonical shapes (DESIGN.md, "The data model"):
    tool definition  {"type": "function", "function": {"name", "description", "parameters"}}
    call             {"type": "function", "function": {"name": str, "arguments": {...}}}
The templates render them in each family's native format; `parse_reply` is the inverse for a generated reply.
"""

import ast
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from glm_sft import UserError


class MalformedCall(ValueError):
    """A reply that starts a tool call (a function name as metadata) whose arguments cannot be read."""


MAX_JSON_DEPTH = 100  # lists and objects inside one another; deeper data is refused, not parsed into a RecursionError
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class StrictJSON:
    """A decoder for JSON only. Python's json module also takes NaN and Infinity, lets the last of two equal keys win,
    reads numbers that overflow (1e999 as inf) and strings holding lone UTF-16 surrogates ("\\ud800"), and raises
    RecursionError or a bare ValueError on deep nesting or huge integers; `decode` says what is wrong instead.
    """

    def __init__(self):
        self._problems: list[str] = []
        self._decoder = json.JSONDecoder(
            object_pairs_hook=self._object,
            parse_constant=self._constant,
            parse_int=self._int,
            parse_float=self._float,
        )

    def decode(self, text: str, position: int = 0) -> tuple[Any, int | None, str | None]:
        """(value, end, None), or (value, end, what is wrong) for JSON that parses but is refused, or (None, None,
        what is wrong) when parsing had to stop (nesting too deep). Syntax errors raise json.JSONDecodeError."""
        self._problems = []
        try:
            value, end = self._decoder.raw_decode(text, position)
        except RecursionError:
            return None, None, f"nested deeper than {MAX_JSON_DEPTH} levels"
        return value, end, self._problems[0] if self._problems else json_value_problem(value)

    def loads(self, text: str) -> tuple[Any, str | None]:
        """json.loads: (value, None) or (None, what is wrong); syntax errors raise json.JSONDecodeError."""
        value, end, problem = self.decode(text, _JSON_SPACE.match(text).end())
        if end is not None and _JSON_SPACE.match(text, end).end() != len(text):
            raise json.JSONDecodeError("Extra data", text, end)
        return (None, problem) if problem else (value, None)

    def _object(self, pairs: list[tuple[str, Any]]) -> dict:
        value = dict(pairs)
        if len(value) != len(pairs):
            seen = set()
            twice = next(key for key, _ in pairs if key in seen or seen.add(key))
            self._problems.append(f"has the key {json.dumps(twice, ensure_ascii=False)} twice in one object")
        return value

    def _constant(self, name: str) -> None:
        self._problems.append(f"holds {name}, which is not JSON; write null or a number")

    def _int(self, digits: str) -> int:
        try:
            return int(digits)
        except ValueError:
            self._problems.append(f"holds an integer of {len(digits.lstrip('-'))} digits, too long to read")
            return 0

    def _float(self, digits: str) -> float:
        value = float(digits)
        if not math.isfinite(value):
            self._problems.append(f"holds the number {digits[:40]}, which is out of range")
        return value


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def json_value_problem(value: Any) -> str | None:
    """What keeps a parsed value from being trained as text: nesting deeper than MAX_JSON_DEPTH, or a string (or key)
    with a lone UTF-16 surrogate, which has no UTF-8 form; None when there is nothing."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if surrogate := _LONE_SURROGATE.search(item):
                return (
                    f"holds a lone UTF-16 surrogate (\\u{ord(surrogate.group()):04x}), which is not text; write the "
                    "character itself or its surrogate pair"
                )
        elif isinstance(item, dict | list):
            if depth >= MAX_JSON_DEPTH:
                return f"nested deeper than {MAX_JSON_DEPTH} levels"
            items = [*item, *item.values()] if isinstance(item, dict) else item
            stack += [(child, depth + 1) for child in items]
    return None


def loads_json(text: str) -> tuple[Any, str | None]:
    """A JSON text (tools or arguments written as a string) as a value, or (None, what is wrong)."""
    try:
        return StrictJSON().loads(text)
    except json.JSONDecodeError as error:
        return None, f"is not valid JSON ({error.msg} at character {error.pos})"


def canonical_tool(definition: Any) -> tuple[dict | None, str | None]:
    """A tool definition as {"type": "function", "function": {...}}, from that shape or a bare function object.

    Returns (tool, None), or (None, what is wrong).
    """
    if not isinstance(definition, dict):
        return None, f"is of type {json_type_name(definition)}; expected a function definition object"
    kind = definition.get("type", "function")
    if kind != "function":
        return None, f"has type {json.dumps(kind, ensure_ascii=False)}; only function tools can be trained"
    if "function" in definition:
        function = definition["function"]
    elif "name" in definition:
        function = definition  # ChatGLM3 and ShareGPT data write the function object itself
    else:
        return None, 'has neither "function" nor "name"; expected {"type": "function", "function": {"name", ...}}'
    if not isinstance(function, dict):
        return None, f'has a "function" of type {json_type_name(function)}; expected an object'
    name = function.get("name")
    if not isinstance(name, str) or not is_function_name(name):
        return None, f'has no usable "name" (got {json.dumps(name, ensure_ascii=False)})'
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        return None, f'("{name}") has "parameters" of type {json_type_name(parameters)}; expected a JSON schema object'
    return {"type": "function", "function": function}, None


def canonical_tools(value: Any, where: str = '"tools"') -> tuple[list[dict], list[str]]:
    """`tools` of a row (a list, or a JSON string holding one, as ShareGPT writes it; items may be JSON strings too):
    canonical tools, problems.

    `where` names the value in the problems.
    """
    if isinstance(value, str):
        value, problem = loads_json(value)
        if problem:
            return [], [f"{where} is a string that {problem}"]
    if not isinstance(value, list):
        return [], [f"{where} is of type {json_type_name(value)}; expected a list of function definitions"]
    tools, problems = [], []
    for number, definition in enumerate(value, 1):
        if isinstance(definition, str):  # ChatGLM3 data may write each definition as a JSON string
            definition, problem = loads_json(definition)
            if problem:
                problems.append(f"{where} item {number} is a string that {problem}")
                continue
        tool, problem = canonical_tool(definition)
        if problem:
            problems.append(f"{where} item {number} {problem}")
        else:
            tools.append(tool)
    names = tool_names(tools)
    problems += [f'{where} defines "{name}" twice' for name in sorted({n for n in names if names.count(n) > 1})]
    return tools, problems


def tool_names(tools: list[dict]) -> list[str]:
    return [tool["function"]["name"] for tool in tools]


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


def result_text(value: Any) -> str:
    """A tool result as the observation text: strings as they are, anything else as JSON (non-ASCII kept)."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def parse_reply(text: str, family: str) -> dict | str:
    """A generated reply as a call {"name", "arguments"} or as plain text: the inverse of rendering.

    `text` is what the model wrote after `<|assistant|>`, special tokens kept or not, the stop token removed:
    `{metadata}\\n{content}`. A metadata line (the function name) makes it a call: GLM-4 writes the arguments as a
    JSON object, ChatGLM3 as a fenced python `tool_call(key=value, ...)` block. When a text part precedes a call
    (`...<|assistant|>name\\n{...}`), the call is returned. Raises MalformedCall when the arguments cannot be read.
    """
    parts = [part for part in text.split("<|assistant|>") if part.strip()] or [""]
    for part in parts:
        metadata, _, content = part.partition("\n")
        if metadata.strip():
            name = metadata.strip()
            if family == "chatglm3":
                return {"name": name, "arguments": _python_call_arguments(name, content)}
            arguments, problem = parse_arguments(content.strip())
            if problem:
                raise MalformedCall(f"the call to {name} has arguments that {problem}: {content.strip()[:200]}")
            return {"name": name, "arguments": arguments}
    return "\n".join(part.partition("\n")[2] if "\n" in part else part for part in parts).strip()


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


def json_type_name(value: Any) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def call_or_text(chat, messages: list[dict], tools: list[dict], **settings) -> dict | str:
    """The model's next reply with `tools` offered: a call {"name", "arguments"} or text. A call whose arguments
    cannot be read is given back as the text the model wrote, with a warning."""
    raw = chat.raw_reply(messages, tools=tools, **settings)
    try:
        return parse_reply(raw, chat.family)
    except MalformedCall as error:
        print(f"warning: {error}", file=sys.stderr)
        return raw.strip()


class ToolSession:
    """The tools a chat model may call, and where call results come from: a results file, or the person at the
    prompt (`ask`). chat_cli answers a turn with it: each call printed as JSON, its result fed back, until text."""

    MAX_CALLS_PER_TURN = 8  # a model stuck calling would otherwise never hand the turn back

    def __init__(self, tools_file: str, results_file: str | None = None):
        self.tools = read_tools_file(tools_file)
        self.results = (
            read_json_file(results_file, "an object mapping function names to results") if results_file else None
        )
        if self.results is not None and not isinstance(self.results, dict):
            raise UserError(f"{results_file}: expected a JSON object mapping function names to results")
        self.results_file = results_file

    def result_for(self, call: dict, ask) -> str:
        if self.results is not None and call["name"] in self.results:
            return result_text(self.results[call["name"]])
        if self.results is not None and not sys.stdin.isatty():
            raise UserError(f"{self.results_file} has no result for {call['name']}; add one")
        try:
            return ask("result> ")
        except EOFError:
            raise UserError(f"no result for the call to {call['name']}: give --tool_results FILE or type it") from None

    def answer(self, chat, messages: list[dict], ask=input, **settings) -> str:
        """Generate until the model replies in text; each call is printed as one JSON line and answered."""
        for _ in range(self.MAX_CALLS_PER_TURN):
            reply = call_or_text(chat, messages, self.tools, **settings)
            if isinstance(reply, str):
                messages.append({"role": "assistant", "content": reply})
                return reply
            print(json.dumps(reply, ensure_ascii=False), flush=True)
            if reply["name"] not in tool_names(self.tools):
                print(f"warning: the model called {reply['name']}, which is not in the tools", file=sys.stderr)
            messages.append({"role": "assistant", "content": "", "tool_calls": [tool_call(**reply)]})
            messages.append({"role": "tool", "content": self.result_for(reply, ask)})
        raise UserError(f"the model made {self.MAX_CALLS_PER_TURN} calls in one turn without replying; stopped")


def read_tools_file(path: str) -> list[dict]:
    """The function definitions of a tools file (a JSON list), canonical; the first problem is an error."""
    tools, problems = canonical_tools(read_json_file(path, "a list of function definitions"))
    if problems:
        raise UserError(f"{path}: {problems[0]}")
    if not tools:
        raise UserError(f"{path}: no tools defined")
    return tools


def read_json_file(path: str, expected: str):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise UserError(f"{path}: cannot read it ({error.strerror})") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path}:{error.lineno}: not valid JSON ({error.msg}); expected {expected}") from None
