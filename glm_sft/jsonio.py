"""JSON read strictly: the decoder behind data files, tool arguments and request bodies, and the messages about it."""

import json
import math
import re
from pathlib import Path
from typing import Any

from glm_sft import UserError

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
        value, end, problem = self.decode(text, JSON_SPACE.match(text).end())
        if end is not None and JSON_SPACE.match(text, end).end() != len(text):
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


JSON_SPACE = re.compile(r"[ \t\n\r]*")


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


def read_json_file(path: str, expected: str):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise UserError(f"{path}: cannot read it ({error.strerror})") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path}:{error.lineno}: not valid JSON ({error.msg}); expected {expected}") from None
