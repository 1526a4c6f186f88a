"""Runs under `accelerate launch`: the launch environment, CPU rehearsals, wrong pairings caught early, one voice.

accelerate launch starts one train.py per device and tells each, through environment variables, its rank, how many
processes run on its machine and in all (WORLD_SIZE, LOCAL_WORLD_SIZE, RANK) and whether DeepSpeed is on
(ACCELERATE_USE_DEEPSPEED and the ACCELERATE_DEEPSPEED_* settings of the config file).
"""

import contextlib
import io
import os
import sys
import time

from glm_sft import UserError

# How long a process other than the main one waits before reporting a UserError: the main process meets the same
# error at about the same point (on a busy machine, many seconds later), reports it and exits, and the launcher then
# ends the others at once, so the user reads it once. Only an error the main process does not meet waits this long.
DEFER_ERROR_SECONDS = 60.0


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def launched_processes() -> tuple[int, int]:
    """(processes on this machine, processes in all) as the launcher set them; (1, 1) for a plain `python train.py`."""
    world = _env_int("WORLD_SIZE", 1)
    return _env_int("LOCAL_WORLD_SIZE", world), world


def uses_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_devices(local_processes: int, cuda_devices: int) -> None:
    """More processes on a machine than its visible GPUs would fail deep in CUDA (invalid device ordinal)."""
    if cuda_devices and local_processes > cuda_devices:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        shown = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        raise UserError(
            f"{local_processes} processes were launched on this machine but it has {cuda_devices} visible GPU(s)"
            f"{shown}; pass --num_processes {cuda_devices} (per machine: --num_processes is the total over all "
            "machines when --num_machines is set)"
        )


def launch_defaults() -> dict:
    """Recipe keys this launch needs unless the recipe sets them (defaults for glm_sft.arguments.parse_recipe);
    checks the devices first.

    On a machine without GPUs, a launch with several processes runs them on the CPU (a rehearsal of a GPU run, as the
    tests do): plain data parallel as accelerate's MULTI_CPU (use_cpu), DeepSpeed over the gloo backend (ddp_backend;
    use_cpu would turn DeepSpeed off). On GPUs nothing is added.
    """
    local_processes, world = launched_processes()
    if world <= 1:
        return {}
    cuda_devices = cuda_device_count()
    check_devices(local_processes, cuda_devices)
    if cuda_devices:
        return {}
    return {"ddp_backend": "gloo"} if uses_deepspeed() else {"use_cpu": True}


def check_launch(model_args, training_args) -> None:
    """Stop before any weights load when the method and the launch config do not go together."""
    plugin = getattr(training_args, "deepspeed_plugin", None)
    if plugin is not None:
        check_deepspeed_pairing(model_args, plugin, weights_dtype=_weights_dtype(model_args, training_args))
    if training_args.world_size > 1 and training_args.process_index == 0:
        local_processes, _ = launched_processes()
        machines = max(1, training_args.world_size // max(1, local_processes))
        where = "CPU processes (no GPU found)" if training_args.device.type == "cpu" else "processes"
        backend = f", {plugin_name(plugin)}" if plugin is not None else ""
        print(f"launch: {training_args.world_size} {where} on {machines} machine(s){backend}", file=sys.stderr)


def plugin_name(plugin) -> str:
    devices = {"optimizer": plugin.offload_optimizer_device, "parameters": plugin.offload_param_device}
    offload = [what for what, device in devices.items() if device not in (None, "none")]
    return f"DeepSpeed ZeRO-{plugin.zero_stage}" + (f", {' and '.join(offload)} offloaded" if offload else "")


def _weights_dtype(model_args, training_args):
    from glm_sft.loading import torch_dtype

    return torch_dtype(model_args.dtype, model_args.finetuning_type, training_args.bf16)


def check_deepspeed_pairing(model_args, plugin, weights_dtype=None) -> None:
    """The pairings of method and DeepSpeed config that cannot work, each with what to use instead.

    `plugin` is accelerate's DeepSpeedPlugin (zero_stage, zero3_save_16bit_model, offload_*_device).
    """
    method = model_args.finetuning_type
    stage = int(plugin.zero_stage)
    if stage == 3 and not plugin.zero3_save_16bit_model:
        raise UserError(
            "DeepSpeed ZeRO-3 without zero3_save_16bit_model: true (stage3_gather_16bit_weights_on_model_save in a "
            "DeepSpeed JSON) saves only sharded DeepSpeed checkpoints, not a model or adapter that loads; set it in "
            "the launch config (configs/zero3.yaml has it)"
        )
    if method == "qlora" and stage == 3:
        if model_args.quantization_bit == 8:
            raise UserError(
                "QLoRA with 8-bit weights cannot be sharded by DeepSpeed ZeRO-3 (only 4-bit NF4 can); use "
                "--quantization_bit 4, or launch with configs/zero2.yaml (the quantized base fits each GPU)"
            )
        from glm_sft.loading import torch_dtype

        compute = torch_dtype(model_args.quantization_compute_dtype, "qlora", True)
        if weights_dtype is not None and weights_dtype != compute:
            raise UserError(
                f"QLoRA under DeepSpeed ZeRO-3 stores the 4-bit weights in quantization_compute_dtype "
                f"({model_args.quantization_compute_dtype}), so the other weights must be in it too, but they load "
                f"in {str(weights_dtype).removeprefix('torch.')}; set --bf16 true (or --dtype "
                f"{model_args.quantization_compute_dtype}), or launch with configs/zero2.yaml"
            )


@contextlib.contextmanager
def main_process_output(training_args):
    """Within it, only the main process prints: the others' stdout and stderr go nowhere (exceptions still rise)."""
    if training_args.process_index == 0:
        yield
        return
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def defer_to_main_process() -> None:
    """Called before reporting a UserError: in a launch, the processes other than the main one wait a moment.

    The main process meets the same error (same recipe, same data) and reports it; the launcher then ends the
    others, so the message is read once. An error only this process meets is still reported after the wait.
    """
    if launched_processes()[1] > 1 and _env_int("RANK", 0) != 0:
        sys.stderr.flush()
        time.sleep(DEFER_ERROR_SECONDS)  # the launcher's SIGTERM ends the sleep, and the process, quietly
