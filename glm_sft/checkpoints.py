"""Checkpoints and resuming: which checkpoint-N folders of a run are complete, the one to resume from, and the command
that resumes a run.

A checkpoint folder `checkpoint-N` is complete once its trainer_state.json exists and reads back, and its weight files
are whole: transformers writes trainer_state.json last, so a folder without it was cut off while being written; a
truncated state or weight file (a full disk, a crash of the machine) is caught by reading it. Neither is resumed from.
"""

import json
import re
import shlex
import sys
from pathlib import Path

from glm_sft import UserError

STATE_FILE = "trainer_state.json"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def _safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file cannot be whole (empty, header or data cut off), or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            head = file.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length < 0 or 8 + length > size:
                return f"{path.name} is cut off ({size} bytes)"
            header = json.loads(file.read(length))
    except (OSError, ValueError):
        return f"{path.name} cannot be read"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    if 8 + length + max(ends, default=0) > size:
        return f"{path.name} is cut off ({size} bytes)"
    return None


def checkpoint_problem(checkpoint) -> str | None:
    """Why checkpoint-N cannot be resumed from (cut off while saving, a truncated file), or None when it is whole."""
    folder = Path(checkpoint)
    state = folder / STATE_FILE
    if not state.is_file():
        return f"no {STATE_FILE}: the run was stopped while saving"
    try:
        if not isinstance(json.loads(state.read_text(encoding="utf-8")), dict):
            raise ValueError
    except (OSError, ValueError):
        return f"{STATE_FILE} is cut off or unreadable"
    return weights_problem(folder)


def weights_problem(folder) -> str | None:
    """Why the weight files of a checkpoint or model folder cannot be whole (empty, cut off), or None."""
    folder = Path(folder)
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*/*.safetensors")):
        if problem := _safetensors_problem(path):
            return problem
    for pattern in ("*.bin", "*.pt", "*.pth"):
        for path in sorted(folder.glob(pattern)):
            if path.is_file() and path.stat().st_size == 0:
                return f"{path.name} is empty"
    return None


def is_complete(checkpoint) -> bool:
    return checkpoint_problem(checkpoint) is None


def checkpoint_step(checkpoint) -> int | None:
    """The global step a complete checkpoint was saved at."""
    try:
        return int(json.loads((Path(checkpoint) / STATE_FILE).read_text(encoding="utf-8"))["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_checkpoints(output_dir) -> tuple[list[Path], list[Path]]:
    """(complete, incomplete) checkpoint folders in output_dir, each list ordered by step."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return [], []
    found = [(int(match[1]), path) for path in folder.iterdir() if (match := CHECKPOINT_NAME.match(path.name))]
    ordered = [path for _, path in sorted(found) if path.is_dir()]
    return [path for path in ordered if is_complete(path)], [path for path in ordered if not is_complete(path)]


def resolve_resume_checkpoint(value, output_dir, announce: bool = True) -> str | None:
    """The checkpoint to hand to trainer.train() for the recipe key resume_from_checkpoint, or None to start fresh.

    true (YAML boolean or the string) means the last complete checkpoint in output_dir; false or empty means none;
    anything else is the path of one checkpoint, which must be complete.
    """
    if value is None or value is False or str(value).strip().lower() in ("", "false"):
        return None
    if value is True or str(value).strip().lower() == "true":
        complete, incomplete = list_checkpoints(output_dir)
        if incomplete and announce:
            for path in incomplete:
                print(
                    f"warning: skipping incomplete checkpoint {path} ({checkpoint_problem(path)}); left in place",
                    file=sys.stderr,
                )
        if not complete:
            if announce:
                print(
                    f"note: resume_from_checkpoint is true but {output_dir} holds no complete checkpoint; "
                    "starting from the beginning",
                    file=sys.stderr,
                )
            return None
        checkpoint = str(complete[-1])
    else:
        checkpoint = str(value)
        if not Path(checkpoint).is_dir():
            raise UserError(f"resume_from_checkpoint: {checkpoint} does not exist (or is not a folder)")
        if problem := checkpoint_problem(checkpoint):
            raise UserError(
                f"resume_from_checkpoint: {checkpoint} is not a complete checkpoint ({problem}); pass an earlier "
                "checkpoint, or --resume_from_checkpoint true for the last complete one"
            )
    if announce:
        print(f"resuming from {checkpoint}", file=sys.stderr)
    return checkpoint


def resume_command(argv: list[str] | None = None, several_processes: bool = False) -> str:
    """The user's command line with --resume_from_checkpoint true (replacing any value they gave)."""
    script = sys.argv[0] if argv is None else "train.py"
    args = list(sys.argv[1:] if argv is None else argv)
    kept = []
    skip_value = False
    for arg in args:
        if skip_value:
            skip_value = False
        elif arg == "--resume_from_checkpoint":
            skip_value = True
        elif not arg.startswith("--resume_from_checkpoint="):
            kept.append(arg)
    launcher = "accelerate launch <your launch options>" if several_processes else "python"
    return f"{launcher} {shlex.join([script, *kept, '--resume_from_checkpoint', 'true'])}"
