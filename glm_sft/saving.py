"""The final save of a run: the model replaces the one in output_dir as a whole, and a save that fails never costs the
run.

The new model is written complete into output_dir/.saving-final-model, then moved in by a decided plan
(glm_sft.staging): a process killed before the plan leaves the old model as it was; one killed after it leaves a plan
that the next train.py, chat_cli, serve or export run in that folder carries out (outputs.finish_cut_off_save).
"""

import shutil
import tempfile
from pathlib import Path

from glm_sft import UserError
from glm_sft.checkpoints import is_complete, list_checkpoints, resume_command
from glm_sft.outputs import FINISHED_MARKERS, STAGING_NAME, finish_cut_off_save
from glm_sft.staging import carry_out, folder_size, follow_umask, free_space_note, human_size, plan_move, storage_error

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


def weights_size(model) -> int:
    """What the saved weights take: the trainable ones for an adapter, all of them for a full model."""
    parameters = list(model.parameters())
    if hasattr(model, "peft_config"):
        parameters = [parameter for parameter in parameters if parameter.requires_grad]
    return sum(getattr(p, "ds_numel", None) or p.numel() for p in parameters) * (
        parameters[0].element_size() if parameters else 0
    )


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
    needed = max(staged, weights_size(trainer.model))
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
    """Put the complete model in staging in place of the model output_dir holds, as a whole: every file of it moved
    in (the files that mark a finished model last), the old model's files the new one does not have removed. A failure
    before the plan is decided (a full disk) leaves output_dir untouched."""
    plan = plan_move(staging, output_dir, replaced=MODEL_FILE_PATTERNS, last=FINISHED_MARKERS)
    try:
        carry_out(staging, output_dir, plan)
    except OSError as error:
        raise UserError(
            f"the final save into {output_dir} stopped while putting the new model in place ({error.strerror or error}"
            f"{f': {error.filename}' if error.filename else ''}); the new model is complete in {staging}: the next "
            f"train.py, chat_cli.py or export.py run on {output_dir} finishes putting it in place"
        ) from None
