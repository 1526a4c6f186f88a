"""What a run's output_dir holds, kept safe: checked before training (writable, no finished model unless told to
replace it), one run at a time (a lock), and one complete model at every moment: a final save that a killed process
left half-done is finished (or undone) by the next train.py, chat_cli, serve or export run in that folder.

The final save (glm_sft.saving) writes the new model into the staging folder output_dir/.saving-final-model and moves
it in by a decided plan (glm_sft.staging): a plan that is there is carried out, a staging folder without one removed.
"""

import atexit
import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from glm_sft import UserError
from glm_sft.staging import carry_out, process_alive, read_plan

# The files that make an output_dir hold a finished model; the final save moves them in last.
FINISHED_MARKERS = ("adapter_config.json", "model.safetensors", "model.safetensors.index.json")
# Where the final save is written before its files are moved into output_dir (a dot folder: no tool lists it).
STAGING_NAME = ".saving-final-model"
# Held by the run training into output_dir: {"pid", "host", "started"}; created atomically, removed at the end.
LOCK_NAME = ".glm-sft.lock"


def check_writable_dir(path, what: str = "output_dir") -> None:
    """`path` is (or can be made) a directory this process can write into; found before any weights load."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is under {existing}, which is a file"
        raise UserError(f"{what} {path} {where}, not a directory; choose another --{what}")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".glm-sft-write-test-"):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise UserError(
            f"{what} {path} cannot be written ({reason}: {existing}); choose another --{what}, or make it writable"
        ) from None


def check_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuse to train over a finished model unless asked to, so a re-run never silently destroys a result; refuse an
    output_dir that cannot be written, before training rather than at the final save. A final save into it that was
    cut off is finished first (or undone, when cut off before its new model was complete)."""
    check_writable_dir(output_dir)
    path = Path(output_dir)
    finish_cut_off_save(path)
    finished = [name for name in FINISHED_MARKERS if (path / name).exists()]
    if finished and not overwrite:
        raise UserError(
            f"{output_dir} already holds a finished model ({finished[0]}); pass --overwrite_output_dir true to "
            "replace it, or choose another --output_dir"
        )


def _lock_owner(lock: Path) -> dict | None:
    try:
        owner = json.loads(lock.read_text(encoding="utf-8"))
        return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None
    except (OSError, ValueError):
        return None


_held_locks: set[Path] = set()


def acquire_output_lock(output_dir) -> Path:
    """Take output_dir/.glm-sft.lock for this process, so that a second run into the same output_dir is refused.

    A lock whose process is gone (same host, pid not alive) is stale: replaced with a warning. A lock this process
    already holds is kept (a second run built in the same process). Released by release_output_locks, which
    exit_on_user_error calls when a script ends, and at interpreter exit.
    """
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(50):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner is None:  # just created and not yet written, or garbage: garbage once it is a few seconds old
                with contextlib.suppress(OSError):
                    if time.time() - lock.stat().st_mtime > 10:
                        print(f"warning: replacing the unreadable lock file {lock}", file=sys.stderr)
                        lock.unlink()
                time.sleep(0.2)
                continue
            if owner["pid"] == me["pid"] and owner.get("host") == me["host"]:
                break  # ours already
            if owner.get("host") == me["host"] and not process_alive(owner["pid"]):
                print(
                    f"warning: {output_dir} was locked by process {owner['pid']}, which is no longer running (stopped "
                    "without cleaning up); taking it over",
                    file=sys.stderr,
                )
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
                continue
            since = owner.get("started", "an unknown time")
            raise UserError(
                f"{output_dir} is in use by another training run (pid {owner['pid']} on {owner.get('host')}, since "
                f"{since}); wait for it to finish or choose another --output_dir (if that run is gone, delete {lock})"
            ) from None
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            json.dump({**me, "started": time.strftime("%Y-%m-%d %H:%M:%S")}, file)
        break
    else:
        raise UserError(f"{lock} could not be taken (it keeps changing); is another run starting in {output_dir}?")
    if not _held_locks:
        atexit.register(release_output_locks)
    _held_locks.add(lock)
    return lock


def release_output_locks() -> None:
    """Remove the output_dir locks this process holds (those still naming this process)."""
    for lock in list(_held_locks):
        _held_locks.discard(lock)
        owner = _lock_owner(lock)
        if owner and owner["pid"] == os.getpid() and owner.get("host") == socket.gethostname():
            with contextlib.suppress(OSError):
                lock.unlink()


def _saving_now(folder: Path) -> dict | None:
    """The owner of folder's lock when it is another process that is running (a training run saving into it)."""
    owner = _lock_owner(folder / LOCK_NAME)
    if owner is None or (owner["pid"] == os.getpid() and owner.get("host") == socket.gethostname()):
        return None
    if owner.get("host") == socket.gethostname() and not process_alive(owner["pid"]):
        return None
    return owner


def finish_cut_off_save(folder, reading: bool = False) -> None:
    """A final save into `folder` that a killed process left is finished (its plan was written: the new model is
    complete) or removed (cut off before that: the old model is untouched), so that folder holds one complete model.

    Nothing is touched while another running process holds folder's lock (it is saving now): train.py's own lock
    check refuses that run; a reader (`reading`: chat_cli, serve, export) gets a UserError when the model in folder is
    being replaced at that moment.
    """
    folder = Path(folder)
    staging = folder / STAGING_NAME
    if not staging.is_dir():
        return
    plan = read_plan(staging, lists=("move", "remove"))
    if (owner := _saving_now(folder)) is not None:
        if reading and plan is not None:
            raise UserError(
                f"{folder} is being replaced by the final save of a training run (pid {owner['pid']} on "
                f"{owner.get('host')}); wait for it to finish"
            )
        return
    try:
        if plan is None:
            shutil.rmtree(staging, ignore_errors=True)  # cut off before it was complete: the old model is whole
            return
        carry_out(staging, folder, plan)
    except OSError as error:
        raise UserError(
            f"{folder}: a final save into it was cut off and cannot be finished ({error.strerror or error}); "
            f"make {folder} writable and run this again, or train again into it"
        ) from None
    print(
        f"note: finished the final save into {folder} that was cut off (the new model is now in place)",
        file=sys.stderr,
    )
