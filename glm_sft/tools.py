"""Tool definitions in the canonical (Hugging Face) shape, {"type": "function", "function": {"name", "description",
"parameters"}}, read from data, requests and tools files; and `ToolSession`, the loop that answers a model's calls
(from a results file or the person at the prompt) until it replies in text. Replies are read back in glm_sft.replies.
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

    def answer(self, chat, messages: list[dict], ask=input, **settings) -> Reply:
        """Generate until the model replies in text; each call is printed as one JSON line and answered. The
        replies (with their reasoning) join `messages`; returns the last one, the text."""
        for _ in range(self.MAX_CALLS_PER_TURN):
            reply = call_or_text(chat, messages, self.tools, **settings)
            messages.append(reply.message())
            if not reply.calls:
                return reply
            for call in reply.calls:
                print(json.dumps(call, ensure_ascii=False), flush=True)
                if call["name"] not in tool_names(self.tools):
                    print(f"warning: the model called {call['name']}, which is not in the tools", file=sys.stderr)
            for call in reply.calls:
                messages.append({"role": "tool", "content": self.result_for(call, ask)})
        raise UserError(f"the model made {self.MAX_CALLS_PER_TURN} calls in one turn without replying; stopped")


def read_tools_file(path: str) -> list[dict]:
    """The function definitions of a tools file (a JSON list), canonical; the first problem is an error."""
    tools, problems = canonical_tools(read_json_file(path, "a list of function definitions"))
    if problems:
        raise UserError(f"{path}: {problems[0]}")
    if not tools:
        raise UserError(f"{path}: no tools defined")
    return tools
