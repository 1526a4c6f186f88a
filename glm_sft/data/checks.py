"""Checks on a row's turns as a conversation (roles, content, control tokens, reasoning, tool calls, the order of
results) and the report of problems: one `path:line: what is wrong` per line, in DataError.
"""

import json

from glm_sft import UserError
from glm_sft.data.formats import Turn
from glm_sft.jsonio import json_type_name
from glm_sft.replies import parse_arguments, tool_call
from glm_sft.template import control_token_in, output_items
from glm_sft.tools import tool_names


class DataError(UserError):
    """Problems found in the data; str() lists them, one `path:line: what is wrong` per line."""

    def __init__(self, problems: list[str], total: int | None = None):
        self.problems = list(problems)
        self.total = len(self.problems) if total is None else total
        super().__init__("\n".join(listing(self.problems, self.total)))


def listing(problems: list[str], total: int) -> list[str]:
    """The problems, then a line counting those left out."""
    left_out = total - len(problems)
    if left_out <= 0:
        return list(problems)
    return [*problems, f"... and {left_out} more problem{'' if left_out == 1 else 's'}"]


def checked_messages(turns: list[Turn], tools: list[dict] | None) -> tuple[list[dict], list[str]]:
    """The turns as canonical messages, or what keeps them from being a conversation to train on. Checking moves inline
    reasoning out of the content and replaces each call's arguments by the object they parse to."""
    problems = _conversation_problems(turns, tools)
    if problems:
        return [], problems
    return [_canonical_message(turn) for turn in _kept_turns(turns)], []


def _conversation_problems(turns: list[Turn], tools: list[dict] | None) -> list[str]:
    problems = []
    for turn in turns:
        if turn.role == "assistant" and isinstance(turn.content, str):
            problems += _reasoning_problems(turn)
        outputs = output_items(turn.content) if turn.role == "tool" else None
        text = "".join(outputs) if outputs is not None else turn.content
        if not isinstance(text, str):
            problems.append(f"{turn.label} has content of type {json_type_name(turn.content)}; expected a string")
        elif turn.role != "system" and not turn.calls and not text.strip():
            problems.append(f"{turn.label} has empty content")
        elif token := control_token_in(*(outputs or [text])):
            problems.append(f"{turn.label} contains the control token {token}; remove it from the text")
        problems += _call_problems(turn, tools)
    if problems:
        return problems
    kept = _kept_turns(turns)
    for turn in kept[1:]:
        if turn.role == "system":
            problems.append(f"{turn.label} is a system message after the start; only the first message may be one")
    problems += _result_order_problems(kept)
    if not any(turn.role == "assistant" for turn in kept):
        problems.append("no assistant message; nothing to train on")
    elif not any(turn.trained for turn in kept if turn.role == "assistant"):
        problems.append('every assistant message has "loss": false; nothing to train on')
    elif kept[-1].role != "assistant":
        what = "a tool result" if kept[-1].role == "tool" else kept[-1].label
        problems.append(f"the conversation ends with {what}; it must end with an assistant reply")
    return problems


def _reasoning_problems(turn: Turn) -> list[str]:
    """Take an assistant turn's reasoning: `reasoning_content`, or a `<think>...</think>` at the start of its content
    (moved out of the content, as the thinking templates read it); what is wrong with it, if anything."""
    inline = turn.content.lstrip().startswith("<think>") or "</think>" in turn.content
    if inline:
        if turn.reasoning is not None:
            return [f'{turn.label} has both "reasoning_content" and <think>...</think> in its content; give one']
        head, closed, answer = turn.content.partition("</think>")
        if not closed or not head.lstrip().startswith("<think>") or "<think>" in answer or "</think>" in answer:
            return [f"{turn.label} has a <think> block that is not one <think>...</think> at the start of its content"]
        turn.reasoning = head.lstrip()[len("<think>") :].strip()
        turn.content = answer.lstrip("\n")
    if turn.reasoning is None:
        return []
    if not isinstance(turn.reasoning, str):
        return [f'{turn.label} has "reasoning_content" of type {json_type_name(turn.reasoning)}; expected a string']
    if token := control_token_in(turn.reasoning):
        return [f"{turn.label} reasoning contains the control token {token}; remove it from the text"]
    if "<think>" in turn.reasoning or "</think>" in turn.reasoning:
        return [f'{turn.label} has <think> or </think> inside its "reasoning_content"; give the reasoning alone']
    return []


def _kept_turns(turns: list[Turn]) -> list[Turn]:
    """The turns of the conversation: an empty system message is kept only at the start, where ChatGLM3 renders it
    (`<|system|>` and a newline, as its own builder does) and GLM-4's template renders nothing."""
    return [turn for index, turn in enumerate(turns) if turn.role != "system" or index == 0 or turn.content.strip()]


def _call_problems(turn: Turn, tools: list[dict] | None) -> list[str]:
    """Each call of an assistant turn names a function of the row's tools and passes a JSON object."""
    problems = []
    for index, (name, arguments) in enumerate(turn.calls):
        which = f"{turn.label} call {index + 1}" if len(turn.calls) > 1 else turn.label
        if not isinstance(name, str) or not name.strip():
            problems.append(f"{which} has no function name")
            continue
        if tools is None:
            problems.append(f'{which} calls "{name}" but the row has no "tools"; add the function definitions')
        elif name not in tool_names(tools):
            problems.append(f'{which} calls "{name}", which is not in "tools" ({", ".join(tool_names(tools))})')
        parsed, problem = parse_arguments(arguments)
        if problem:
            problems.append(f'{which}: the arguments of "{name}" {problem}')
        elif token := control_token_in(name, json.dumps(parsed)):
            problems.append(f"{which} contains the control token {token}; remove it")
        else:
            turn.calls[index] = (name, parsed)
    return problems


def _result_order_problems(turns: list[Turn]) -> list[str]:
    """Every tool result answers a call made before it; every call but a final one gets its result."""
    problems, waiting = [], []  # calls without a result yet: (label, name)
    for turn in turns:
        if turn.role == "tool":
            if waiting:
                waiting.pop(0)
            else:
                problems.append(f"{turn.label} is a tool result with no call before it")
            continue
        problems += [f'{label} calls "{name}" but no result follows' for label, name in waiting]
        waiting = [(turn.label, name) for name, _ in turn.calls]
    if len(waiting) > 1:  # a conversation may end with one call (the model stops at <|observation|>), not several
        problems += [f'{label} calls "{name}" but no result follows' for label, name in waiting]
    return problems


def _canonical_message(turn: Turn) -> dict:
    message = {"role": turn.role, "content": turn.content}
    if turn.reasoning is not None:
        message["reasoning_content"] = turn.reasoning
    if turn.calls:
        message["tool_calls"] = [tool_call(name, arguments) for name, arguments in turn.calls]
    if not turn.trained:
        message["loss"] = False  # the templates render it outside their generation block
    return message
