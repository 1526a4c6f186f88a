"""Runs that survive interruption: SIGTERM saves a checkpoint and stops, resuming gives the uninterrupted result,
incomplete checkpoints are never resumed from, and the final save never leaves half-written files."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, run_main, run_script

from glm_sft import UserError
from glm_sft import staging as staging_module
from glm_sft.checkpoints import resolve_resume_checkpoint
from glm_sft.outputs import STAGING_NAME
from glm_sft.saving import save_final_model
from glm_sft.stopping import GracefulStop

MAX_STEPS = 30
SHORT_RUN = [
    "--config",
    "recipes/demo.yaml",
    "--max_steps",
    str(MAX_STEPS),
    "--per_device_train_batch_size",
    "4",
    "--save_strategy",
    "steps",
    "--save_steps",
    "10",
    "--logging_steps",
    "1",
]
STOP_AFTER_STEP = 3  # SIGTERM goes out once this many steps are logged; where it lands after that does not matter


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """The training runs here use one CPU thread: the tiny model gains nothing from more, and torch's OpenMP threads
    slow down many times over when other processes share the cores (seconds per step instead of milliseconds)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


def run_and_send_sigterm(output_dir: Path) -> tuple[int, str]:
    """Start training, send SIGTERM once STOP_AFTER_STEP steps are logged; (exit code, all output)."""
    command = [sys.executable, "train.py", *SHORT_RUN, "--output_dir", str(output_dir)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )
    watchdog = threading.Timer(300, process.kill)
    watchdog.start()
    output, steps_seen, sent = [], 0, False
    try:
        for line in process.stdout:
            output.append(line)
            steps_seen += line.count("{'loss'")
            if steps_seen >= STOP_AFTER_STEP and not sent:
                process.send_signal(signal.SIGTERM)
                sent = True
        return process.wait(), "".join(output)
    finally:
        watchdog.cancel()


def log_history(checkpoint: Path) -> list[dict]:
    """Per-step training logs (step, loss, grad_norm, learning_rate) from a checkpoint's trainer_state.json."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    keys = ("step", "loss", "grad_norm", "learning_rate")
    return [{key: entry[key] for key in keys} for entry in state["log_history"] if "loss" in entry]


def adapter_weights(output_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(output_dir / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "out"
    result = run_script("train.py", *SHORT_RUN, "--output_dir", output_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


@pytest.fixture(scope="module")
def interrupted_then_resumed(tmp_path_factory):
    """A run stopped by SIGTERM, what it left behind, then the same run resumed with --resume_from_checkpoint true
    after a fake incomplete checkpoint-99 (no trainer_state.json, as if killed while saving) was added."""
    output_dir = tmp_path_factory.mktemp("interrupted") / "out"
    returncode, output = run_and_send_sigterm(output_dir)
    left_behind = sorted(path.name for path in output_dir.iterdir())
    incomplete = output_dir / "checkpoint-99"
    incomplete.mkdir()
    (incomplete / "adapter_model.safetensors").write_bytes(b"cut off")
    resumed = run_script("train.py", *SHORT_RUN, "--output_dir", output_dir, "--resume_from_checkpoint", "true")
    return dict(
        output_dir=output_dir,
        returncode=returncode,
        output=output,
        left_behind=left_behind,
        resumed=resumed,
    )


def stopped_step(output: str) -> int:
    steps = re.findall(r"stopped at step (\d+) of", output)
    assert len(steps) == 1, output[-3000:]
    return int(steps[0])


def test_sigterm_saves_a_checkpoint_stops_and_tells_how_to_resume(interrupted_then_resumed):
    run = interrupted_then_resumed
    assert run["returncode"] == 143, run["output"][-3000:]
    step = stopped_step(run["output"])
    assert STOP_AFTER_STEP <= step < MAX_STEPS
    assert f"checkpoint-{step}" in run["left_behind"]
    assert (run["output_dir"] / f"checkpoint-{step}" / "trainer_state.json").is_file()  # complete
    # The run is not finished: no model in output_dir itself, only checkpoints.
    assert not {"adapter_config.json", "adapter_model.safetensors", "recipe.yaml"} & set(run["left_behind"])
    output_dir = run["output_dir"]
    expected = f"; checkpoint in {output_dir / f'checkpoint-{step}'}; resume with: python train.py "
    expected += " ".join(SHORT_RUN) + f" --output_dir {output_dir} --resume_from_checkpoint true"
    assert f"stopped at step {step} of {MAX_STEPS}{expected}\n" in run["output"]
    assert "Traceback" not in run["output"]


def test_resumed_run_ends_with_the_uninterrupted_result(interrupted_then_resumed, uninterrupted):
    resumed = interrupted_then_resumed["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output_dir = interrupted_then_resumed["output_dir"]
    step = stopped_step(interrupted_then_resumed["output"])
    assert f"resuming from {output_dir / f'checkpoint-{step}'}" in resumed.stderr
    # It trained only the steps left (a fresh start would reach the same result, running all of them).
    assert (resumed.stdout + resumed.stderr).count("{'loss'") == MAX_STEPS - step

    # Step for step the same losses, gradient norms and learning rates.
    expected = log_history(uninterrupted / f"checkpoint-{MAX_STEPS}")
    got = log_history(output_dir / f"checkpoint-{MAX_STEPS}")
    assert [entry["step"] for entry in expected] == list(range(1, MAX_STEPS + 1))
    assert [entry["step"] for entry in got] == [entry["step"] for entry in expected]
    for mine, theirs in zip(got, expected, strict=True):
        for key in ("loss", "grad_norm", "learning_rate"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-8), (mine, theirs)

    # The same final adapter.
    import torch

    expected_weights, got_weights = adapter_weights(uninterrupted), adapter_weights(output_dir)
    assert expected_weights.keys() == got_weights.keys()
    for name, tensor in expected_weights.items():
        assert torch.allclose(got_weights[name], tensor, rtol=1e-5, atol=1e-7), name
    assert (output_dir / "recipe.yaml").is_file() and (output_dir / "generation_config.json").is_file()
    assert not (output_dir / STAGING_NAME).exists()


def test_resume_true_skips_an_incomplete_checkpoint_and_leaves_it(interrupted_then_resumed):
    resumed = interrupted_then_resumed["resumed"]
    incomplete = interrupted_then_resumed["output_dir"] / "checkpoint-99"
    warnings = [line for line in resumed.stderr.splitlines() if line.startswith("warning: skipping incomplete")]
    assert len(warnings) == 1 and str(incomplete) in warnings[0], resumed.stderr[-3000:]
    assert (incomplete / "adapter_model.safetensors").read_bytes() == b"cut off"
    assert resumed.returncode == 0, resumed.stderr[-3000:]


def test_resume_true_without_checkpoints_starts_fresh_and_a_bad_path_is_refused(tmp_path, capsys):
    assert resolve_resume_checkpoint(True, tmp_path / "empty") is None
    assert "starting from the beginning" in capsys.readouterr().err
    for value in (False, None, "", "false", "False"):
        assert resolve_resume_checkpoint(value, tmp_path) is None
    incomplete = tmp_path / "checkpoint-4"
    incomplete.mkdir()
    with pytest.raises(UserError, match="not a complete checkpoint"):
        resolve_resume_checkpoint(str(incomplete), tmp_path)
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-10").mkdir()  # numeric order, not name order: 10 > 4 > 2, but 10 is incomplete too
    assert resolve_resume_checkpoint("True", tmp_path) == str(tmp_path / "checkpoint-2")
    assert resolve_resume_checkpoint(str(tmp_path / "checkpoint-2"), tmp_path) == str(tmp_path / "checkpoint-2")


def test_a_missing_checkpoint_path_is_one_clear_error(tmp_path, capfd):
    import train

    missing = tmp_path / "out" / "checkpoint-7"
    argv = [*SHORT_RUN, "--output_dir", tmp_path / "out", "--resume_from_checkpoint", missing]
    result = run_main(train.main, *argv, capfd=capfd)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: resume_from_checkpoint: {missing} does not exist (or is not a folder)"]


@pytest.fixture
def python_signal_handlers():
    """SIGINT and SIGTERM as a Python program starts with them (Ctrl-C raises KeyboardInterrupt, SIGTERM kills),
    whatever a test or library before left there, and put back after."""
    before = {number: signal.getsignal(number) for number in GracefulStop.SIGNALS}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for number, handler in before.items():
        signal.signal(number, handler)


def test_first_signal_stops_at_the_step_end_a_second_ctrl_c_aborts_and_handlers_come_back(python_signal_handlers):
    from types import SimpleNamespace

    from transformers import TrainerControl

    args, state = SimpleNamespace(world_size=1), SimpleNamespace(global_step=5, max_steps=30)
    before = {number: signal.getsignal(number) for number in GracefulStop.SIGNALS}
    stop = GracefulStop(announce=False)
    with stop.catching_signals():
        control = TrainerControl()
        stop.on_step_end(args, state, control)
        assert not (control.should_save or control.should_training_stop)  # no signal yet: nothing happens
        signal.raise_signal(signal.SIGINT)  # the first Ctrl-C is only noted
        # What to look at if the handler did not run (it failed so once in the full suite, cause not found).
        seen = f"SIGINT handler {signal.getsignal(signal.SIGINT)}, threads {[t.name for t in threading.enumerate()]}"
        stop.on_step_end(args, state, control)
        assert control.should_save and control.should_training_stop and stop.stopped_at_step == 5, seen
        assert stop.exit_code == 130
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # the second one aborts, as Ctrl-C always does
            time.sleep(1)  # not reached: the handler runs as soon as the signal arrives
    assert {number: signal.getsignal(number) for number in GracefulStop.SIGNALS} == before

    stop = GracefulStop(announce=False)
    with stop.catching_signals():
        signal.raise_signal(signal.SIGTERM)
        state.global_step = state.max_steps  # the signal came during the last step: the run just finishes
        control = TrainerControl()
        stop.on_step_end(args, state, control)
        assert not control.should_training_stop and stop.stopped_at_step is None and stop.exit_code == 143
    assert {number: signal.getsignal(number) for number in GracefulStop.SIGNALS} == before

    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as under nohup: an ignored signal stays ignored
    try:
        with GracefulStop(announce=False).catching_signals():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


class FakeTrainer:
    """Just what save_final_model uses: save_model writes the 'new model' files, one process."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.accelerator = type("Accelerator", (), {"wait_for_everyone": lambda self: None})()

    def is_world_process_zero(self):
        return True

    def save_model(self, folder):
        for name, content in self.files.items():
            path = Path(folder) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)


def test_final_save_cut_off_while_moving_leaves_only_complete_files(tmp_path, monkeypatch):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    names = ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "training_args.bin"]
    old = {name: f"old {name} ".encode() * 1000 for name in names}
    new = {name: f"new {name} ".encode() * 3000 for name in names}
    for name, content in old.items():
        (output_dir / name).write_bytes(content)
    extra_new = {"recipe.yaml": b"new recipe"}

    def write_extra_files(folder):
        (folder / "recipe.yaml").write_bytes(extra_new["recipe.yaml"])

    real_replace, moves = os.replace, []

    def replace_then_die(source, target):  # the process dies after two files were moved
        if len(moves) == 2:
            raise KeyboardInterrupt
        moves.append(Path(target).name)
        real_replace(source, target)

    monkeypatch.setattr(staging_module.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_final_model(FakeTrainer(new), output_dir, write_extra_files)

    everything_new = new | extra_new
    in_place = {path.name: path.read_bytes() for path in output_dir.iterdir() if path.is_file()}
    assert len(moves) == 2
    for name, content in in_place.items():
        assert content == (everything_new[name] if name in moves else old[name]), name
    # The file that marks a finished model is moved last: the folder still holds the old, complete model's marker.
    assert in_place["adapter_config.json"] == old["adapter_config.json"]

    # The next save, not cut off, replaces everything and leaves no staging folder.
    monkeypatch.setattr(staging_module.os, "replace", real_replace)
    save_final_model(FakeTrainer(new), output_dir, write_extra_files)
    assert {path.name: path.read_bytes() for path in output_dir.iterdir()} == everything_new


def test_train_py_writes_the_final_model_aside_before_moving_it(uninterrupted, tmp_path, monkeypatch):
    """train.py's final save goes through the staging folder: killed inside save_model, the finished model that
    was in output_dir is untouched (a direct save_model into output_dir would have overwritten it by then)."""
    from trl import SFTTrainer

    import train

    output_dir = tmp_path / "out"
    shutil.copytree(uninterrupted, output_dir, ignore=shutil.ignore_patterns("checkpoint-*"))
    # samples.jsonl is the new run's log (written during training, like checkpoints), not part of the finished model.
    before = {path.name: path.read_bytes() for path in output_dir.iterdir() if path.name != "samples.jsonl"}
    real_save_model = SFTTrainer.save_model

    def save_model_then_die(self, folder=None, _internal_call=False):
        real_save_model(self, folder, _internal_call)
        raise KeyboardInterrupt  # as if killed right after the weights were written

    monkeypatch.setattr(SFTTrainer, "save_model", save_model_then_die)
    monkeypatch.chdir(REPO)
    argv = ["--config", "recipes/demo.yaml", "--max_steps", "1", "--output_dir", str(output_dir)]
    with pytest.raises(SystemExit) as exit_info:  # the script's wrapper turns KeyboardInterrupt into exit 130
        train.main([*argv, "--overwrite_output_dir", "true"])
    assert exit_info.value.code == 130
    staged = output_dir / STAGING_NAME
    assert (staged / "adapter_model.safetensors").read_bytes() != before["adapter_model.safetensors"]
    after = {path.name: path.read_bytes() for path in output_dir.iterdir() if path.is_file()}
    assert {name: content for name, content in after.items() if name != "samples.jsonl"} == before
