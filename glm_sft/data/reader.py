"""Files to canonical conversations: each source's rows through their format's converter and the checks, with the
{{name}}/{{author}} placeholders filled, every problem collected in file and line order.
"""

import re
import sys
from dataclasses import dataclass
from typing import Any

from glm_sft import UserError
from glm_sft.data.checks import DataError, checked_messages, listing
from glm_sft.data.formats import DATASET_FORMATS, RowFormats, shown
from glm_sft.data.sources import BadRow, Source, UnreadableFile, resolve
from glm_sft.jsonio import json_type_name
from glm_sft.template import control_token_in

PLACEHOLDER_RECIPE_KEYS = {"name": "assistant_name", "author": "assistant_author"}
_PLACEHOLDER = re.compile(r"\{\{\s*(name|author)\s*\}\}")


@dataclass
class DataStats:
    """How many rows read_conversations read, used and skipped."""

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
    assistant "tool_calls" in tool-calling rows (tools as glm_sft/tools.py defines them, calls as glm_sft/replies.py
    does). All problems in all files are collected and raised together as one DataError. With skip_invalid_rows,
    invalid rows are skipped and printed as warnings instead; problems with whole files still raise.
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
        for line in listing(row_problems[:max_problems], len(row_problems)):
            print(f"  {line}", file=sys.stderr)
    file_problems = [problem.text for problem in reader.problems if problem.whole_file]
    if file_problems:
        raise DataError(file_problems[:max_problems], total=len(file_problems))
    if not conversations:
        raise DataError([f"{spec}: no valid rows; all {reader.invalid_rows} rows were invalid (see the warnings)"])
    return conversations, DataStats(read=reader.rows_read, used=len(conversations), skipped=reader.invalid_rows)


@dataclass
class _Problem:
    """One line of the report, `path:line: what is wrong`."""

    text: str
    whole_file: bool = False  # raised even when invalid rows are skipped


class _ConversationReader:
    """Reads sources one after another, collecting every problem in file and line order."""

    def __init__(self, dataset_format: str, prompt_column: str, response_column: str, placeholders: dict):
        self.dataset_format = dataset_format
        self.formats = RowFormats(prompt_column, response_column)
        self.placeholders = placeholders
        self.problems: list[_Problem] = []
        self.rows_read = 0
        self.invalid_rows = 0

    def read_piece(self, piece: str) -> list[dict]:
        sources, problem = resolve(piece)
        if problem:
            self.problems.append(_Problem(problem, whole_file=True))
        conversations = []
        for source in sources:
            conversations += self.read_source(source)
        return conversations

    def read_source(self, source: Source) -> list[dict]:
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
                    row_format = self.formats.detect(row) or row_format
                    if row_format is None and source.tabular:  # every row has these keys: say it once
                        self.problems.append(_Problem(f"{where}: {self.formats.unknown(row)}", whole_file=True))
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
        except UnreadableFile as error:
            where = source.shown if error.line is None else f"{source.shown}:{error.line}"
            self.problems.append(_Problem(f"{where}: {error.problem}", whole_file=True))
            return conversations
        finally:
            for keys, (problem, line, count) in unknown_formats.items():
                problem.text = f"{source.shown}:{line}: {self.formats.unknown(dict.fromkeys(keys), count)}"
        if rows_in_source == 0:
            self.problems.append(_Problem(f"{source.shown}: no rows", whole_file=True))
        return conversations

    def convert_row(self, row: Any, row_format: str | None) -> tuple[dict, list[str]]:
        """The row's canonical conversation {"messages"[, "tools"]}, or the problems that keep it from being one."""
        if isinstance(row, BadRow):
            return {}, [row.problem]
        if not isinstance(row, dict):
            return {}, [f"expected a JSON object, got {json_type_name(row)}"]
        if row_format is None:
            return {}, [self.formats.unknown(row)]
        turns, tools, problems = self.formats.turns(row, row_format)
        if problems:
            return {}, problems
        messages, problems = checked_messages(turns, tools)
        if problems:
            return {}, problems
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
                unusable.setdefault(name, f"{key} ({shown(value)}) contains the control token {token}; remove it")
            else:
                return value
            return match.group(0)

        for message in messages:
            if isinstance(message["content"], str):  # not a tool result given as a list of outputs
                message["content"] = _PLACEHOLDER.sub(value_for, message["content"])
        return [(name, unusable[name]) for name in PLACEHOLDER_RECIPE_KEYS if name in unusable]
