"""Folders that are never seen half-written: the final save of a run and an export.

The new content is written complete into a staging folder; its files are flushed to disk, then a plan of the swap is
written into the staging folder (decide). Until the plan is complete the old content is untouched; from then on the
swap is decided, and a process killed while carrying it out leaves the plan for the next start to finish. The swap
comes in two shapes: files moved into a folder that keeps its other files (a run's output_dir keeps its checkpoints
and logs: plan_move, then carry_out), and a folder renamed in place of another as a whole (an export:
replace_folder, with finish_cut_off_replace for the next start).

Also here: what a failed write amounts to (storage_error), sizes in messages, and weight files that follow the umask.
"""

import errno
import fnmatch
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

# In a staging folder once its new content is complete: {"complete": true, ...} and what the swap does.
SWAP_PLAN = ".swap-plan.json"
# Beside a folder replaced as a whole (an export): .NAME.exporting-PID-*, the new content; .NAME.old-PID-*, the old
# one set aside until the new one is in place.
STAGED, SET_ASIDE = "exporting", "old"


def decide(staging: Path, plan: dict) -> None:
    """Flush every file under staging to disk, then write the plan: from here on the swap is decided. A failure
    before the plan is whole (a full disk) leaves no plan, so the old content stays."""
    for path in staging.rglob("*"):
        if path.is_file() and path.name != SWAP_PLAN:
            with open(path, "rb") as file:
                os.fsync(file.fileno())  # the content is on disk before a name points at it
    path = staging / SWAP_PLAN
    try:
        with open(path, "w", encoding="utf-8") as file:
            json.dump({**plan, "complete": True}, file)
            file.flush()
            os.fsync(file.fileno())
        fsync_folder(staging)
    except BaseException:
        path.unlink(missing_ok=True)  # not decided: the old content stays
        raise


def read_plan(staging: Path, lists=()) -> dict | None:
    """The plan in a staging folder, or None when there is none, it was cut off while being written, or one of its
    `lists` of names is not one."""
    try:
        plan = json.loads((staging / SWAP_PLAN).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(plan, dict) or plan.get("complete") is not True:
        return None
    names = [plan.get(key) for key in lists]
    return plan if all(isinstance(each, list) and all(isinstance(n, str) for n in each) for each in names) else None


def plan_move(staging: Path, folder: Path, replaced=(), last=()) -> dict:
    """Decide moving every file under staging into folder: `last` (the files that mark the content finished) move
    last, and folder's files matching the `replaced` patterns that the new content lacks are removed with it."""
    files = sorted(path.relative_to(staging).as_posix() for path in staging.rglob("*") if path.is_file())
    files = [name for name in files if name != SWAP_PLAN]
    files.sort(key=lambda name: name in last)  # stable: the markers last, the rest in name order
    new = set(files)
    stale = sorted(
        path.name
        for path in folder.iterdir()
        if path.is_file() and path.name not in new and any(fnmatch.fnmatch(path.name, p) for p in replaced)
    )
    plan = {"move": files, "remove": stale}
    decide(staging, plan)
    return plan


def carry_out(staging: Path, folder: Path, plan: dict) -> None:
    """The swap of a plan_move plan: remove the old files the new content lacks, move the new files in, remove the
    staging folder. A step done already is skipped (a second run of a plan, another process carrying out the same)."""
    for name in plan["remove"]:
        (folder / name).unlink(missing_ok=True)
    for name in plan["move"]:
        source, target = staging / name, folder / name
        if not source.is_file():
            continue  # moved in already
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(source, target)
        except FileNotFoundError:
            if source.exists():
                raise
    fsync_folder(folder)
    (staging / SWAP_PLAN).unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)


def staging_beside(target: Path) -> Path:
    """A new, empty staging folder beside target for content that will replace it as a whole (replace_folder), with
    the permissions of an ordinary folder."""
    staging = Path(tempfile.mkdtemp(prefix=_prefix(target, STAGED), dir=target.parent))
    os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes it private
    return staging


def _prefix(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-{os.getpid()}-"


def replace_folder(staging: Path, target: Path) -> None:
    """Put the complete folder staging (from staging_beside) in place of target as a whole: decided, then the old
    target is set aside beside it, staging renamed to target, the old one removed. A failure before the rename
    leaves target as it was and nothing beside it but staging (for the caller to remove)."""
    decide(staging, {"replace": target.name})
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=_prefix(target, SET_ASIDE), dir=target.parent))
        try:
            os.replace(target, old / target.name)
        except OSError:
            old.rmdir()  # nothing was set aside: leave nothing beside target
            raise
    try:
        os.replace(staging, target)
    except OSError:
        if old is not None:  # the old target goes back
            os.replace(old / target.name, target)
            old.rmdir()
        raise
    (target / SWAP_PLAN).unlink(missing_ok=True)
    fsync_folder(target.parent)
    if old is not None:
        shutil.rmtree(old)


def finish_cut_off_replace(target: Path, what: str, say) -> None:
    """What a replace_folder into target whose process is gone left beside it: its new folder is put in place when
    it was decided and target is missing (finished), else removed; an old target set aside is put back when target
    is missing (rolled back), else removed. `say` tells each step, naming `what` was stopped ("an export")."""
    if not target.parent.is_dir():
        return
    (target / SWAP_PLAN).unlink(missing_ok=True)  # renamed in, then cut off before the plan went
    for kind in (STAGED, SET_ASIDE):
        for folder in sorted(target.parent.glob(f".{target.name}.{kind}-*")):
            pid = folder.name.removeprefix(f".{target.name}.{kind}-").split("-")[0]
            if pid.isdigit() and int(pid) != os.getpid() and process_alive(int(pid)):
                continue  # being written now
            if kind == STAGED and not target.exists() and read_plan(folder) is not None:
                os.replace(folder, target)
                (target / SWAP_PLAN).unlink(missing_ok=True)
                say(f"note: put {target} in place from {folder}, which {what} that was stopped had finished writing")
                continue
            set_aside = folder / target.name
            if kind == SET_ASIDE and set_aside.is_dir() and not target.exists():
                os.replace(set_aside, target)
                say(f"note: put back {target}, which {what} that was stopped had set aside in {folder}")
            shutil.rmtree(folder, ignore_errors=True)
            say(f"note: removed {folder}, left by {what} that was stopped")


def fsync_folder(folder: Path) -> None:
    """Renames and new names in folder on disk (where the file system lets a folder be flushed)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    try:  # a zombie (exited, not yet reaped) is not running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def storage_error(error: Exception, folder=None) -> OSError | None:
    """The OSError a failed write amounts to, or None when the error is not about storage. safetensors raises its own
    error for a full disk (with the errno in its text); torch.save a RuntimeError from its zip writer with no errno,
    taken for a full disk when `folder` (where it was writing) has next to no space left."""
    if isinstance(error, OSError):
        return error
    text = str(error)
    found = re.search(r"os error (\d+)", text)
    if "safetensor" in type(error).__name__.lower() and found:
        return OSError(int(found[1]), os.strerror(int(found[1])))
    if isinstance(error, RuntimeError) and ("inline_container.cc" in text or "PytorchStreamWriter" in text):
        try:
            full = folder is not None and shutil.disk_usage(folder).free < 1024 * 1024
        except OSError:
            full = False
        if full:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return OSError(errno.EIO, "a file could not be written completely (torch.save)")
    return None


def folder_size(folder) -> int:
    folder = Path(folder)
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) if folder.is_dir() else 0


def free_space_note(folder) -> str:
    """The note `, N GB free there` for the file system of `folder`; empty when that cannot be told."""
    try:
        return f", {human_size(shutil.disk_usage(folder).free)} free there"
    except OSError:
        return ""


def human_size(size: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def current_umask() -> int:
    """This process's umask (read without changing it where /proc tells it)."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(folder) -> None:
    """Give the weight files under `folder` the permissions of the other files of a save (0644 under umask 022):
    safetensors writes them owner-only (0600), whatever the umask."""
    mode = 0o666 & ~current_umask()
    for path in Path(folder).rglob("*.safetensors"):
        if path.is_file() and stat.S_IMODE(path.stat().st_mode) != mode:
            os.chmod(path, mode)
