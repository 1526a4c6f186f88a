"""A clean stop while training: Ctrl-C or SIGTERM saves a checkpoint at the end of the step and stops; a checkpoint
that cannot be written (a full disk) ends training in one line that says how to go on."""

import contextlib
import os
import shutil
import signal
import sys
from pathlib import Path

from transformers import TrainerCallback

from glm_sft import UserError
from glm_sft.checkpoints import is_complete, list_checkpoints, resume_command
from glm_sft.saving import true_on_any_process, weights_size
from glm_sft.staging import folder_size, follow_umask, free_space_note, human_size, storage_error


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
        needed = folder_size(complete[-1]) if complete else max(written, checkpoint_size(model))
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


def checkpoint_size(model) -> int:
    """About what a checkpoint of `model` takes: its saved weights and, for each trainable value, Adam's two fp32
    moments."""
    if model is None:
        return 0
    trainable = sum(getattr(p, "ds_numel", None) or p.numel() for p in model.parameters() if p.requires_grad)
    return weights_size(model) + 8 * trainable
