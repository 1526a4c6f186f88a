"""Saves that survive what happens to real runs: a full disk while a checkpoint is written mid-training, a process
killed while the final save replaces a finished model, an adapter folder holding a pickle or a YAML tag that would
run code, weights readable by others as the umask says.

Faults are real where the machine allows (a small tmpfs; a forked process that dies with os._exit at a chosen point,
no clean-up running, as under SIGKILL); else the test is skipped with the reason.
"""

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, mount_tmpfs, run_main
from test_safety import TINY, one_cpu_thread, one_error  # noqa: F401 (one_cpu_thread: an autouse fixture)

from glm_sft import UserError
from glm_sft import staging as staging_module
from glm_sft.checkpoints import is_complete
from glm_sft.outputs import LOCK_NAME, STAGING_NAME, check_output_dir, finish_cut_off_save
from glm_sft.saving import save_final_model
from glm_sft.staging import SWAP_PLAN, storage_error
from glm_sft.stopping import GracefulStop


@pytest.fixture
def disk(tmp_path):
    """A 16 MB tmpfs: room for a run and its first checkpoint, then filled by the test."""
    yield mount_tmpfs(tmp_path / "disk", "size=16m")
    subprocess.run(["umount", "-l", str(tmp_path / "disk")], check=False)


def train(*argv) -> None:
    import train as train_script

    try:
        train_script.main([*TINY, *map(str, argv)])
    except SystemExit as stop:
        assert stop.code in (0, None), f"train.py exited with {stop.code}"


# ---- 5. a full disk while a checkpoint is saved mid-training ----


def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_run_resumes_from_the_last_complete_one(
    disk, monkeypatch, capfd
):
    """checkpoint-2 is saved, then the disk is filled so that checkpoint-4 runs out of room inside optimizer.pt
    (torch's zip writer, whose error carries no errno): one line, the partial checkpoint-4 removed, checkpoint-2
    named, exit 1; once there is room the resume command finishes the run from checkpoint-2."""
    import train as train_script

    output_dir = disk / "out"
    filler = disk / "filler"
    real_on_save = GracefulStop.on_save

    def on_save_then_fill_the_disk(self, args, state, control, **kwargs):
        real_on_save(self, args, state, control, **kwargs)
        if state.global_step == 2:
            saved = output_dir / "checkpoint-2"
            optimizer = (saved / "optimizer.pt").stat().st_size
            room = sum(path.stat().st_size for path in saved.iterdir()) - optimizer // 2  # all but half of it
            filler.write_bytes(b"\0" * max(shutil.disk_usage(disk).free - room, 0))

    monkeypatch.setattr(GracefulStop, "on_save", on_save_then_fill_the_disk)
    argv = [*TINY, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--output_dir", output_dir]
    error = one_error(run_main(train_script.main, *argv, capfd=capfd))

    checkpoint_2, checkpoint_4 = output_dir / "checkpoint-2", output_dir / "checkpoint-4"
    assert f"error: training stopped at step 4: saving {checkpoint_4} failed: No space left on device" in error
    size = staging_module.human_size(staging_module.folder_size(checkpoint_2))
    assert f"a checkpoint needs about {size}" in error
    assert "free there" in error and "the partial checkpoint-4 was removed" in error
    assert f"the last complete checkpoint is {checkpoint_2}" in error
    assert "--resume_from_checkpoint true" in error
    assert not checkpoint_4.exists() and is_complete(checkpoint_2)
    assert not (output_dir / LOCK_NAME).exists() and not (output_dir / "adapter_config.json").exists()

    filler.unlink()  # room again: the resume the message gives finishes the run
    monkeypatch.setattr(GracefulStop, "on_save", real_on_save)
    resumed = run_main(train_script.main, *argv, "--resume_from_checkpoint", "true", capfd=capfd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {checkpoint_2}" in resumed.stderr
    assert is_complete(checkpoint_4) and (output_dir / "adapter_config.json").is_file()
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "loss" in entry] == [1, 2, 3, 4]


def test_torch_s_write_error_is_a_full_disk_where_there_is_no_room_left(tmp_path):
    writer_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    small = mount_tmpfs(tmp_path / "small", "size=64k")
    try:
        (small / "filler").write_bytes(b"\0" * 64 * 1024)
    except OSError:
        pass  # full now
    try:
        assert storage_error(writer_error, small).strerror == os.strerror(28)  # ENOSPC
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
    elsewhere = storage_error(writer_error, tmp_path)  # room left: a write that failed, not a full disk
    assert elsewhere is not None and "could not be written completely" in elsewhere.strerror
    assert storage_error(RuntimeError("something else"), tmp_path) is None


# ---- 7. the final save replaces a finished model as a whole ----


MODEL_NAMES_LEFT_ALONE = {"loss.png", "samples.jsonl"}  # the run's logs, not the model


@pytest.fixture(scope="module")
def rank_16_and_8(tmp_path_factory):
    """Two finished runs of the demo: LoRA rank 16 and rank 8 (different weight shapes)."""
    root = tmp_path_factory.mktemp("ranks")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.chdir(REPO)
        for rank in (16, 8):
            train("--max_steps", "1", "--lora_rank", rank, "--output_dir", root / f"rank{rank}")
    return root / "rank16", root / "rank8"


def model_files(folder: Path) -> dict[str, bytes]:
    return {
        path.name: path.read_bytes()
        for path in folder.iterdir()
        if path.is_file() and path.name not in MODEL_NAMES_LEFT_ALONE and not path.name.startswith(".")
    }


class CopyingTrainer:
    """What save_final_model uses of a trainer: save_model writes the files of a finished run (the new model)."""

    def __init__(self, source: Path):
        self.source = source
        self.accelerator = type("Accelerator", (), {"wait_for_everyone": lambda self: None})()

    def is_world_process_zero(self):
        return True

    def save_model(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        for name, content in model_files(self.source).items():
            (Path(folder) / name).write_bytes(content)


# What the save does to the file system, each a point where the process can die.
FILE_OPERATIONS = ("replace", "rename", "unlink", "rmdir", "fsync")


def save_and_die(old: Path, new: Path, output_dir: Path, die_at: int | None) -> int:
    """Copy the finished run `old` to output_dir, then in a forked process save `new` over it with
    save_final_model, the process dying (os._exit: no clean-up runs, as under SIGKILL) just before file operation
    number `die_at`. Returns the number of file operations the save made (die_at None: a whole save)."""
    shutil.copytree(old, output_dir)
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(reader)
            count = [0]

            def counted(real):
                def operation(*args, **kwargs):
                    if count[0] == die_at:
                        os._exit(137)
                    count[0] += 1
                    return real(*args, **kwargs)

                return operation

            for name in FILE_OPERATIONS:
                setattr(os, name, counted(getattr(os, name)))
            save_final_model(CopyingTrainer(new), output_dir, lambda folder: None)
            os.write(writer, str(count[0]).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        reported = pipe.read()
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code == (0 if die_at is None else 137), f"the save exited with {code} (die_at {die_at})"
    return int(reported) if die_at is None else -1


def test_a_save_killed_at_any_point_leaves_the_old_or_the_new_model_complete(rank_16_and_8, tmp_path, capsys):
    """A rank-8 save over a finished rank-16 run, killed before each of its file operations in turn: the next
    reader (chat_cli, serve, export read the recipe first) finds the complete old model or the complete new one,
    never rank-8 weights beside the rank-16 config."""
    from glm_sft.loading import read_run_recipe

    old, new = rank_16_and_8
    old_files, new_files = model_files(old), model_files(new)
    assert [json.loads(files["adapter_config.json"])["r"] for files in (old_files, new_files)] == [16, 8]
    operations = save_and_die(old, new, tmp_path / "whole", die_at=None)
    assert model_files(tmp_path / "whole") == new_files and operations > len(new_files)

    outcomes = []
    for die_at in range(operations):
        output_dir = tmp_path / f"killed-{die_at}"
        save_and_die(old, new, output_dir, die_at)
        recipe = read_run_recipe(output_dir)  # what the next chat_cli / serve / export run does first
        found = model_files(output_dir)
        assert found in (old_files, new_files), f"killed before operation {die_at}: a mix of the two models"
        assert recipe["lora_rank"] == json.loads(found["adapter_config.json"])["r"]
        assert not (output_dir / STAGING_NAME).exists()
        outcomes.append("new" if found == new_files else "old")
    # Killed before the new model was complete: the old one; killed after: the new one, put in place at the next start.
    assert outcomes[0] == "old" and outcomes[-1] == "new"
    assert outcomes == sorted(outcomes, key=lambda outcome: outcome == "new"), outcomes
    assert "note: finished the final save into" in capsys.readouterr().err


def killed_with_new_weights_beside_old_config(old: Path, new: Path, output_dir: Path) -> None:
    """save_and_die, killed once the new adapter_model.safetensors was moved in and before adapter_config.json was."""
    operations = save_and_die(old, new, output_dir.with_name(output_dir.name + "-probe"), die_at=None)
    for die_at in range(operations):
        shutil.rmtree(output_dir, ignore_errors=True)
        save_and_die(old, new, output_dir, die_at)
        staging = output_dir / STAGING_NAME
        if not (staging / "adapter_model.safetensors").exists() and (staging / "adapter_config.json").exists():
            return
    raise AssertionError("no point of the save had the new weights moved in before the config")


def test_chat_and_export_load_a_model_whose_save_was_killed_between_moves(rank_16_and_8, tmp_path, capfd):
    """The reported failure: killed with the rank-8 weights moved in and the rank-16 adapter_config.json still in
    place, chat_cli and export stopped with a size mismatch; now each finishes the save and loads the rank-8 model."""
    import chat_cli
    import export

    old, new = rank_16_and_8
    killed = tmp_path / "killed"
    killed_with_new_weights_beside_old_config(old, new, killed)
    assert json.loads((killed / "adapter_config.json").read_text())["r"] == 16  # the mix a kill left
    assert (killed / "adapter_model.safetensors").read_bytes() == new.joinpath(
        "adapter_model.safetensors"
    ).read_bytes()

    for_export = tmp_path / "for-export"
    shutil.copytree(killed, for_export)
    reply = run_main(chat_cli.main, "--adapter", killed, "--prompt", "你是谁？", "--max_new_tokens", "4", capfd=capfd)
    assert reply.returncode == 0, reply.stderr[-3000:]
    assert model_files(killed) == model_files(new)

    exported = run_main(export.main, for_export, "--out_dir", tmp_path / "exported", capfd=capfd)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert model_files(for_export) == model_files(new) and (tmp_path / "exported" / "model.safetensors").is_file()


def test_train_py_finishes_a_cut_off_save_before_deciding_the_folder_is_finished(rank_16_and_8, tmp_path):
    old, new = rank_16_and_8
    killed = tmp_path / "killed"
    killed_with_new_weights_beside_old_config(old, new, killed)
    with pytest.raises(UserError, match="already holds a finished model"):
        check_output_dir(str(killed), overwrite=False)
    assert model_files(killed) == model_files(new) and not (killed / STAGING_NAME).exists()


class FileTrainer(CopyingTrainer):
    def __init__(self, files: dict[str, bytes]):
        super().__init__(None)
        self.files = files

    def save_model(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        for name, content in self.files.items():
            (Path(folder) / name).write_bytes(content)


def test_the_old_model_s_own_files_go_with_it(tmp_path):
    """A full model replaced by an adapter: the old config.json, shards, index and chat_template.jinja are removed
    (an adapter_config.json beside them would load the wrong thing), the run's logs and checkpoints stay."""
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    old = [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "chat_template.jinja",
        "tokenizer.json",
        "recipe.yaml",
    ]
    for name in old:
        (output_dir / name).write_text(f"old {name}")
    kept = {"loss.png": b"plot", "samples.jsonl": b"{}\n", "notes.txt": b"mine"}
    for name, content in kept.items():
        (output_dir / name).write_bytes(content)
    (output_dir / "checkpoint-3").mkdir()
    new = {
        "adapter_config.json": b"{}",
        "adapter_model.safetensors": b"w",
        "tokenizer.json": b"t",
        "recipe.yaml": b"r",
    }
    save_final_model(FileTrainer(new), output_dir, lambda folder: None)
    left = {path.name: path.read_bytes() for path in output_dir.iterdir() if path.is_file()}
    assert left == new | kept and (output_dir / "checkpoint-3").is_dir()


def test_a_plan_cut_off_while_written_leaves_the_old_model(tmp_path):
    output_dir = tmp_path / "out"
    staging = output_dir / STAGING_NAME
    staging.mkdir(parents=True)
    (output_dir / "adapter_config.json").write_text("old")
    (staging / "adapter_config.json").write_text("new")
    (staging / SWAP_PLAN).write_text('{"move": ["adapter_con')  # the process died while writing it
    finish_cut_off_save(output_dir, reading=True)
    assert (output_dir / "adapter_config.json").read_text() == "old" and not staging.exists()


def test_a_reader_leaves_a_save_that_a_running_process_is_making(tmp_path):
    """While the run that holds the lock is alive its staging folder is its own: a reader leaves it, and refuses to
    read a model that is being replaced at that moment."""
    output_dir = tmp_path / "out"
    staging = output_dir / STAGING_NAME
    staging.mkdir(parents=True)
    (output_dir / "adapter_config.json").write_text("old")
    (staging / "adapter_config.json").write_text("new")
    alive = os.getppid()  # a running process other than this one
    lock = {"pid": alive, "host": __import__("socket").gethostname(), "started": "now"}
    (output_dir / LOCK_NAME).write_text(json.dumps(lock))
    finish_cut_off_save(output_dir, reading=True)  # still writing its new model: the old one is whole, read it
    assert (staging / "adapter_config.json").is_file()
    (staging / SWAP_PLAN).write_text(json.dumps({"move": ["adapter_config.json"], "remove": [], "complete": True}))
    with pytest.raises(UserError, match=f"being replaced by the final save of a training run \\(pid {alive}"):
        finish_cut_off_save(output_dir, reading=True)
    assert (output_dir / "adapter_config.json").read_text() == "old"


# ---- 7. an adapter folder that holds code is not loaded ----

UNSAFE_YAML = "finetuning_type: lora\nlora_rank: !!python/object/apply:os.system ['touch {marker}']\n"


def pickled_code(path: Path, marker: Path) -> None:
    import torch

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"base_model.model.lm_head.weight": RunsCode()}, path)


@pytest.mark.parametrize("kind", ["yaml tag", "pickle", "bad yaml"])
def test_an_adapter_holding_code_is_one_line_in_chat_serve_and_export(kind, rank_16_and_8, tmp_path, capfd):
    import chat_cli
    import export
    import serve

    adapter = tmp_path / "adapter"
    shutil.copytree(rank_16_and_8[0], adapter)
    marker = tmp_path / "code-ran"
    if kind == "yaml tag":
        (adapter / "recipe.yaml").write_text(UNSAFE_YAML.format(marker=marker))
        expected = f"error: {adapter / 'recipe.yaml'}: holds a YAML tag that would build a Python object"
    elif kind == "bad yaml":
        (adapter / "recipe.yaml").write_text("lora_rank: [16\n")
        expected = f"error: {adapter / 'recipe.yaml'}: not valid YAML"
    else:
        (adapter / "adapter_model.safetensors").unlink()
        pickled_code(adapter / "adapter_model.bin", marker)
        expected = (
            f"error: {adapter / 'adapter_model.bin'}: holds pickled Python objects besides tensors (posix.system)"
        )
    runs = {
        "chat_cli": (chat_cli.main, "--adapter", adapter, "--prompt", "hi"),
        "serve": (serve.main, "--adapter", adapter, "--port", "0"),
        "export": (export.main, adapter, "--out_dir", tmp_path / "exported"),
    }
    for script, (main, *args) in runs.items():
        error = one_error(run_main(main, *args, capfd=capfd))
        assert error.startswith(expected), f"{script}: {error}"
        if kind != "bad yaml":
            assert "not loaded, for safety" in error, f"{script}: {error}"
    assert not marker.exists() and not (tmp_path / "exported").exists()


def test_export_and_chat_refuse_a_full_model_whose_weights_are_a_pickle_holding_code(tmp_path, capfd):
    import chat_cli
    import export
    from glm_sft.builtin import builtin_path

    model = tmp_path / "model"
    shutil.copytree(builtin_path("builtin:tiny-glm4"), model, ignore=shutil.ignore_patterns("*.safetensors"))
    marker = tmp_path / "code-ran"
    pickled_code(model / "pytorch_model.bin", marker)
    error = one_error(run_main(export.main, model, "--out_dir", tmp_path / "exported", capfd=capfd))
    assert error.startswith(f"error: {model / 'pytorch_model.bin'}: holds pickled Python objects besides tensors")
    assert "not loaded, for safety" in error and not marker.exists() and not (tmp_path / "exported").exists()
    error = one_error(run_main(chat_cli.main, "--model", model, "--prompt", "hi", capfd=capfd))
    assert error.startswith(f"error: {model / 'pytorch_model.bin'}: holds pickled Python objects besides tensors")
    assert not marker.exists()


# ---- 7. an export onto a mount point leaves nothing beside it ----


def test_export_onto_an_empty_read_only_mount_point_is_one_line_and_leaves_nothing(rank_16_and_8, tmp_path, capfd):
    import export

    mount_point = mount_tmpfs(tmp_path / "ro", "ro,size=64k")
    try:
        error = one_error(run_main(export.main, rank_16_and_8[0], "--out_dir", mount_point, capfd=capfd))
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
    assert f"--out_dir {mount_point} is a mount point" in error and "give a folder inside it" in error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ro"]


def test_export_s_set_aside_folder_goes_when_the_old_export_cannot_be_moved(tmp_path, monkeypatch):
    out_dir, staging = tmp_path / "merged", tmp_path / ".merged.exporting-1-x"
    out_dir.mkdir()
    staging.mkdir()

    def busy(source, target):
        raise OSError(16, os.strerror(16), str(source))  # EBUSY, as for a mount point

    monkeypatch.setattr(staging_module.os, "replace", busy)
    with pytest.raises(OSError):
        staging_module.replace_folder(staging, out_dir)
    assert sorted(path.name for path in tmp_path.iterdir()) == [staging.name, "merged"]


# ---- 9. weights readable as the umask says ----


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield 0o640
    os.umask(previous)


def test_saved_and_exported_weights_follow_the_umask(umask_027, tmp_path, capfd):
    """Under umask 027 every file of a save is -rw-r-----: the weights too (safetensors alone would write -rw-------)
    in the final output, the checkpoints and an export."""
    import export

    output_dir = tmp_path / "out"
    train("--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2", "--output_dir", output_dir)
    exported = run_main(export.main, output_dir, "--out_dir", tmp_path / "exported", capfd=capfd)
    assert exported.returncode == 0, exported.stderr[-3000:]

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    for folder in (output_dir, output_dir / "checkpoint-2", tmp_path / "exported"):
        weights = sorted(folder.glob("*.safetensors"))
        assert weights, folder
        others = [path for path in folder.iterdir() if path.is_file() and path.suffix != ".safetensors"]
        assert {mode(path) for path in weights + others} == {umask_027}, folder
