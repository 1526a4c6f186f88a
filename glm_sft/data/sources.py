"""Where the rows come from: files (.json, .jsonl, .csv, .parquet), folders of them and hub dataset ids.

A source yields (line, row) pairs, the line being where the row starts in its file. A row that cannot be parsed comes
as a BadRow; a file that cannot be read on raises UnreadableFile.
"""

import csv
import io
import json
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glm_sft.jsonio import JSON_SPACE, StrictJSON

SUPPORTED_EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet")

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# What a path that is neither a file nor a folder is, by its stat mode.
_PATH_KINDS = {
    stat.S_ISCHR: "a character device",
    stat.S_ISBLK: "a block device",
    stat.S_ISFIFO: "a named pipe (FIFO)",
    stat.S_ISSOCK: "a socket",
}


@dataclass
class BadRow:
    """A row that could not be parsed at all."""

    problem: str


class UnreadableFile(Exception):
    """Reading a file had to stop; `line` says where, when it is known."""

    def __init__(self, problem: str, line: int | None = None):
        super().__init__(problem)
        self.problem = problem
        self.line = line


@dataclass
class Source:
    """One file or hub dataset; `rows()` reads it."""

    shown: str  # the name problems and `source` use: the path as the user wrote it
    rows: Callable[[], Iterator[tuple[int, Any]]]
    tabular: bool  # every row has the same keys (CSV, parquet, hub), so a format problem is reported once


def resolve(piece: str) -> tuple[list[Source], str | None]:
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


def _file_source(shown: str, path: Path) -> Source:
    extension = path.suffix.lower()
    if extension == ".parquet":
        return Source(shown, lambda: _parquet_rows(path), tabular=True)
    if extension == ".csv":
        return Source(shown, lambda: _csv_rows(_read_text(path)), tabular=True)
    if extension == ".jsonl":
        return Source(shown, lambda: _json_lines_rows(_read_text(path)), tabular=False)
    return Source(shown, lambda: _json_rows(_read_text(path)), tabular=False)


def _hub_source(dataset_id: str) -> tuple[list[Source], str | None]:
    try:
        import datasets

        dataset = datasets.load_dataset(dataset_id, split="train")
    except Exception as error:  # noqa: BLE001 (no network, no such dataset, no train split: all for the user to fix)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return [], (
            f"{dataset_id}: not a local file or folder, and the hub dataset could not be loaded ({reason[:200]})"
        )
    return [Source(dataset_id, lambda: enumerate(dataset, 1), tabular=True)], None


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UnreadableFile(f"cannot be read ({error.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line_start = data.rfind(b"\n", 0, error.start) + 1
        raise UnreadableFile(
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
        raise UnreadableFile(
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
            yield number, BadRow(f"not valid JSON ({error.msg} at column {error.colno})")
            continue
        yield number, BadRow(f"the JSON {problem}") if problem else row


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
                    raise UnreadableFile(f"the JSON {problem}; stopped reading this file", line=line)
                position = end
                yield line, BadRow(f"the JSON {problem}") if problem else element
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
        raise UnreadableFile(
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
                yield start, BadRow(problem)
            else:
                yield start, dict(zip(header, values, strict=True))
    except csv.Error as error:
        raise UnreadableFile(f"not valid CSV ({error}); stopped reading this file", line=next_start) from None


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except (OSError, ValueError, pyarrow.ArrowException) as error:
        raise UnreadableFile(f"not a readable parquet file ({str(error).strip().splitlines()[0]})") from None
    yield from enumerate(table.to_pylist(), 1)
