"""What a run leaves in output_dir, kept safe: the output_dir checks (writable, finished model, one run at a time), the
checkpoint to resume from, a clean stop on Ctrl-C / SIGTERM or on a checkpoint that cannot be written, a final save
that never leaves a half-written model and never costs the run when it fails, weights as readable as the other files.

A checkpoint folder `checkpoint-N` is complete once its trainer_state.json exists and reads back, and its weight files
are whole: transformers writes trainer_state.json last, so a folder without it was cut off while being written; a
truncated state or weight file (a full disk, a crash of the machine) is caught by reading it. Neither is resumed from.

The final save replaces the model in output_dir as a whole: the new model is written complete into a staging folder,
then a plan (the files to move in, the old model's files to remove) is written into it, and only then is anything in
output_dir touched. A process killed before the plan leaves the old model as it was; one killed after it leaves a
plan that the next train.py, chat_cli, serve or export run in that folder carries out (finish_cut_off_save).
"""

import atexit
import contextlib
import errno
import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

from glm_sft import UserError

# The files that make an output_dir hold a finished model; the final save moves them in last.
FINISHED_MARKERS = ("adapter_config.json", "model.safetensors", "model.safetensors.index.json")

STATE_FILE = "trainer_state.json"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
# Where the final save is written before its files are moved into output_dir (a dot folder: no tool lists it).
STAGING_NAME = ".saving-final-model"
# In the staging folder once the new model in it is complete: {"move": [files], "remove": [old files], "complete"}.
SWAP_PLAN = ".swap-plan.json"
# The files a final save can write at the top of output_dir: those of an old model that the new one does not have are
# removed with it (an adapter's files beside a new full model, shards of a larger model, a chat_template.jinja that
# would override the new tokenizer's template).
MODEL_FILE_PATTERNS = (
    "adapter_config.json",
    "adapter_model.*",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "training_args.bin",
    "trainer_state.json",
    "recipe.yaml",
    "run.json",
)
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


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    try:  # a zombie (exited, not yet reaped) is not a running training
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


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


class GracefulStop(TrainerCallback):
    """While training, the first SIGINT (Ctrl-C) or SIGTERM asks for a checkpoint and a stop at the end of the step.

    Use `with stop.catching_signals(): trainer.train(...)`. After the first signal the previous handlers are back,
    so a second Ctrl-C raises KeyboardInterrupt as usual. With several processes, a signal seen by any of them
    stops all of them at the same step.

    The checkpoints the trainer saves get the same care: their weight files follow the umask (follow_umask), and a
    checkpoint that cannot be written (a full disk) ends training inside catching_signals with a UserError that says
    what failed, the space a checkpoint needs, that the partial checkpoint was removed, which complete checkpoint is
    left and the command that resumes from it (`argv`: the user's command line, else sys.argv).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool = True, argv: list[str] | None = None):
        self.announce = announce
        self.argv = argv
        self.signal_number = None  # the signal received, if any
        self.stopped_at_step = None  # the step at which training was stopped and a checkpoint saved, if it was
        self._previous_handlers = {}
        self._training = None  # (args, state, model) of the training under way, from on_train_begin
        self._saving = None  # the checkpoint folder the trainer is about to write (or writing), until on_save

    @property
    def exit_code(self) -> int:
        """The shell's code for death by the signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + (self.signal_number or signal.SIGTERM)

    @contextlib.contextmanager
    def catching_signals(self):
        self._install()
        try:
            yield self
        except Exception as error:
            if self._saving is None or (failure := storage_error(error, self._saving.parent)) is None:
                raise
            _close_progress_bars()  # the trainer's bar ends its line: the error is a line of its own
            raise UserError(self._failed_checkpoint_message(failure)) from None
        finally:
            self._restore()

    def _install(self) -> None:
        for number in self.SIGNALS:
            if signal.getsignal(number) is signal.SIG_IGN:
                continue  # ignored on purpose (nohup, a shell's background job): it stays ignored
            self._previous_handlers[number] = signal.signal(number, self._on_signal)

    def _restore(self) -> None:
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler)
        self._previous_handlers = {}

    def _on_signal(self, number, frame) -> None:
        self.signal_number = number
        self._restore()
        if self.announce:
            name = signal.Signals(number).name
            again = "; Ctrl-C again aborts without saving" if number == signal.SIGINT else ""
            message = f"\n{name} received: saving a checkpoint at the end of this step, then stopping{again}\n"
            try:  # os.write, not print: a signal handler must not re-enter a buffered stream that is mid-write
                os.write(2, message.encode())
            except OSError:
                pass

    def report(self, output_dir, max_steps: int, argv: list[str], several_processes: bool) -> str:
        """After a stop: the step, where its checkpoint is, and the command that resumes."""
        saved = Path(output_dir) / f"checkpoint-{self.stopped_at_step}"
        where = f"checkpoint in {saved}" if is_complete(saved) else "no checkpoint could be saved at this step"
        command = resume_command(argv, several_processes=several_processes)
        return f"stopped at step {self.stopped_at_step} of {max_steps}; {where}; resume with: {command}"

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._training = (args, state, model)

    def on_step_end(self, args, state, control, **kwargs):
        # Every process takes part in the check at every step, so that all of them stop at the same one.
        if true_on_any_process(self.signal_number is not None, args) and self.stopped_at_step is None:
            if state.global_step < state.max_steps:  # else that was the last step: the run finishes normally
                self.stopped_at_step = state.global_step
                control.should_save = True
                control.should_training_stop = True
        self._note_save(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._note_save(args, state, control)

    def _note_save(self, args, state, control) -> None:
        """The trainer saves checkpoint-N right after this step's (or epoch's) callbacks when should_save is set."""
        output_dir = getattr(args, "output_dir", None)
        self._saving = (
            Path(output_dir) / f"checkpoint-{state.global_step}" if control.should_save and output_dir else None
        )

    def on_save(self, args, state, control, **kwargs):
        if self._saving is not None and state.is_world_process_zero and self._saving.is_dir():
            follow_umask(self._saving)
        self._saving = None

    def _failed_checkpoint_message(self, failure: OSError) -> str:
        """The one line for a checkpoint that could not be written; removes what was written of it (main process)."""
        args, state, model = self._training or (None, None, None)
        checkpoint, output_dir = self._saving, self._saving.parent
        written = folder_size(checkpoint)
        removed = ""
        if checkpoint.is_dir() and not is_complete(checkpoint) and getattr(state, "is_world_process_zero", True):
            shutil.rmtree(checkpoint, ignore_errors=True)
            removed = f"the partial {checkpoint.name} was removed; "
        complete, _ = list_checkpoints(output_dir)
        needed = folder_size(complete[-1]) if complete else max(written, _checkpoint_size(model))
        command = resume_command(self.argv, several_processes=getattr(args, "world_size", 1) > 1)
        if complete:
            last = f"the last complete checkpoint is {complete[-1]}; once there is room, resume with: {command}"
        else:
            last = f"no earlier checkpoint is complete; once there is room, run again from the start: {command}"
        where = f" ({failure.filename})" if failure.filename else ""
        step = checkpoint.name.removeprefix("checkpoint-")
        return (
            f"training stopped at step {step}: saving {checkpoint} failed: {failure.strerror or failure}{where}; a "
            f"checkpoint needs about {human_size(needed)}{free_space_note(output_dir)}; {removed}{last}"
        )


def _close_progress_bars() -> None:
    """Close the tqdm bars still open (the trainer's, when training stops on an error)."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        with contextlib.suppress(Exception):
            bar.close()


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


def save_final_model(trainer, output_dir, write_extra_files, argv=None, several_processes=False) -> None:
    """trainer.save_model plus write_extra_files(folder), written into a staging folder inside output_dir and then
    put in place of the model output_dir held as a whole (move_into_place): a finished model is never overwritten by a
    half-written one, nor left beside parts of the old one, even when the process is killed.

    A save that fails (a full disk, permissions) does not cost the run: the staging folder is removed, the trained
    weights are kept (in the checkpoint of the last step, else written to a folder in the system's temporary
    directory) and a UserError says where, how much space the save needs and how to finish it (`argv`: the user's
    command line, for the resume command).

    Call it on every process (trainer.save_model must run everywhere); only the main process writes and moves.
    """
    output_dir = Path(output_dir)
    staging = output_dir / STAGING_NAME
    is_main = trainer.is_world_process_zero()
    failure = None
    if is_main and staging.exists():
        finish_cut_off_save(output_dir)  # left over from a save that was cut off: finished, or removed
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    try:
        trainer.save_model(str(staging))
        if is_main:
            write_extra_files(staging)
            follow_umask(staging)
            move_into_place(staging, output_dir)
    except Exception as error:
        if (failure := storage_error(error, output_dir)) is None:
            raise
    if true_on_any_process(failure is not None, getattr(trainer, "args", None)):
        _keep_the_trained_model(trainer, output_dir, staging, write_extra_files, failure, argv, several_processes)
    trainer.accelerator.wait_for_everyone()


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


def true_on_any_process(value: bool, args) -> bool:
    """Whether `value` is true on any process of the run (`args`: its training arguments, or None for one process).
    Every process must call it at the same point, so that all of them take the same way."""
    if getattr(args, "world_size", 1) > 1:
        import torch
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            flag = torch.tensor([1.0 if value else 0.0], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return flag.item() > 0
    return value


def folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file()) if folder.is_dir() else 0


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


def _weights_size(model) -> int:
    """What the saved weights take: the trainable ones for an adapter, all of them for a full model."""
    parameters = list(model.parameters())
    if hasattr(model, "peft_config"):
        parameters = [parameter for parameter in parameters if parameter.requires_grad]
    return sum(getattr(p, "ds_numel", None) or p.numel() for p in parameters) * (
        parameters[0].element_size() if parameters else 0
    )


def _checkpoint_size(model) -> int:
    """About what a checkpoint of `model` takes: its saved weights and, for each trainable value, Adam's two fp32
    moments."""
    if model is None:
        return 0
    trainable = sum(getattr(p, "ds_numel", None) or p.numel() for p in model.parameters() if p.requires_grad)
    return _weights_size(model) + 8 * trainable


def _rescue_folder(output_dir: Path, step: int) -> Path:
    base = Path(tempfile.gettempdir()) / f"glm-sft-{output_dir.name or 'run'}-final-step-{step}"
    folder, number = base, 1
    while folder.exists():
        number += 1
        folder = base.with_name(f"{base.name}-{number}")
    return folder


def _keep_the_trained_model(trainer, output_dir, staging, write_extra_files, failure, argv, several_processes):
    """After a failed final save: free what it wrote, keep the trained weights somewhere whole, raise a UserError."""
    is_main = trainer.is_world_process_zero()
    staged = folder_size(staging)
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
    needed = max(staged, _weights_size(trainer.model))
    step = trainer.state.global_step
    checkpoint = output_dir / f"checkpoint-{step}"
    if is_complete(checkpoint):
        kept = (
            f"the trained weights are safe in {checkpoint} (the checkpoint of the last step); once there is room, "
            f"finish the save (no training) with: {resume_command(argv, several_processes=several_processes)}"
        )
    else:
        rescue = _rescue_folder(output_dir, step)
        try:
            try:
                trainer.save_model(str(rescue))
                if is_main:
                    write_extra_files(rescue)
                    follow_umask(rescue)
            except Exception as error:
                if (rescue_failure := storage_error(error, rescue.parent)) is None:
                    raise
                raise rescue_failure from error
            needed = max(needed, folder_size(rescue))
            kept = (
                f"the trained model was written to {rescue} instead (all of the final save); move its files into "
                f"{output_dir} once there is room, or use it from there"
            )
        except OSError as error:
            if is_main:
                shutil.rmtree(rescue, ignore_errors=True)
            complete, _ = list_checkpoints(output_dir)
            last = f"the last complete checkpoint is {complete[-1]}" if complete else "no checkpoint was saved"
            kept = (
                f"writing it to {rescue} failed too ({error.strerror or error}); {last}; the weights of step {step} "
                "are lost"
            )
    free = free_space_note(output_dir)
    where = f" ({failure.filename})" if failure is not None and failure.filename else ""
    reason = (failure.strerror or str(failure)) if failure is not None else "it failed on another process"
    raise UserError(
        f"the final save into {output_dir} failed: {reason}{where}; it needs about {human_size(needed)}{free}; {kept}"
    )


def move_into_place(staging: Path, output_dir: Path) -> None:
    """Put the complete model in staging in place of the model output_dir holds, as a whole.

    First the plan: every file under staging (the files that mark a finished model last) and the old model's files
    the new one does not have, written into staging and flushed to disk. From then on the swap is decided: a process
    killed while carrying it out leaves the plan, which finish_cut_off_save carries out at the next start. A failure
    before the plan is complete (a full disk) leaves output_dir untouched.
    """
    files = sorted(path.relative_to(staging).as_posix() for path in staging.rglob("*") if path.is_file())
    files = [name for name in files if name != SWAP_PLAN]
    files.sort(key=lambda name: name in FINISHED_MARKERS)  # stable: markers last, the rest in name order
    new = set(files)
    stale = sorted(
        path.name
        for path in output_dir.iterdir()
        if path.is_file() and path.name not in new and any(fnmatch.fnmatch(path.name, p) for p in MODEL_FILE_PATTERNS)
    )
    for name in files:
        with open(staging / name, "rb") as file:
            os.fsync(file.fileno())  # the content is on disk before the name points at it
    plan = staging / SWAP_PLAN
    try:
        with open(plan, "w", encoding="utf-8") as file:
            json.dump({"move": files, "remove": stale, "complete": True}, file)
            file.flush()
            os.fsync(file.fileno())
        _fsync_folder(staging)
    except BaseException:
        plan.unlink(missing_ok=True)  # not decided: the old model stays
        raise
    try:
        _carry_out(staging, output_dir, files, stale)
    except OSError as error:
        raise UserError(
            f"the final save into {output_dir} stopped while putting the new model in place ({error.strerror or error}"
            f"{f': {error.filename}' if error.filename else ''}); the new model is complete in {staging}: the next "
            f"train.py, chat_cli.py or export.py run on {output_dir} finishes putting it in place"
        ) from None


def _carry_out(staging: Path, output_dir: Path, files: list[str], stale: list[str]) -> None:
    """The swap of a plan: remove the old model's files the new one does not have, move the new files in. Each step
    is skipped where it was done already (a second run of a plan, another process carrying out the same one)."""
    for name in stale:
        (output_dir / name).unlink(missing_ok=True)
    for name in files:
        source, target = staging / name, output_dir / name
        if not source.is_file():
            continue  # moved in already
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(source, target)
        except FileNotFoundError:
            if source.exists():
                raise
    _fsync_folder(output_dir)
    (staging / SWAP_PLAN).unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)


def _fsync_folder(folder: Path) -> None:
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


def _read_plan(staging: Path) -> dict | None:
    """The plan in a staging folder, or None when there is none or it was cut off while being written."""
    try:
        plan = json.loads((staging / SWAP_PLAN).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(plan, dict) or plan.get("complete") is not True:
        return None
    move, remove = plan.get("move"), plan.get("remove")
    if not all(isinstance(names, list) and all(isinstance(name, str) for name in names) for names in (move, remove)):
        return None
    return plan


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
    plan = _read_plan(staging)
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
        _carry_out(staging, folder, plan["move"], plan["remove"])
    except OSError as error:
        raise UserError(
            f"{folder}: a final save into it was cut off and cannot be finished ({error.strerror or error}); "
            f"make {folder} writable and run this again, or train again into it"
        ) from None
    print(
        f"note: finished the final save into {folder} that was cut off (the new model is now in place)",
        file=sys.stderr,
    )


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
