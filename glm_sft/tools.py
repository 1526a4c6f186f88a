"""Tool definitions in the canonical (Hugging Face) shape, {"type": "function", "function": {"name", "description",
"parameters"}}, read from data, requests and tools files; and `ToolSession`, the loop that answers a model's calls
(from a results file, the person at the prompt or the web page) until it replies in text: chat_cli and webchat both
drive it. Replies are read back in glm_sft.replies.
"""

import json
import sys
from typing import Any

from glm_sft import UserError
from glm_sft.jsonio import json_type_name, loads_json, read_json_file
from glm_sft.replies import Reply, call_or_text, is_function_name


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


def result_text(value: Any) -> str:
    """A tool result as the observation text: strings as they are, anything else as JSON (non-ASCII kept)."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def waiting_calls(messages: list[dict]) -> list[dict]:
    """The calls {"name", "arguments"} of the conversation's last assistant message that have no result yet (its
    results follow it in the order of its calls)."""
    results = 0
    for message in reversed(messages):
        if message["role"] == "tool":
            results += 1
            continue
        calls = (message.get("tool_calls") or []) if message["role"] == "assistant" else []
        return [call["function"] for call in calls[results:]]
    return []


class ToolSession:
    """The tools a chat model may call, and where call results come from: a results file, or else `ask` (the person
    at chat_cli's prompt) or, with no `ask`, a later message (webchat's page). `turn` is the loop both drive."""

    MAX_CALLS_PER_TURN = 8  # a model stuck calling would otherwise never hand the turn back

    def __init__(self, tools_file: str, results_file: str | None = None):
        self.tools = read_tools_file(tools_file)
        self.results = (
            read_json_file(results_file, "an object mapping function names to results") if results_file else None
        )
        if self.results is not None and not isinstance(self.results, dict):
            raise UserError(f"{results_file}: expected a JSON object mapping function names to results")
        self.results_file = results_file

    def defines(self, name: str) -> bool:
        return name in tool_names(self.tools)

    def result_for(self, call: dict, ask) -> str | None:
        """The call's result: from the results file, else from `ask` (None when there is no `ask`)."""
        if self.results is not None and call["name"] in self.results:
            return result_text(self.results[call["name"]])
        if ask is None:
            return None
        if self.results is not None and not sys.stdin.isatty():
            raise UserError(f"{self.results_file} has no result for {call['name']}; add one")
        try:
            return ask("result> ")
        except EOFError:
            raise UserError(f"no result for the call to {call['name']}: give --tool_results FILE or type it") from None

    def turn(self, chat, messages: list[dict], ask=input, stop=None, system: list[dict] = (), **settings):
        """The model's turn with the tools offered, as events (kind, value): generate (read by call_or_text), answer
        each call, again until the model replies in text. Replies and results join `messages`; each prompt is
        `system` + `messages`, fitted to the context anew (`messages` keeps its whole history).

        - ("reply", Reply), then ("call", call) for each of its calls, then ("result", (call, text)) for each;
        - the turn ends after a reply in text, or with ("waiting", call) when a result has to come later (no `ask`):
          add it to `messages` and start the next turn, which answers the calls still waiting first;
          ("stopped", None) when `stop()` is true before a generation; ("limit", MAX_CALLS_PER_TURN) when that many
          replies all called.
        """
        replies = 0
        while True:
            for call in waiting_calls(messages):
                result = self.result_for(call, ask)
                if result is None:
                    yield "waiting", call
                    return
                messages.append({"role": "tool", "content": result})
                yield "result", (call, result)
            if replies == self.MAX_CALLS_PER_TURN:
                yield "limit", replies
                return
            if stop is not None and stop():
                yield "stopped", None
                return
            reply = call_or_text(chat, [*system, *messages], self.tools, **settings)
            replies += 1
            messages.append(reply.message())
            yield "reply", reply
            if not reply.calls:
                return
            for call in reply.calls:
                yield "call", call

    def answer(self, chat, messages: list[dict], ask=input, **settings) -> Reply:
        """chat_cli's turn: each call printed as one JSON line and answered, until the model replies in text. The
        replies (with their reasoning) join `messages`; returns the last one, the text."""
        for kind, value in self.turn(chat, messages, ask, **settings):
            if kind == "call":
                print(json.dumps(value, ensure_ascii=False), flush=True)
                if not self.defines(value["name"]):
                    print(f"warning: the model called {value['name']}, which is not in the tools", file=sys.stderr)
            elif kind == "reply" and not value.calls:
                return value
        raise UserError(f"the model made {self.MAX_CALLS_PER_TURN} calls in one turn without replying; stopped")


def read_tools_file(path: str) -> list[dict]:
    """The function definitions of a tools file (a JSON list), canonical; the first problem is an error."""
    tools, problems = canonical_tools(read_json_file(path, "a list of function definitions"))
    if problems:
        raise UserError(f"{path}: {problems[0]}")
    if not tools:
        raise UserError(f"{path}: no tools defined")
    return tools
