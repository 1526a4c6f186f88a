"""Read training data into canonical conversations; every problem is reported as `path:line: what is wrong`.

Input formats: ChatGLM3 / GLM-4 `messages` (role/content), ShareGPT (from/value), Alpaca, Firefly and a
prompt/response column pair. Tool-calling rows in the ChatGLM3/Firefly, GLM-4, OpenAI/Hugging Face and ShareGPT
shapes become canonical rows with `tools` and assistant `tool_calls` (glm_sft.tools).
Files: .json (a list, or one object per line), .jsonl, .csv, .parquet, folders of them, comma-separated lists of
those, and hub dataset ids.
"""

import csv
import io
import json
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glm_sft import UserError
from glm_sft.jsonio import JSON_SPACE, StrictJSON, json_type_name, loads_json
from glm_sft.replies import is_python_call, parse_arguments, python_call_arguments, tool_call
from glm_sft.template import control_token_in, output_items
from glm_sft.tools import canonical_tools, result_text, tool_names

SUPPORTED_EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet")
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
PLACEHOLDER_RECIPE_KEYS = {"name": "assistant_name", "author": "assistant_author"}

_PLACEHOLDER = re.compile(r"\{\{\s*(name|author)\s*\}\}")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# What a path that is neither a file nor a folder is, by its stat mode.
_PATH_KINDS = {
    stat.S_ISCHR: "a character device",
    stat.S_ISBLK: "a block device",
    stat.S_ISFIFO: "a named pipe (FIFO)",
    stat.S_ISSOCK: "a socket",
}


class DataError(UserError):
    """Problems found in the data; str() lists them, one `path:line: what is wrong` per line."""

    def __init__(self, problems: list[str], total: int | None = None):
        self.problems = list(problems)
        self.total = len(self.problems) if total is None else total
        super().__init__("\n".join(_listing(self.problems, self.total)))


@dataclass
class DataStats:
    read: int  # rows read from the files
    used: int  # rows turned into conversations
    skipped: int  # invalid rows skipped (only when skip_invalid_rows=True)


def read_conversations(
    spec: str,
    *,
    dataset_format: str = "auto",
    prompt_column: str = "prompt",
    response_column: str = "response",
    placeholders: dict[str, str] | None = None,
    skip_invalid_rows: bool = False,
    max_problems: int = 20,
) -> tuple[list[dict], DataStats]:
    """Read every file named by `spec` into canonical conversations.

    `spec` is a file, a folder (searched recursively), a hub dataset id, or a comma-separated list of those.
    Each conversation is {"messages": [{"role", "content"}, ...], "source": "path:line"}, plus "tools" and
    assistant "tool_calls" in tool-calling rows (the canonical shape of DESIGN.md). All problems in all
    files are collected and raised together as one DataError. With skip_invalid_rows, invalid rows are
    skipped and printed as warnings instead; problems with whole files still raise.
    """
    if dataset_format not in DATASET_FORMATS:
        raise UserError(f"dataset_format must be one of {', '.join(DATASET_FORMATS)}; got {dataset_format!r}")
    pieces = [piece.strip() for piece in (spec or "").split(",") if piece.strip()]
    if not pieces:
        raise UserError("no data named: give a file, a folder, a comma-separated list of them, or a hub dataset id")
    max_problems = max(max_problems, 1)

    reader = _ConversationReader(dataset_format, prompt_column, response_column, placeholders or {})
    conversations = []
    for piece in pieces:
        conversations += reader.read_piece(piece)

    if not skip_invalid_rows:
        problems = [problem.text for problem in reader.problems]
        if problems:
            raise DataError(problems[:max_problems], total=len(problems))
        return conversations, DataStats(read=reader.rows_read, used=len(conversations), skipped=0)

    row_problems = [problem.text for problem in reader.problems if not problem.whole_file]
    if row_problems:
        print(f"warning: skipping {reader.invalid_rows} invalid rows:", file=sys.stderr)
        for line in _listing(row_problems[:max_problems], len(row_problems)):
            print(f"  {line}", file=sys.stderr)
    file_problems = [problem.text for problem in reader.problems if problem.whole_file]
    if file_problems:
        raise DataError(file_problems[:max_problems], total=len(file_problems))
    if not conversations:
        raise DataError([f"{spec}: no valid rows; all {reader.invalid_rows} rows were invalid (see the warnings)"])
    return conversations, DataStats(read=reader.rows_read, used=len(conversations), skipped=reader.invalid_rows)


def _listing(problems: list[str], total: int) -> list[str]:
    """The problems, then a line counting those left out."""
    left_out = total - len(problems)
    if left_out <= 0:
        return list(problems)
    return [*problems, f"... and {left_out} more problem{'' if left_out == 1 else 's'}"]


# ---------------------------------------------------------------------------------------------------------------
# Where the rows come from: files, folders, hub datasets. Each yields (line, row) pairs.


@dataclass
class _BadRow:
    """A row that could not be parsed at all."""

    problem: str


class _UnreadableFile(Exception):
    """Reading a file had to stop; `line` says where, when it is known."""

    def __init__(self, problem: str, line: int | None = None):
        super().__init__(problem)
        self.problem = problem
        self.line = line


@dataclass
class _Source:
    shown: str  # the name problems and `source` use: the path as the user wrote it
    rows: Callable[[], Iterator[tuple[int, Any]]]
    tabular: bool  # every row has the same keys (CSV, parquet, hub), so a format problem is reported once


def _resolve(piece: str) -> tuple[list[_Source], str | None]:
    """The sources one comma-separated piece of the spec names, or a problem saying why there are none."""
    path = Path(os.path.expanduser(piece))
    if path.is_dir():
        names = sorted(file.relative_to(path).as_posix() for file in path.rglob("*") if file.is_file())
        files = [
            name
            for name in names
            if Path(name).suffix.lower() in SUPPORTED_EXTENSIONS
            and not any(part.startswith(".") for part in Path(name).parts)  # skips .ipynb_checkpoints, .cache
        ]
        if not files:
            return [], f"{piece}: the folder has no {_extension_list()} files"
        return [_file_source(os.path.join(piece, name), path / name) for name in files], None
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
            kind = f'"{path.suffix}"' if path.suffix else "(no extension)"
            return [], f"{piece}: unsupported file type {kind}; use a {_extension_list()} file"
        return [_file_source(piece, path)], None
    if path.exists():  # neither a file nor a folder: /dev/null, a pipe, a socket
        mode = path.stat().st_mode
        kind = next((name for test, name in _PATH_KINDS.items() if test(mode)), "not a regular file")
        return [], f"{piece}: {kind}, not a data file; give a {_extension_list()} file or a folder of them"
    if path.is_symlink():
        return [], f"{piece}: a symbolic link to {os.readlink(path)}, which does not exist"
    if _HUB_ID.fullmatch(piece) and not piece.lower().endswith(SUPPORTED_EXTENSIONS):
        return _hub_source(piece)
    return [], f"{piece}: no such file or folder"


def _extension_list() -> str:
    return ", ".join(SUPPORTED_EXTENSIONS[:-1]) + " or " + SUPPORTED_EXTENSIONS[-1]


def _file_source(shown: str, path: Path) -> _Source:
    extension = path.suffix.lower()
    if extension == ".parquet":
        return _Source(shown, lambda: _parquet_rows(path), tabular=True)
    if extension == ".csv":
        return _Source(shown, lambda: _csv_rows(_read_text(path)), tabular=True)
    if extension == ".jsonl":
        return _Source(shown, lambda: _json_lines_rows(_read_text(path)), tabular=False)
    return _Source(shown, lambda: _json_rows(_read_text(path)), tabular=False)


def _hub_source(dataset_id: str) -> tuple[list[_Source], str | None]:
    try:
        import datasets

        dataset = datasets.load_dataset(dataset_id, split="train")
    except Exception as error:  # noqa: BLE001 (no network, no such dataset, no train split: all for the user to fix)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return [], (
            f"{dataset_id}: not a local file or folder, and the hub dataset could not be loaded ({reason[:200]})"
        )
    return [_Source(dataset_id, lambda: enumerate(dataset, 1), tabular=True)], None


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise _UnreadableFile(f"cannot be read ({error.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line_start = data.rfind(b"\n", 0, error.start) + 1
        raise _UnreadableFile(
            f"not UTF-8 text ({error.reason} at byte {error.start - line_start + 1} of the line); save it as UTF-8",
            line=data.count(b"\n", 0, error.start) + 1,
        ) from None


def _json_rows(text: str) -> Iterator[tuple[int, Any]]:
    """A .json file: a list of objects, or (when it does not start with `[`) one object per line."""
    if text.lstrip().startswith("["):
        yield from _json_list_rows(text)
        return
    first_line = next((line for line in text.split("\n") if line.strip()), "")
    if (
        first_line.lstrip().startswith("{")
        and _json_or_none(first_line) is None
        and isinstance(_json_or_none(text), dict)
    ):
        raise _UnreadableFile(
            "holds a single JSON object; expected a list of objects ([{...}, {...}]) or one object per line"
        )
    yield from _json_lines_rows(text)


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError, or an integer too long to read
        return None


def _json_lines_rows(text: str) -> Iterator[tuple[int, Any]]:
    decoder = StrictJSON()
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row, problem = decoder.loads(line)
        except json.JSONDecodeError as error:
            yield number, _BadRow(f"not valid JSON ({error.msg} at column {error.colno})")
            continue
        yield number, _BadRow(f"the JSON {problem}") if problem else row


def _json_list_rows(text: str) -> Iterator[tuple[int, Any]]:
    """The elements of a JSON list, each with the line where it starts; a syntax error stops the file."""
    decoder = StrictJSON()
    position = JSON_SPACE.match(text, text.index("[") + 1).end()
    line, counted_to = 1, 0
    try:
        if text.startswith("]", position):
            position += 1
        else:
            while True:
                line += text.count("\n", counted_to, position)
                counted_to = position
                element, end, problem = decoder.decode(text, position)
                if end is None:  # parsing had to stop
                    raise _UnreadableFile(f"the JSON {problem}; stopped reading this file", line=line)
                position = end
                yield line, _BadRow(f"the JSON {problem}") if problem else element
                position = JSON_SPACE.match(text, position).end()
                if text.startswith(",", position):
                    position = JSON_SPACE.match(text, position + 1).end()
                elif text.startswith("]", position):
                    position += 1
                    break
                else:
                    raise json.JSONDecodeError("Expecting ',' delimiter", text, position)
        position = JSON_SPACE.match(text, position).end()
        if position < len(text):
            raise json.JSONDecodeError("Extra data", text, position)
    except json.JSONDecodeError as error:
        raise _UnreadableFile(
            f"not valid JSON ({error.msg} at column {error.colno}); stopped reading this file", line=error.lineno
        ) from None


def _csv_rows(text: str) -> Iterator[tuple[int, Any]]:
    """CSV records as dicts keyed by the header, each with the line where the record starts (the header is line 1)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header = None
    next_start = 1
    try:
        for values in reader:
            start, next_start = next_start, reader.line_num + 1
            if not values:  # a blank line
                continue
            if header is None:
                header = values
            elif len(values) != len(header):
                fields = f"{len(values)} field" if len(values) == 1 else f"{len(values)} fields"
                problem = f"has {fields} but the header has {len(header)} columns; quote fields that hold commas"
                yield start, _BadRow(problem)
            else:
                yield start, dict(zip(header, values, strict=True))
    except csv.Error as error:
        raise _UnreadableFile(f"not valid CSV ({error}); stopped reading this file", line=next_start) from None


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except (OSError, ValueError, pyarrow.ArrowException) as error:
        raise _UnreadableFile(f"not a readable parquet file ({str(error).strip().splitlines()[0]})") from None
    yield from enumerate(table.to_pylist(), 1)


# ---------------------------------------------------------------------------------------------------------------
# From rows to conversations.


@dataclass
class _Problem:
    text: str
    whole_file: bool = False  # raised even when invalid rows are skipped


@dataclass
class _Turn:
    """One message on its way into a conversation; `label` names it in problems (`message 3 (user)`).

    Roles: system, user, assistant, tool (a tool result). An assistant turn may carry `calls`, raw (name, arguments)
    pairs as the data wrote them; they are checked against the row's tools in _conversation_problems.
    """

    role: str
    content: Any
    label: str
    calls: list[tuple[Any, Any]] = field(default_factory=list)
    trained: bool = True  # False for an assistant message with "loss": false (rendered, not trained)
    reasoning: Any = None  # an assistant message's reasoning_content (or its inline <think>...</think>)


class _ConversationReader:
    """Reads sources one after another, collecting every problem in file and line order."""

    def __init__(self, dataset_format: str, prompt_column: str, response_column: str, placeholders: dict):
        self.dataset_format = dataset_format
        self.prompt_column = prompt_column
        self.response_column = response_column
        self.placeholders = placeholders
        self.problems: list[_Problem] = []
        self.rows_read = 0
        self.invalid_rows = 0

    def read_piece(self, piece: str) -> list[dict]:
        sources, problem = _resolve(piece)
        if problem:
            self.problems.append(_Problem(problem, whole_file=True))
        conversations = []
        for source in sources:
            conversations += self.read_source(source)
        return conversations

    def read_source(self, source: _Source) -> list[dict]:
        conversations = []
        row_format = None if self.dataset_format == "auto" else self.dataset_format
        detect_each_row = self.dataset_format == "auto" and not source.tabular  # JSON rows may mix formats
        rows_in_source = 0
        missing_placeholders_reported = set()
        unknown_formats = {}  # the keys of rows whose format is unknown -> [problem, line of the first, count]
        try:
            for line, row in source.rows():
                rows_in_source += 1
                self.rows_read += 1
                where = f"{source.shown}:{line}"
                if (row_format is None or detect_each_row) and isinstance(row, dict):
                    # A row whose keys fit no format is read as the file's earlier rows were, to say what it lacks.
                    row_format = self.detect_format(row) or row_format
                    if row_format is None and source.tabular:  # every row has these keys: say it once
                        self.problems.append(_Problem(f"{where}: {self.unknown_format(row)}", whole_file=True))
                        return conversations
                    if row_format is None:  # said once for all the rows with these keys, at the first of them
                        keys = tuple(map(str, row))
                        if keys not in unknown_formats:
                            unknown_formats[keys] = [_Problem(""), line, 0]
                            self.problems.append(unknown_formats[keys][0])
                        unknown_formats[keys][2] += 1
                        self.invalid_rows += 1
                        continue
                conversation, problems = self.convert_row(row, row_format)
                if problems:
                    self.invalid_rows += 1
                    self.problems += [_Problem(f"{where}: {problem}") for problem in problems]
                    continue
                for name, problem in self.fill_placeholders(conversation["messages"]):
                    if name not in missing_placeholders_reported:
                        missing_placeholders_reported.add(name)
                        self.problems.append(_Problem(f"{where}: uses {{{{{name}}}}} but {problem}", whole_file=True))
                conversations.append({**conversation, "source": where})
        except _UnreadableFile as error:
            where = source.shown if error.line is None else f"{source.shown}:{error.line}"
            self.problems.append(_Problem(f"{where}: {error.problem}", whole_file=True))
            return conversations
        finally:
            for keys, (problem, line, count) in unknown_formats.items():
                problem.text = f"{source.shown}:{line}: {self.unknown_format(dict.fromkeys(keys), count)}"
        if rows_in_source == 0:
            self.problems.append(_Problem(f"{source.shown}: no rows", whole_file=True))
        return conversations

    def detect_format(self, row: dict) -> str | None:
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

    def unknown_format(self, row: dict, count: int = 1) -> str:
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

    def convert_row(self, row: Any, row_format: str | None) -> tuple[dict, list[str]]:
        """The row's canonical conversation {"messages"[, "tools"]}, or the problems that keep it from being one."""
        if isinstance(row, _BadRow):
            return {}, [row.problem]
        if not isinstance(row, dict):
            return {}, [f"expected a JSON object, got {json_type_name(row)}"]
        if row_format is None:
            return {}, [self.unknown_format(row)]
        if row_format == "columns":
            turns, problems = _turns_from_columns(row, self.prompt_column, self.response_column)
        else:
            turns, problems = ROW_CONVERTERS[row_format](row)
        tools, tool_problems = _row_tools(row, row_format)
        problems += tool_problems
        if problems:
            return {}, problems
        problems = _conversation_problems(turns, tools)
        if problems:
            return {}, problems
        messages = [_canonical_message(turn) for turn in _kept_turns(turns)]
        return ({"messages": messages, "tools": tools} if tools is not None else {"messages": messages}), []

    def fill_placeholders(self, messages: list[dict]) -> list[tuple[str, str]]:
        """Fill {{name}} and {{author}} in place; return (placeholder, what is wrong with its value) for those used
        that have no value, or a value with a control token in it (checked as message text is)."""
        unusable = {}

        def value_for(match: re.Match) -> str:
            name = match.group(1)
            key = PLACEHOLDER_RECIPE_KEYS[name]
            value = self.placeholders.get(name)
            if not isinstance(value, str) or not value.strip():
                unusable.setdefault(name, f"no value is set; set {key} in the recipe (or --{key})")
            elif token := control_token_in(value):
                unusable.setdefault(name, f"{key} ({_shown(value)}) contains the control token {token}; remove it")
            else:
                return value
            return match.group(0)

        for message in messages:
            if isinstance(message["content"], str):  # not a tool result given as a list of outputs
                message["content"] = _PLACEHOLDER.sub(value_for, message["content"])
        return [(name, unusable[name]) for name in PLACEHOLDER_RECIPE_KEYS if name in unusable]


def _turns_from_messages(row: dict) -> tuple[list[_Turn], list[str]]:
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
            problems.append(f"message {number} has role {_shown(role)}; expected one of {', '.join(ROLES)}")
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
            turns.append(_Turn("assistant", "", label, [call], trained=loss is not False))
            turns.append(_Turn("tool", _result(message["observation"]), label))
        elif role == "assistant" and _has_value(message.get("tool_calls")):
            calls = message["tool_calls"]
            if not isinstance(calls, list):
                problems.append(f'{label} has "tool_calls" of type {json_type_name(calls)}; expected a list of calls')
                continue
            content = "" if message.get("content") is None else message["content"]
            calls = [_openai_call(call) for call in calls]
            turns.append(
                _Turn("assistant", content, label, calls, loss is not False, message.get("reasoning_content"))
            )
        elif role == "assistant" and _has_value(message.get("metadata")):
            # GLM-4 native: the function name as metadata, the JSON arguments as content; ChatGLM3 writes a fenced
            # python tool_call(...) block as content instead.
            name, arguments = message["metadata"], message.get("content")
            if is_python_call(arguments):
                arguments, problem = python_call_arguments(name, arguments)
                if problem:
                    problems.append(f"{label}: {problem}")
                    continue
            turns.append(_Turn("assistant", "", label, [(name, arguments)], trained=loss is not False))
        elif role == "system" and _has_value(message.get("tools")) and not _has_value(message.get("content")):
            continue  # GLM-4 native: a system message that only carries the tools, which render their own block
        elif "content" not in message:
            problems.append(f'{label} has no "content"')
        elif role in ("tool", "observation"):
            turns.append(_Turn("tool", _result(message["content"]), label))
        elif role == "assistant":
            reasoning = message.get("reasoning_content")
            turns.append(_Turn(role, message["content"], label, [], loss is not False, reasoning))
        else:
            if message.get("reasoning_content") is not None:
                problems.append(f'{label} has "reasoning_content"; only assistant messages reason')
            turns.append(_Turn(role, message["content"], label))
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


def _list_in(row: dict, key: str, row_format: str, expected: str) -> tuple[list | None, list[_Turn], list[str]]:
    """(row[key], the row's system turn, no problem) when row[key] is a list, else (None, [], the problem)."""
    value = row.get(key)
    if value is None:
        return None, [], [f'{row_format} row has no "{key}" list']
    if not isinstance(value, list):
        return None, [], [f'"{key}" is of type {json_type_name(value)}; expected {expected}']
    return value, _system_turn(row), []


def _turns_from_sharegpt(row: dict) -> tuple[list[_Turn], list[str]]:
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
            problems.append(f"message {number} is from {_shown(speaker)}; expected one of {', '.join(SHAREGPT_ROLES)}")
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
            turns.append(_Turn("assistant", "", label, [_openai_call(call) for call in calls]))
        elif role == "tool":
            turns.append(_Turn("tool", _result(message["value"]), label))
        else:
            turns.append(_Turn(role, message["value"], label))
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


def _canonical_message(turn: _Turn) -> dict:
    message = {"role": turn.role, "content": turn.content}
    if turn.reasoning is not None:
        message["reasoning_content"] = turn.reasoning
    if turn.calls:
        message["tool_calls"] = [tool_call(name, arguments) for name, arguments in turn.calls]
    if not turn.trained:
        message["loss"] = False  # the templates render it outside their generation block
    return message


def _turns_from_alpaca(row: dict) -> tuple[list[_Turn], list[str]]:
    problems = [f'alpaca row has no "{key}"' for key in ("instruction", "output") if row.get(key) is None]
    if problems:
        return [], problems
    turns = _system_turn(row)
    history = row.get("history")
    if history is not None and not isinstance(history, list):
        return [], [f'"history" is of type {json_type_name(history)}; expected a list of [question, answer] pairs']
    for number, pair in enumerate(history or [], 1):
        if isinstance(pair, list) and len(pair) == 2:
            turns.append(_Turn("user", pair[0], f"history pair {number} question"))
            turns.append(_Turn("assistant", pair[1], f"history pair {number} answer"))
        else:
            problems.append(f"history pair {number} is not a [question, answer] pair: {_shown(pair)[:80]}")

    instruction, extra_input = row["instruction"], row.get("input")
    if extra_input is not None and not isinstance(extra_input, str):
        problems.append(f'"input" is of type {json_type_name(extra_input)}; expected a string')
    elif isinstance(instruction, str) and extra_input and extra_input.strip():
        instruction = f"{instruction}\n\n{extra_input}" if instruction.strip() else extra_input
    turns.append(_Turn("user", instruction, '"instruction"'))
    turns.append(_Turn("assistant", row["output"], '"output"'))
    return turns, problems


def _turns_from_firefly(row: dict) -> tuple[list[_Turn], list[str]]:
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
        turns.append(_Turn("user", exchange["human"], f'conversation turn {number} "human"'))
        turns.append(_Turn("assistant", exchange["assistant"], f'conversation turn {number} "assistant"'))
    return turns, problems


def _turns_from_columns(row: dict, prompt_column: str, response_column: str) -> tuple[list[_Turn], list[str]]:
    problems = [
        f'row has no "{column}" column (keys: {", ".join(map(str, row))}); set {option} to the column that holds it'
        for column, option in ((prompt_column, "prompt_column"), (response_column, "response_column"))
        if column not in row
    ]
    if problems:
        return [], problems
    return [
        _Turn("user", row[prompt_column], f'column "{prompt_column}"'),
        _Turn("assistant", row[response_column], f'column "{response_column}"'),
    ], []


# Each row format's converter: row -> (turns, problems); the columns format, which also needs the recipe's column
# names, is called apart.
ROW_CONVERTERS = {
    "messages": _turns_from_messages,
    "sharegpt": _turns_from_sharegpt,
    "alpaca": _turns_from_alpaca,
    "firefly": _turns_from_firefly,
}


def _system_turn(row: dict) -> list[_Turn]:
    """The optional top-level `system` of sharegpt, alpaca and firefly rows; an empty one means none."""
    system = row.get("system")
    if system is None or (isinstance(system, str) and not system.strip()):
        return []
    return [_Turn("system", system, '"system"')]


def _conversation_problems(turns: list[_Turn], tools: list[dict] | None) -> list[str]:
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


def _reasoning_problems(turn: _Turn) -> list[str]:
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


def _kept_turns(turns: list[_Turn]) -> list[_Turn]:
    """The turns of the conversation: an empty system message is kept only at the start, where ChatGLM3 renders it
    (`<|system|>` and a newline, as its own builder does) and GLM-4's template renders nothing."""
    return [turn for index, turn in enumerate(turns) if turn.role != "system" or index == 0 or turn.content.strip()]


def _call_problems(turn: _Turn, tools: list[dict] | None) -> list[str]:
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


def _result_order_problems(turns: list[_Turn]) -> list[str]:
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


def _shown(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


# ---------------------------------------------------------------------------------------------------------------
# The run's rows: training and eval data, read and split.


def read_datasets(data_args, *, seed: int) -> tuple[list[dict], list[dict] | None]:
    """Read and validate training (and eval) rows before anything heavy loads; split off eval rows by ratio."""
    options = {
        "dataset_format": data_args.dataset_format,
        "prompt_column": data_args.prompt_column,
        "response_column": data_args.response_column,
        "placeholders": {"name": data_args.assistant_name or "", "author": data_args.assistant_author or ""},
        "skip_invalid_rows": data_args.skip_invalid_rows,
    }
    max_samples = data_args.max_samples
    if max_samples is not None and (isinstance(max_samples, bool) or max_samples < 1):
        raise UserError(f"max_samples must be a number of rows, 1 or more; got {max_samples}")
    if data_args.eval_dataset_name and data_args.val_size:
        raise UserError("set either eval_dataset_name or val_size, not both")
    # Training and eval data are both read before either's problems are raised, so that one report lists them all.
    found, problems, total = [], [], 0
    for name in filter(None, (data_args.dataset_name, data_args.eval_dataset_name)):
        try:
            found.append(read_conversations(name, **options))
        except DataError as error:
            problems, total = problems + error.problems, total + error.total
    if problems:
        raise DataError(problems, total=total)
    train_rows, stats = found[0]
    report = f"data: {stats.read} rows read from {data_args.dataset_name}"
    if stats.skipped:
        report += f", {stats.skipped} invalid rows skipped"
    if max_samples is not None and max_samples < len(train_rows):
        report += f", first {max_samples} kept (max_samples)"
        train_rows = train_rows[:max_samples]
    eval_rows = None
    if data_args.eval_dataset_name:
        eval_rows, eval_stats = found[1]
        report += f"; {eval_stats.read} eval rows read from {data_args.eval_dataset_name}"
    elif data_args.val_size:
        train_rows, eval_rows = split_rows(train_rows, data_args.val_size, seed)
        report += f"; {len(eval_rows)} held out for evaluation (val_size={data_args.val_size})"
    print(report, file=sys.stderr)
    return train_rows, eval_rows


def split_rows(rows: list[dict], val_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded random hold-out of `val_size` (a fraction below 1, or a count); both parts keep file order."""
    import random

    count = int(val_size) if val_size >= 1 else round(len(rows) * val_size)
    if val_size < 0 or count < 1 or count >= len(rows):
        raise UserError(f"val_size={val_size} leaves no training or no evaluation rows out of {len(rows)}")
    held_out = set(random.Random(seed).sample(range(len(rows)), count))
    train = [row for index, row in enumerate(rows) if index not in held_out]
    evaluation = [row for index, row in enumerate(rows) if index in held_out]
    return train, evaluation
