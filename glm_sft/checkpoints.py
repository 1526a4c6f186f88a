"""What a run leaves in output_dir, kept safe: the finished-model check, the checkpoint to resume from, a clean stop
on Ctrl-C / SIGTERM, a final save that never leaves a half-written model.

A checkpoint folder `checkpoint-N` is complete once its trainer_state.json exists: transformers writes that file last,
so a folder without it was cut off while being written and is never resumed from.
"""

import contextlib
import os
import re
import shlex
import shutil
import signal
import sys
from pathlib import Path

from transformers import TrainerCallback

from glm_sft import UserError

# The files that make an output_dir hold a finished model; the final save moves them in last.
FINISHED_MARKERS = ("adapter_config.json", "model.safetensors", "model.safetensors.index.json")

STATE_FILE = "trainer_state.json"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
# Where the final save is written before its files are moved into output_dir (a dot folder: no tool lists it).
STAGING_NAME = ".saving-final-model"


def check_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuse to train over a finished model unless asked to, so a re-run never silently destroys a result."""
    path = Path(output_dir)
    finished = [name for name in FINISHED_MARKERS if (path / name).exists()]
    if finished and not overwrite:
        raise UserError(
            f"{output_dir} already holds a finished model ({finished[0]}); pass --overwrite_output_dir true to "
            "replace it, or choose another --output_dir"
        )


def is_complete(checkpoint) -> bool:
    return (Path(checkpoint) / STATE_FILE).is_file()


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
            names = ", ".join(str(path) for path in incomplete)
            print(
                f"warning: skipping incomplete checkpoint(s) {names} (no {STATE_FILE}: the run was stopped while "
                "saving); they are left in place",
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
        if not is_complete(checkpoint):
            raise UserError(
                f"resume_from_checkpoint: {checkpoint} is not a complete checkpoint (no {STATE_FILE}; it was cut off "
                "while saving); pass an earlier checkpoint, or --resume_from_checkpoint true for the last complete one"
            )
    if announce:
        print(f"resuming from {checkpoint}", file=sys.stderr)
    return checkpoint


class GracefulStop(TrainerCallback):
    """While training, the first SIGINT (Ctrl-C) or SIGTERM asks for a checkpoint and a stop at the end of the step.

    Use `with stop.catching_signals(): trainer.train(...)`. After the first signal the previous handlers are back,
    so a second Ctrl-C raises KeyboardInterrupt as usual. With several processes, a signal seen by any of them
    stops all of them at the same step.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool = True):
        self.announce = announce
        self.signal_number = None  # the signal received, if any
        self.stopped_at_step = None  # the step at which training was stopped and a checkpoint saved, if it was
        self._previous_handlers = {}

    @property
    def exit_code(self) -> int:
        """The shell's code for death by the signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + (self.signal_number or signal.SIGTERM)

    @contextlib.contextmanager
    def catching_signals(self):
        self._install()
        try:
            yield self
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

    def _requested_anywhere(self, args) -> bool:
        requested = self.signal_number is not None
        if args.world_size > 1:
            import torch
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                flag = torch.tensor([1.0 if requested else 0.0], device=args.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                requested = flag.item() > 0
        return requested

    def report(self, output_dir, max_steps: int, argv: list[str], several_processes: bool) -> str:
        """After a stop: the step, where its checkpoint is, and the command that resumes."""
        saved = Path(output_dir) / f"checkpoint-{self.stopped_at_step}"
        where = f"checkpoint in {saved}" if is_complete(saved) else "no checkpoint could be saved at this step"
        command = resume_command(argv, several_processes=several_processes)
        return f"stopped at step {self.stopped_at_step} of {max_steps}; {where}; resume with: {command}"

    def on_step_end(self, args, state, control, **kwargs):
        # Every process takes part in the check at every step, so that all of them stop at the same one.
        if not self._requested_anywhere(args) or self.stopped_at_step is not None:
            return
        if state.global_step >= state.max_steps:
            return  # that was the last step: the run finishes normally
        self.stopped_at_step = state.global_step
        control.should_save = True
        control.should_training_stop = True


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


def save_final_model(trainer, output_dir, write_extra_files) -> None:
    """trainer.save_model plus write_extra_files(folder), written into a staging folder inside output_dir and then
    moved into place file by file with os.replace: each file of the result appears complete or not at all, so a
    finished model is never overwritten by a half-written one.

    Call it on every process (trainer.save_model must run everywhere); only the main process writes and moves.
    """
    output_dir = Path(output_dir)
    staging = output_dir / STAGING_NAME
    is_main = trainer.is_world_process_zero()
    if is_main and staging.exists():
        shutil.rmtree(staging)  # left over from a save that was cut off
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    if is_main:
        write_extra_files(staging)
        move_into_place(staging, output_dir)
    trainer.accelerator.wait_for_everyone()


def move_into_place(staging: Path, output_dir: Path) -> None:
    """Move every file under staging to the same place under output_dir, each with one atomic os.replace."""
    files = sorted(path for path in staging.rglob("*") if path.is_file())
    files.sort(key=lambda path: path.name in FINISHED_MARKERS)  # stable: markers last, the rest in name order
    for source in files:
        target = output_dir / source.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(source, "rb") as file:
            os.fsync(file.fileno())  # the content is on disk before the name points at it
        os.replace(source, target)
    shutil.rmtree(staging)
