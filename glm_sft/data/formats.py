"""Row formats into turns: ChatGLM3 / GLM-4 `messages` (role/content), ShareGPT (from/value), Alpaca, Firefly and a
prompt/response column pair, with the tool-calling shapes of ChatGLM3/Firefly, GLM-4, OpenAI/Hugging Face and
ShareGPT. A converter only reads the row's shape; glm_sft.data.checks then checks the turns as a conversation.
"""

import json
from dataclasses import dataclass, field
from typing import Any

from glm_sft.jsonio import json_type_name, loads_json
from glm_sft.replies import is_python_call, python_call_arguments
from glm_sft.template import output_items
from glm_sft.tools import canonical_tools, result_text

DATASET_FORMATS = ("auto", "messages", "sharegpt", "alpaca", "firefly", "columns")
ROLES = ("system", "user", "assistant", "tool", "observation")
SHAREGPT_ROLES = {
    "human": "user",
    "gpt": "assistant",
    "system": "system",
    "user": "user",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
}


@dataclass
class Turn:
    """One message on its way into a conversation; `label` names it in problems (`message 3 (user)`).

    Roles: system, user, assistant, tool (a tool result). An assistant turn may carry `calls`, raw (name, arguments)
    pairs as the data wrote them; they are checked against the row's tools in glm_sft.data.checks.
    """

    role: str
    content: Any
    label: str
    calls: list[tuple[Any, Any]] = field(default_factory=list)
    trained: bool = True  # False for an assistant message with "loss": false (rendered, not trained)
    reasoning: Any = None  # an assistant message's reasoning_content (or its inline <think>...</think>)


@dataclass(frozen=True)
class RowFormats:
    """The row formats, with the recipe's names of the prompt and response columns (the columns format)."""

    prompt_column: str = "prompt"
    response_column: str = "response"

    def detect(self, row: dict) -> str | None:
        """The format the row's keys fit, or None."""
        if row.get("messages") is not None:
            return "messages"
        conversations = row.get("conversations")
        if conversations is not None:
            if isinstance(conversations, list) and any(
                isinstance(item, dict) and "from" in item for item in conversations
            ):
                return "sharegpt"
            return "messages"
        if row.get("instruction") is not None and row.get("output") is not None:
            return "alpaca"
        if row.get("conversation") is not None:
            return "firefly"
        if self.prompt_column in row and self.response_column in row:
            return "columns"
        return None

    def unknown(self, row: dict, count: int = 1) -> str:
        """The problem of `count` rows with these keys, whose format is unknown."""
        keys = [str(key) for key in row]
        which = "this row" if count == 1 else f"{count} rows (this one and those after it with the same keys)"
        text = (
            f"cannot tell the format of {which} (keys: {', '.join(keys) or 'none'}); expected "
            f"messages/conversations, instruction+output (alpaca), conversation (firefly) or the columns "
            f"{self.prompt_column}/{self.response_column}; set dataset_format to choose"
        )
        if len(keys) == 2 and self.prompt_column not in keys and self.response_column not in keys:
            # Prompt/response pairs under other names (ADGEN writes content/summary).
            text += f", or set prompt_column: {keys[0]} and response_column: {keys[1]}"
        return text

    def turns(self, row: dict, row_format: str) -> tuple[list[Turn], list[dict] | None, list[str]]:
        """The row's turns and canonical tools (None when it has none), with the problems of its shape."""
        if row_format == "columns":
            turns, problems = _turns_from_columns(row, self.prompt_column, self.response_column)
        else:
            turns, problems = ROW_CONVERTERS[row_format](row)
        tools, tool_problems = _row_tools(row, row_format)
        return turns, tools, problems + tool_problems


def _turns_from_messages(row: dict) -> tuple[list[Turn], list[str]]:
    key = "messages" if row.get("messages") is not None else "conversations"
    messages = row.get(key)
    if messages is None:
        return [], ['row has no "messages" or "conversations" list']
    if not isinstance(messages, list):
        return [], [f'"{key}" is of type {json_type_name(messages)}; expected a list of messages']
    turns, problems = [], []
    for number, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            problems.append(
                f"message {number} is of type {json_type_name(message)}; expected an object with role and content"
            )
            continue
        role = message.get("role")
        label = f"message {number} ({role})"
        is_call = role == "tool" and "content" not in message and ("parameters" in message or "observation" in message)
        loss = message.get("loss")
        if "role" not in message:
            problems.append(f'message {number} has no "role" (keys: {", ".join(map(str, message))})')
        elif not isinstance(role, str) or role not in ROLES:
            problems.append(f"message {number} has role {shown(role)}; expected one of {', '.join(ROLES)}")
        elif loss is not None and not isinstance(loss, bool):
            problems.append(f'{label} has "loss" of type {json_type_name(loss)}; expected true or false')
        elif loss is True and role != "assistant" and not is_call:
            problems.append(f'{label} has "loss": true, but only assistant messages are trained; remove it')
        elif is_call:
            # ChatGLM3 / Firefly: one message stands for a call and its result.
            if "observation" not in message:
                problems.append(f'{label} has "parameters" but no "observation" (the result of the call)')
                continue
            call = (message.get("name"), message.get("parameters", {}))
            turns.append(Turn("assistant", "", label, [call], trained=loss is not False))
            turns.append(Turn("tool", _result(message["observation"]), label))
        elif role == "assistant" and _has_value(message.get("tool_calls")):
            calls = message["tool_calls"]
            if not isinstance(calls, list):
                problems.append(f'{label} has "tool_calls" of type {json_type_name(calls)}; expected a list of calls')
                continue
            content = "" if message.get("content") is None else message["content"]
            calls = [_openai_call(call) for call in calls]
            turns.append(Turn("assistant", content, label, calls, loss is not False, message.get("reasoning_content")))
        elif role == "assistant" and _has_value(message.get("metadata")):
            # GLM-4 native: the function name as metadata, the JSON arguments as content; ChatGLM3 writes a fenced
            # python tool_call(...) block as content instead.
            name, arguments = message["metadata"], message.get("content")
            if is_python_call(arguments):
                arguments, problem = python_call_arguments(name, arguments)
                if problem:
                    problems.append(f"{label}: {problem}")
                    continue
            turns.append(Turn("assistant", "", label, [(name, arguments)], trained=loss is not False))
        elif role == "system" and _has_value(message.get("tools")) and not _has_value(message.get("content")):
            continue  # GLM-4 native: a system message that only carries the tools, which render their own block
        elif "content" not in message:
            problems.append(f'{label} has no "content"')
        elif role in ("tool", "observation"):
            turns.append(Turn("tool", _result(message["content"]), label))
        elif role == "assistant":
            reasoning = message.get("reasoning_content")
            turns.append(Turn(role, message["content"], label, [], loss is not False, reasoning))
        else:
            if message.get("reasoning_content") is not None:
                problems.append(f'{label} has "reasoning_content"; only assistant messages reason')
            turns.append(Turn(role, message["content"], label))
    return turns, problems


def _openai_call(call: Any) -> tuple[Any, Any]:
    """(name, arguments) of an OpenAI/Hugging Face call, {"function": {"name", "arguments"}} or the inner object."""
    if not isinstance(call, dict):
        return None, None
    function = call.get("function", call)
    if not isinstance(function, dict):
        return None, None
    return function.get("name"), function.get("arguments", {})


def _result(value: Any) -> Any:
    """A tool result as text; non-string JSON results (ChatGLM3 observations are often objects) as JSON, except a list
    of {"output": text} items, which the XML families' templates read item by item (template.family_messages)."""
    if value is None or isinstance(value, str) or output_items(value) is not None:
        return value
    return result_text(value)


def _has_value(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, list | dict):
        return bool(value)
    return value is not None


def _list_in(row: dict, key: str, row_format: str, expected: str) -> tuple[list | None, list[Turn], list[str]]:
    """(row[key], the row's system turn, no problem) when row[key] is a list, else (None, [], the problem)."""
    value = row.get(key)
    if value is None:
        return None, [], [f'{row_format} row has no "{key}" list']
    if not isinstance(value, list):
        return None, [], [f'"{key}" is of type {json_type_name(value)}; expected {expected}']
    return value, _system_turn(row), []


def _turns_from_sharegpt(row: dict) -> tuple[list[Turn], list[str]]:
    messages, turns, problems = _list_in(row, "conversations", "sharegpt", "a list of messages")
    if messages is None:
        return [], problems
    for number, message in enumerate(messages, 1):
        speaker = message.get("from") if isinstance(message, dict) else None
        role = SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
        label = f"message {number} ({speaker})"
        if not isinstance(message, dict):
            problems.append(
                f"message {number} is of type {json_type_name(message)}; expected an object with from and value"
            )
        elif "from" not in message:
            problems.append(f'message {number} has no "from" (keys: {", ".join(map(str, message))})')
        elif role is None:
            problems.append(f"message {number} is from {shown(speaker)}; expected one of {', '.join(SHAREGPT_ROLES)}")
        elif "value" not in message:
            problems.append(f'{label} has no "value"')
        elif speaker == "function_call":
            # The value is JSON: {"name", "arguments"}, or a list of those for calls made together.
            value = message["value"]
            if isinstance(value, str):
                value, problem = loads_json(value)
                if problem:
                    problems.append(f"{label} has a value that {problem.replace('is not valid JSON', 'is not JSON')}")
                    continue
            calls = value if isinstance(value, list) else [value]
            if not calls or not all(isinstance(call, dict) for call in calls):
                problems.append(f'{label} has a value that is not a {{"name", "arguments"}} object or a list of them')
                continue
            turns.append(Turn("assistant", "", label, [_openai_call(call) for call in calls]))
        elif role == "tool":
            turns.append(Turn("tool", _result(message["value"]), label))
        else:
            turns.append(Turn(role, message["value"], label))
    return turns, problems


def _row_tools(row: dict, row_format: str) -> tuple[list[dict] | None, list[str]]:
    """The row's tool definitions, canonical: top-level `tools`, or `tools` on a message (GLM-4 native)."""
    found = []
    if _has_value(row.get("tools")):
        found.append(('"tools"', row["tools"]))
    messages = row.get("messages") if row.get("messages") is not None else row.get("conversations")
    if row_format == "messages" and isinstance(messages, list):
        found += [
            (f'message {number} "tools"', message["tools"])
            for number, message in enumerate(messages, 1)
            if isinstance(message, dict) and _has_value(message.get("tools"))
        ]
    if not found:
        return None, []
    if len(found) > 1:
        return None, [f"tools are given twice ({found[0][0]} and {found[1][0]}); give them once"]
    where, value = found[0]
    return canonical_tools(value, where)


def _turns_from_alpaca(row: dict) -> tuple[list[Turn], list[str]]:
    problems = [f'alpaca row has no "{key}"' for key in ("instruction", "output") if row.get(key) is None]
    if problems:
        return [], problems
    turns = _system_turn(row)
    history = row.get("history")
    if history is not None and not isinstance(history, list):
        return [], [f'"history" is of type {json_type_name(history)}; expected a list of [question, answer] pairs']
    for number, pair in enumerate(history or [], 1):
        if isinstance(pair, list) and len(pair) == 2:
            turns.append(Turn("user", pair[0], f"history pair {number} question"))
            turns.append(Turn("assistant", pair[1], f"history pair {number} answer"))
        else:
            problems.append(f"history pair {number} is not a [question, answer] pair: {shown(pair)[:80]}")

    instruction, extra_input = row["instruction"], row.get("input")
    if extra_input is not None and not isinstance(extra_input, str):
        problems.append(f'"input" is of type {json_type_name(extra_input)}; expected a string')
    elif isinstance(instruction, str) and extra_input and extra_input.strip():
        instruction = f"{instruction}\n\n{extra_input}" if instruction.strip() else extra_input
    turns.append(Turn("user", instruction, '"instruction"'))
    turns.append(Turn("assistant", row["output"], '"output"'))
    return turns, problems


def _turns_from_firefly(row: dict) -> tuple[list[Turn], list[str]]:
    exchanges, turns, problems = _list_in(row, "conversation", "firefly", "a list of human/assistant turns")
    if exchanges is None:
        return [], problems
    for number, exchange in enumerate(exchanges, 1):
        if not isinstance(exchange, dict):
            problems.append(
                f"conversation turn {number} is of type {json_type_name(exchange)}; expected an object with human "
                f"and assistant"
            )
            continue
        missing = [key for key in ("human", "assistant") if key not in exchange]
        if missing:
            problems.append(f'conversation turn {number} has no "{missing[0]}"')
            continue
        turns.append(Turn("user", exchange["human"], f'conversation turn {number} "human"'))
        turns.append(Turn("assistant", exchange["assistant"], f'conversation turn {number} "assistant"'))
    return turns, problems


def _turns_from_columns(row: dict, prompt_column: str, response_column: str) -> tuple[list[Turn], list[str]]:
    problems = [
        f'row has no "{column}" column (keys: {", ".join(map(str, row))}); set {option} to the column that holds it'
        for column, option in ((prompt_column, "prompt_column"), (response_column, "response_column"))
        if column not in row
    ]
    if problems:
        return [], problems
    return [
        Turn("user", row[prompt_column], f'column "{prompt_column}"'),
        Turn("assistant", row[response_column], f'column "{response_column}"'),
    ], []


# Each row format's converter: row -> (turns, problems); the columns format, which also needs the recipe's column
# names, is called by RowFormats.turns.
ROW_CONVERTERS = {
    "messages": _turns_from_messages,
    "sharegpt": _turns_from_sharegpt,
    "alpaca": _turns_from_alpaca,
    "firefly": _turns_from_firefly,
}


def _system_turn(row: dict) -> list[Turn]:
    """The optional top-level `system` of sharegpt, alpaca and firefly rows; an empty one means none."""
    system = row.get("system")
    if system is None or (isinstance(system, str) and not system.strip()):
        return []
    return [Turn("system", system, '"system"')]


def shown(value: Any) -> str:
    """A value as it is quoted in problems: JSON, non-ASCII kept."""
    return json.dumps(value, ensure_ascii=False, default=str)
