"""Nothing lost, nothing mis-trained: output_dir checked before the model loads, a failed final save that keeps the
trained model, one run per output_dir, resume after a cut-off final save, settings that train nothing refused, one
error message under a launch.

Faults are real where the machine allows: a read-only or a tiny tmpfs mount (root in the test sandbox), a second
process holding output_dir; else the test is skipped with the reason.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, mount_tmpfs, run_main, train_in_process

from glm_sft import UserError
from glm_sft import saving as saving_module
from glm_sft.arguments import parse_recipe
from glm_sft.checkpoints import resolve_resume_checkpoint
from glm_sft.outputs import LOCK_NAME, STAGING_NAME

TINY = ["--config", "recipes/demo.yaml", "--report_to", "none", "--sample_count", "0", "--logging_steps", "1"]
SHORT = [*TINY, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"]


@pytest.fixture(autouse=True)
def one_cpu_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(REPO)


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only file system (root can write into a chmod'ed folder, not into this)."""
    yield mount_tmpfs(tmp_path / "read-only", "ro,size=64k")
    subprocess.run(["umount", "-l", str(tmp_path / "read-only")], check=False)


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KB file system: room for a lock file, not for the final save (about 800 KB)."""
    yield mount_tmpfs(tmp_path / "small", "size=256k")
    subprocess.run(["umount", "-l", str(tmp_path / "small")], check=False)


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fails the test if the run gets as far as loading the tokenizer (the first thing after the checks)."""
    import glm_sft.run

    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer was loaded before the problem was reported")

    monkeypatch.setattr(glm_sft.run, "load_tokenizer", refuse)


def one_error(result) -> str:
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


# ---- 1. output_dir checked before the model loads ----


def test_a_read_only_output_dir_is_refused_before_the_model_loads(read_only_dir, no_model_loads, capfd):
    import train

    output_dir = read_only_dir / "out"
    error = one_error(run_main(train.main, *TINY, "--max_steps", "1", "--output_dir", output_dir, capfd=capfd))
    assert f"output_dir {output_dir} cannot be written (Read-only file system: {read_only_dir})" in error


def test_an_output_dir_that_is_or_is_under_a_file_is_refused_before_the_model_loads(tmp_path, no_model_loads, capfd):
    import train

    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    for output_dir, where in ((a_file, "is a file"), (a_file / "out", f"is under {a_file}, which is a file")):
        error = one_error(run_main(train.main, *TINY, "--max_steps", "1", "--output_dir", output_dir, capfd=capfd))
        assert f"output_dir {output_dir} {where}, not a directory" in error
    assert a_file.read_text() == "mine"


# ---- 2. a final save that fails keeps the trained model ----


@pytest.mark.slow
def test_a_full_disk_at_the_final_save_keeps_the_trained_model_elsewhere(small_disk, tmp_path, monkeypatch, capfd):
    from safetensors.torch import load_file

    import train

    spare = tmp_path / "spare"  # the system's temporary directory, on another file system
    spare.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spare))
    output_dir = small_disk / "out"
    error = one_error(run_main(train.main, *TINY, "--max_steps", "2", "--output_dir", output_dir, capfd=capfd))
    rescued = spare / "glm-sft-out-final-step-2"
    assert f"error: the final save into {output_dir} failed: No space left on device" in error
    assert f"the trained model was written to {rescued} instead" in error
    needed = error.split("it needs about ")[1].split(",")[0]
    assert needed.endswith(" KB") and 600 < float(needed.split()[0]) < 2000, error  # adapter + tokenizer: ~800 KB
    assert "free there" in error
    weights = load_file(rescued / "adapter_model.safetensors")
    assert weights and (rescued / "adapter_config.json").is_file() and (rescued / "recipe.yaml").is_file()
    assert json.loads((rescued / "trainer_state.json").read_text())["global_step"] == 2
    # Nothing half-written stays in output_dir: no staging folder, no lock.
    assert not (output_dir / STAGING_NAME).exists() and not (output_dir / LOCK_NAME).exists()
    assert not (output_dir / "adapter_config.json").exists()


@pytest.mark.slow
def test_a_failed_final_save_names_the_last_checkpoint_and_the_resume_finishes_it(tmp_path, monkeypatch, capfd):
    """The disk fills while moving the final model into place, with the checkpoint of the last step saved: that
    checkpoint is named, and the resume it suggests saves the final model without training."""
    import train

    output_dir = tmp_path / "out"
    real_move = saving_module.move_into_place

    def disk_full(staging, target):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target / "adapter_model.safetensors"))

    monkeypatch.setattr(saving_module, "move_into_place", disk_full)
    error = one_error(run_main(train.main, *SHORT, "--output_dir", output_dir, capfd=capfd))
    assert f"the trained weights are safe in {output_dir / 'checkpoint-4'}" in error
    assert "--resume_from_checkpoint true" in error and "No space left on device" in error
    assert not (output_dir / STAGING_NAME).exists() and not (output_dir / "adapter_config.json").exists()

    monkeypatch.setattr(saving_module, "move_into_place", real_move)
    result = run_main(train.main, *SHORT, "--output_dir", output_dir, "--resume_from_checkpoint", "true", capfd=capfd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "{'loss'" not in result.stdout + result.stderr  # no step trained
    assert (output_dir / "adapter_config.json").is_file()


# ---- 3. one run per output_dir ----


def hold_lock(output_dir: Path) -> subprocess.Popen:
    """A second process that takes output_dir's lock as train.py does, then waits to be killed."""
    code = (
        "import sys, time\n"
        "from glm_sft.outputs import acquire_output_lock\n"
        "acquire_output_lock(sys.argv[1])\n"
        "print('locked', flush=True)\n"
        "time.sleep(300)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(output_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    line = holder.stdout.readline()  # blocks until locked, or until the process ends
    assert line.strip() == "locked", "the holder could not take the lock"
    return holder


def test_a_second_run_into_the_same_output_dir_is_refused(tmp_path, no_model_loads, capfd):
    import train

    output_dir = tmp_path / "out"
    holder = hold_lock(output_dir)
    try:
        error = one_error(run_main(train.main, *TINY, "--max_steps", "1", "--output_dir", output_dir, capfd=capfd))
        assert f"{output_dir} is in use by another training run (pid {holder.pid} on " in error
        assert json.loads((output_dir / LOCK_NAME).read_text())["pid"] == holder.pid  # not taken from its owner
    finally:
        holder.kill()
        holder.wait(timeout=60)


@pytest.mark.slow
def test_a_stale_lock_is_replaced_with_a_warning_and_removed_at_the_end(tmp_path, capfd):
    import train

    output_dir = tmp_path / "out"
    holder = hold_lock(output_dir)
    holder.kill()  # killed without cleaning up: its lock stays
    holder.wait(timeout=60)
    assert (output_dir / LOCK_NAME).is_file()
    result = run_main(train.main, *TINY, "--max_steps", "1", "--output_dir", output_dir, capfd=capfd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"locked by process {holder.pid}, which is no longer running" in result.stderr
    assert not (output_dir / LOCK_NAME).exists() and (output_dir / "adapter_config.json").is_file()


# ---- 4. resume after a cut-off final save; corrupt last checkpoints skipped ----


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """An uninterrupted 4-step run with checkpoints at steps 2 and 4."""
    output_dir = tmp_path_factory.mktemp("finished") / "out"
    train_in_process(*SHORT, "--output_dir", output_dir)
    return output_dir


def checkpoints_only(finished_run: Path, target: Path) -> Path:
    """What a run cut off during (or just before) its final save leaves: its checkpoints, no final model."""
    target.mkdir()
    for checkpoint in finished_run.glob("checkpoint-*"):
        shutil.copytree(checkpoint, target / checkpoint.name)
    return target


def logged_steps(output_dir: Path) -> list[int]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry["step"] for entry in history if "loss" in entry]


@pytest.mark.slow
def test_resume_after_a_cut_off_final_save_gives_the_uninterrupted_weights(finished_run, tmp_path, capfd):
    from safetensors.torch import load_file

    import train

    output_dir = checkpoints_only(finished_run, tmp_path / "out")
    result = run_main(train.main, *SHORT, "--output_dir", output_dir, "--resume_from_checkpoint", "true", capfd=capfd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "is at step 4, the last of this run (4): training was done" in result.stderr
    assert "{'loss'" not in result.stdout + result.stderr  # no step trained, in particular none past max_steps
    assert logged_steps(output_dir) == [1, 2, 3, 4] == logged_steps(finished_run)
    expected = load_file(finished_run / "adapter_model.safetensors")
    got = load_file(output_dir / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    assert max((got[name] - tensor).abs().max().item() for name, tensor in expected.items()) == 0


@pytest.mark.slow
def test_a_corrupt_last_checkpoint_is_skipped_for_the_previous_one(finished_run, tmp_path, capfd):
    import torch
    from safetensors.torch import load_file

    import train

    output_dir = checkpoints_only(finished_run, tmp_path / "out")
    state = output_dir / "checkpoint-4" / "trainer_state.json"
    state.write_text(state.read_text()[:100])  # truncated: the disk filled while it was written
    result = run_main(train.main, *SHORT, "--output_dir", output_dir, "--resume_from_checkpoint", "true", capfd=capfd)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: skipping incomplete")]
    assert warnings == [
        f"warning: skipping incomplete checkpoint {output_dir / 'checkpoint-4'} (trainer_state.json is cut off or "
        "unreadable); left in place"
    ]
    assert f"resuming from {output_dir / 'checkpoint-2'}" in result.stderr
    expected = load_file(finished_run / "adapter_model.safetensors")
    got = load_file(output_dir / "adapter_model.safetensors")
    for name, tensor in expected.items():
        assert torch.allclose(got[name], tensor, rtol=1e-5, atol=1e-7), name


def test_an_empty_or_cut_off_weights_file_makes_a_checkpoint_incomplete(tmp_path, capsys):
    for step in (2, 4, 6):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    whole = len(header).to_bytes(8, "little") + header + bytes(16)
    (tmp_path / "checkpoint-2" / "adapter_model.safetensors").write_bytes(whole)
    (tmp_path / "checkpoint-4" / "adapter_model.safetensors").write_bytes(whole[:-4])  # data cut off
    (tmp_path / "checkpoint-6" / "adapter_model.safetensors").write_bytes(b"")  # 0 bytes
    assert resolve_resume_checkpoint(True, tmp_path) == str(tmp_path / "checkpoint-2")
    err = capsys.readouterr().err
    assert (
        f"checkpoint {tmp_path / 'checkpoint-4'} (adapter_model.safetensors is cut off ({len(whole) - 4} bytes))"
        in err
    )
    assert f"checkpoint {tmp_path / 'checkpoint-6'} (adapter_model.safetensors is cut off (0 bytes))" in err
    with pytest.raises(UserError, match="not a complete checkpoint .adapter_model.safetensors is cut off"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-6"), tmp_path)


# ---- settings that train nothing, refused before any model loads ----


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"max_steps": "0"}, "max_steps 0 trains nothing"),
        ({"num_train_epochs": "0"}, "num_train_epochs 0 trains nothing"),
        ({"learning_rate": "-1.0e-4"}, "learning_rate -0.0001 must be a positive number"),
        ({"learning_rate": "fast"}, "argument --learning_rate/--learning-rate: invalid float value: 'fast'"),
        ({"learning_rate": "[0.001]"}, "learning_rate [0.001] must be a positive number"),
    ],
)
def test_settings_that_train_nothing_are_refused_from_the_recipe_file(setting, message, tmp_path, capfd):
    import train

    recipe = tmp_path / "recipe.yaml"
    text = (REPO / "recipes" / "demo.yaml").read_text(encoding="utf-8")
    for key, value in setting.items():
        text = "\n".join(line for line in text.splitlines() if not line.startswith(f"{key}:"))
        text += f"\n{key}: {value}\n"
    recipe.write_text(text, encoding="utf-8")
    output_dir = tmp_path / "out"
    result = run_main(train.main, "--config", recipe, "--output_dir", output_dir, capfd=capfd)
    assert message in one_error(result)
    assert not output_dir.exists()


def test_max_steps_0_on_the_command_line_is_refused():
    with pytest.raises(UserError, match="max_steps 0 trains nothing"):
        parse_recipe(["--config", "recipes/demo.yaml", "--max_steps", "0"])
    with pytest.raises(UserError, match="max_steps -3 trains nothing"):
        parse_recipe(["--config", "recipes/demo.yaml", "--max_steps", "-3"])
    assert parse_recipe(["--config", "recipes/demo.yaml", "--num_train_epochs", "0", "--max_steps", "5"])


# ---- the model card in output_dir ----


@pytest.mark.slow
def test_output_dir_has_our_model_card_and_the_row_counts(finished_run):
    card = (finished_run / "README.md").read_text(encoding="utf-8")
    facts = json.loads((finished_run / "run.json").read_text())
    assert facts["train_rows"] == 85 and facts["eval_rows"] == 0 and facts["global_step"] == 4
    assert "- base model: builtin:tiny-glm4" in card and "- method: lora" in card and "- chat format: glm4" in card
    assert "- training data: data/self_cognition.jsonl (85 rows, 85 training sequences)" in card
    assert f"- final train loss: {facts['final_train_loss']:.4f} (step 4)" in card
    assert "python chat_cli.py --adapter" in card and "python export.py" in card
    assert "More Information Needed" not in card  # PEFT's template is replaced


# ---- 6. under a launch, the main process reports an error all processes meet ----


@pytest.mark.slow
def test_a_non_main_process_stays_quiet_while_a_busy_main_process_reports():
    """Rank 1 meets a data error first; the main process, on a loaded machine, reports it seconds later and the
    launcher then ends rank 1 (SIGTERM). Rank 1 must not have printed the error in between (it waits
    DEFER_ERROR_SECONDS, 60 s, for that SIGTERM)."""
    code = (
        "from glm_sft import UserError, exit_on_user_error\n"
        "@exit_on_user_error\n"
        "def main():\n"
        "    print('failing', flush=True)\n"
        "    raise UserError('data/bad.jsonl:1: message 1 has role \"bot\"')\n"
        "main()\n"
    )
    env = {**os.environ, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": "1", "PYTHONUNBUFFERED": "1"}
    rank1 = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert rank1.stdout.readline().strip() == "failing"
        time.sleep(5)  # the main process is still reading the data
        rank1.send_signal(signal.SIGTERM)  # what torch elastic does once the main process has exited
        output = rank1.communicate(timeout=120)[0]
    finally:
        rank1.kill()
    assert "has role" not in output, output
    assert rank1.returncode == -signal.SIGTERM
