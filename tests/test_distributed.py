"""Several processes: the shipped launch configs, unchanged, run train.py as 2 CPU processes on the tiny model.

Each launch adds only --num_processes 2 (and, for the multi-node rehearsal, the machine options). On a machine
without GPUs train.py runs the processes on the CPU (gloo), which is what these tests rely on.

Loss match: the per-step training loss of a 2-process run (2 rows per process) is compared with a single-process run
of 4 rows per step, same data order and seed; LOSS_TOLERANCE is the largest difference allowed at any logged step.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, assert_serves_the_trained_weights, run_script, train_in_process

from glm_sft import UserError

STEPS = 8
LOSS_TOLERANCE = 1e-3  # absolute, per logged step; measured: about 1e-5 (floating-point sums taken in another order)
COMMON = [
    "--config", "recipes/demo.yaml", "--max_steps", STEPS, "--logging_steps", 1, "--learning_rate", "5e-3",
    "--warmup_steps", 0, "--report_to", "none",
]  # fmt: skip
FULL = ("--finetuning_type", "full", "--learning_rate", "1e-3")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("deepspeed") is None, reason="deepspeed is not installed"
)


def free_port() -> int:
    """A loopback port nothing listens on now, so that launches never meet another run's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(config, output_dir, *extra, launch_options=(), wait=True):
    """accelerate launch --config_file configs/CONFIG --num_processes 2 train.py ..., as a user types it."""
    if "--main_process_port" not in launch_options:
        launch_options = [*launch_options, "--main_process_port", free_port()]
    arguments = [
        "-m", "accelerate.commands.launch", "--config_file", f"configs/{config}",
        "--num_processes", "2", *launch_options, "train.py", *COMMON, "--output_dir", output_dir, *extra,
    ]  # fmt: skip
    if not wait:
        return subprocess.Popen(
            [sys.executable, *map(str, arguments)],
            cwd=REPO,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    return run_script(*arguments, env=ENV)


def losses(output_dir) -> dict[int, float]:
    history = json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def assert_losses_match(run, reference):
    assert sorted(run) == sorted(reference) == list(range(1, STEPS + 1))
    worst = max(abs(run[step] - reference[step]) for step in run)
    assert worst <= LOSS_TOLERANCE, f"losses differ by {worst:.4g}: {run} vs {reference}"
    assert reference[STEPS] < reference[1]  # it trained: a run that did nothing would not match a trained one


def assert_finished_once(result, output_dir, marker):
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert output.count("saved to ") == 1, output[-3000:]  # the main process alone reports (and writes) the result
    assert "effective batch size: 4 = 2 per device x 1 accumulation x 2 processes" in output, output[-3000:]
    assert output.count("effective batch size") == 1, output[-3000:]
    # Data read and reported by the main process only; tokenized once, the other process loaded the result.
    assert output.count("data: 85 rows read") == 1, output[-3000:]
    assert output.count("train: 85 rows used") == 1, output[-3000:]
    assert (Path(output_dir) / marker).is_file()
    assert not (Path(output_dir) / ".saving-final-model").exists()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One run of each kind, shared by the tests below: single-process references, then the launches."""
    root = tmp_path_factory.mktemp("distributed")
    done = {}
    for name, extra in (("single_lora", ()), ("single_full", FULL)):  # in this process: no launch to test here
        train_in_process(*COMMON, "--per_device_train_batch_size", 4, "--output_dir", root / name, *extra)
        done[name] = root / name
    for name, config, extra in (
        ("ddp", "ddp.yaml", ()),
        ("zero2", "zero2.yaml", ()),
        ("zero3", "zero3.yaml", FULL),
    ):
        output_dir = root / name
        done[name] = (launch(config, output_dir, "--per_device_train_batch_size", 2, *extra), output_dir)
    return done


@pytest.mark.parametrize("name", ["ddp", "zero2"])
def test_adapter_runs_match_one_process_and_answer(runs, name):
    result, output_dir = runs[name]
    assert_finished_once(result, output_dir, "adapter_config.json")
    assert_losses_match(losses(output_dir), losses(runs["single_lora"]))
    assert_serves_the_trained_weights("--adapter", output_dir, "builtin:tiny-glm4")


def test_zero3_full_run_saves_a_normal_model(runs):
    from safetensors.torch import load_file

    from glm_sft.builtin import builtin_path

    result, output_dir = runs["zero3"]
    assert_finished_once(result, output_dir, "model.safetensors")
    output = result.stdout + result.stderr
    assert "launch: 2 CPU processes (no GPU found) on 1 machine(s), DeepSpeed ZeRO-3" in output
    assert_losses_match(losses(output_dir), losses(runs["single_full"]))
    # The weights were gathered from both shards: whole tensors, which moved from the base as the one-process run's
    # did (measured: the runs differ by about 3e-6 of what training changed).
    weights = load_file(output_dir / "model.safetensors")
    reference = load_file(runs["single_full"] / "model.safetensors")
    base = load_file(builtin_path("builtin:tiny-glm4") / "model.safetensors")
    assert weights.keys() == reference.keys() == base.keys()
    assert all(weights[key].shape == tensor.shape for key, tensor in reference.items())
    difference = sum((weights[key].float() - tensor.float()).abs().sum() for key, tensor in reference.items())
    update = sum((tensor.float() - base[key].float()).abs().sum() for key, tensor in reference.items())
    assert difference < 1e-3 * update, (difference, update)
    assert_serves_the_trained_weights("--model", output_dir, "builtin:tiny-glm4")


@pytest.mark.slow
def test_zero3_trains_moe_expert_lora_saves_an_adapter_that_loads_and_resumes(tmp_path):
    """accelerate launch --config_file configs/zero3.yaml --num_processes 2 train.py ... on the tiny GLM-4.5 (MoE):
    the MoE blocks are ZeRO-3 leaf modules, the per-expert LoRA trains, the adapter loads, and a second launch resumes
    from the first one's checkpoint."""
    output_dir = tmp_path / "out"
    moe = ["--model_name_or_path", "builtin:tiny-glm45", "--per_device_train_batch_size", 2]
    moe += ["--save_strategy", "steps", "--save_steps", 2]
    first = launch("zero3.yaml", output_dir, *moe, "--max_steps", 2)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    assert "ZeRO-3: 1 MoE blocks are leaf modules" in first.stdout + first.stderr
    assert "mlp.experts.gate_up_proj" in first.stdout + first.stderr  # the routed experts' LoRA is trained
    assert_serves_the_trained_weights("--adapter", output_dir, "builtin:tiny-glm45")
    resume = ["--resume_from_checkpoint", output_dir / "checkpoint-2", "--overwrite_output_dir", "true"]
    second = launch("zero3.yaml", output_dir, *moe, "--max_steps", 4, *resume)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert sorted(losses(output_dir)) == [1, 2, 3, 4]  # steps 1-2 from the checkpoint's history, 3-4 trained now
    assert_serves_the_trained_weights("--adapter", output_dir, "builtin:tiny-glm45")


def test_two_machines_on_loopback_train_together(runs, tmp_path):
    """A multi-node rehearsal: two launches on this machine, machine ranks 0 and 1, meeting at 127.0.0.1."""
    options = ["--num_machines", 2, "--main_process_ip", "127.0.0.1", "--main_process_port", free_port()]
    batch = ["--per_device_train_batch_size", 2]
    machines = [
        launch("zero2.yaml", tmp_path / "out", *batch, launch_options=[*options, "--machine_rank", rank], wait=False)
        for rank in (0, 1)
    ]
    outputs = []
    for machine in machines:
        try:
            outputs.append(machine.communicate(timeout=600)[0])
        finally:
            machine.kill()
    assert [machine.returncode for machine in machines] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    first, second = outputs
    assert "launch: 2 CPU processes (no GPU found) on 2 machine(s), DeepSpeed ZeRO-2" in first
    assert "x 2 processes" in first
    assert (first + second).count("saved to ") == 1 and "saved to " in first
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    assert_losses_match(losses(tmp_path / "out"), losses(runs["single_lora"]))


@pytest.mark.slow
def test_a_data_error_under_launch_is_reported_once(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "bot", "content": "hi"}]}\n', encoding="utf-8")
    result = launch("zero2.yaml", tmp_path / "out", "--dataset_name", bad)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert output.count('has role "bot"') == 1, output[-3000:]
    assert "[rank0]: Traceback" not in output and "[rank1]: Traceback" not in output


# ---- wrong pairings, checked before any weights load (fast: no launch) ----


def deepspeed_plugin(monkeypatch, **settings):
    """accelerate's DeepSpeedPlugin as a launched process builds it from the environment accelerate launch sets."""
    from accelerate.utils import DeepSpeedPlugin

    names = {
        "zero_stage": "ACCELERATE_DEEPSPEED_ZERO_STAGE",
        "zero3_save_16bit_model": "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL",
        "offload_param_device": "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
    }
    for key, value in settings.items():
        monkeypatch.setenv(names[key], str(value).lower())
    return DeepSpeedPlugin()


def model_args(**values):
    from glm_sft.arguments import ModelArguments

    return ModelArguments(**values)


def test_zero3_without_16bit_save_is_refused(monkeypatch):
    from glm_sft.distributed import check_deepspeed_pairing

    plugin = deepspeed_plugin(monkeypatch, zero_stage=3, zero3_save_16bit_model=False)
    with pytest.raises(UserError, match="zero3_save_16bit_model: true"):
        check_deepspeed_pairing(model_args(finetuning_type="full"), plugin)
    plugin = deepspeed_plugin(monkeypatch, zero3_save_16bit_model=True)
    check_deepspeed_pairing(model_args(finetuning_type="full"), plugin)


def test_qlora_with_zero3_only_in_4_bit_with_matching_dtypes(monkeypatch):
    import torch

    from glm_sft.distributed import check_deepspeed_pairing

    zero3 = deepspeed_plugin(monkeypatch, zero_stage=3, zero3_save_16bit_model=True)
    with pytest.raises(UserError, match="8-bit weights cannot be sharded"):
        check_deepspeed_pairing(model_args(finetuning_type="qlora", quantization_bit=8), zero3, torch.bfloat16)
    with pytest.raises(UserError, match="--bf16 true"):
        check_deepspeed_pairing(model_args(finetuning_type="qlora"), zero3, torch.float32)
    check_deepspeed_pairing(model_args(finetuning_type="qlora"), zero3, torch.bfloat16)
    zero2 = deepspeed_plugin(monkeypatch, zero_stage=2)
    check_deepspeed_pairing(model_args(finetuning_type="qlora", quantization_bit=8), zero2, torch.float32)


def test_more_processes_than_gpus_is_refused():
    from glm_sft.distributed import check_devices

    with pytest.raises(UserError, match="4 processes were launched on this machine but it has 2 visible GPU"):
        check_devices(local_processes=4, cuda_devices=2)
    check_devices(local_processes=2, cuda_devices=2)
    check_devices(local_processes=4, cuda_devices=0)  # no GPU: a CPU rehearsal


def test_cpu_launches_get_a_cpu_backend_unless_the_recipe_sets_one(monkeypatch):
    import torch

    from glm_sft.arguments import parse_recipe
    from glm_sft.distributed import launch_defaults

    if torch.cuda.is_available():
        pytest.skip("a GPU machine: nothing is added")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launch_defaults() == {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert launch_defaults() == {"ddp_backend": "gloo"}
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    assert launch_defaults() == {"use_cpu": True}
    # They are defaults: what the recipe or the command line says wins, and they are not saved as the user's keys.
    monkeypatch.delenv("WORLD_SIZE")
    argv = ["--config", "recipes/demo.yaml", "--seed", "3"]
    recipe = parse_recipe(argv, launch_defaults={"seed": 7, "data_seed": 5})
    assert recipe.training.seed == 3 and recipe.training.data_seed == 5 and "data_seed" not in recipe.given


@pytest.mark.slow
def test_train_stops_before_loading_weights_on_a_wrong_pairing(tmp_path):
    """As accelerate launch would set it up for a ZeRO-3 config without zero3_save_16bit_model."""
    env = {
        **ENV,
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
        "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "false",
    }
    result = run_script("train.py", *COMMON, "--output_dir", tmp_path / "out", env=env)
    assert result.returncode == 1
    assert "error: DeepSpeed ZeRO-3 without zero3_save_16bit_model: true" in result.stderr
    assert "Traceback" not in result.stderr and "Loading weights" not in result.stderr
