"""export.py under faults: a killed export's staging folder cleaned on the next run, a corrupt source, a full disk
and a read-only target each end in one line and exit 1; the card shows the rows the run used."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import mount_tmpfs, train_in_process

import export
from glm_sft.exporting import export_card
from glm_sft.loading import load_tokenizer
from glm_sft.staging import finish_cut_off_replace, replace_folder, staging_beside

SOURCE_FILES = ("adapter_config.json", "adapter_model.safetensors", "recipe.yaml", "run.json", "tokenizer.json")


@pytest.fixture
def mounted(tmp_path):
    mounts = []

    def mount(name, options):
        mounts.append(mount_tmpfs(tmp_path / name, options))
        return mounts[-1]

    yield mount
    for mount_point in mounts:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A 1-step LoRA run of the demo recipe, trained in this process."""
    output_dir = tmp_path_factory.mktemp("adapter") / "run"
    argv = ["--config", "recipes/demo.yaml", "--max_steps", "1", "--report_to", "none", "--sample_count", "0"]
    train_in_process(*argv, "--val_size", "5", "--output_dir", output_dir)
    return output_dir


def export_fails(capsys, *arguments) -> str:
    with pytest.raises(SystemExit) as stopped:
        export.main([*map(str, arguments)])
    error = capsys.readouterr().err
    lines = [line for line in error.strip().splitlines() if line.startswith("error:")]
    assert stopped.value.code == 1 and len(lines) == 1 and "Traceback" not in error, error
    return lines[0]


def fake_source(folder, **files):
    folder.mkdir(parents=True)
    for name, content in files.items():
        (folder / name.replace("_json", ".json").replace("_st", ".safetensors")).write_bytes(content)
    return folder


def test_a_stale_staging_folder_of_a_killed_export_is_removed(tmp_path, capsys):
    """What a killed export leaves beside out_dir (its process gone); the next export, here one that stops at a user
    mistake after the clean-up, removes it and says so."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    staging = tmp_path / f".merged.exporting-{pid}-x1y2"
    staging.mkdir()
    (staging / "model-00001-of-00002.safetensors").write_bytes(b"half" * 1000)
    set_aside = tmp_path / f".merged.old-{pid}-z3"
    (set_aside / "merged").mkdir(parents=True)
    (set_aside / "merged" / "config.json").write_text("{}")  # the previous export, set aside for --force
    source = fake_source(tmp_path / "src", config_json=b'{"model_type": "glm"}')
    export_fails(capsys, source, "--out-dir", tmp_path / "merged", "--dtype", "int3")  # refused before cleaning
    assert staging.exists()
    with pytest.raises((SystemExit, Exception)):  # the fake source has no weights: it fails after the clean-up
        export.main([str(source), "--out-dir", str(tmp_path / "merged")])
    notes = capsys.readouterr().err
    assert f"removed {staging}, left by an export that was stopped" in notes
    assert f"put back {tmp_path / 'merged'}" in notes
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged", "src"]
    assert (tmp_path / "merged" / "config.json").read_text() == "{}"


def replace_and_die(target, new: dict, die_before: int | None) -> int:
    """In a forked process, replace_folder the folder `target` by one holding `new`, the process ending with os._exit
    (no clean-up, as under SIGKILL) just before its file operation number `die_before`; the operations it made."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        made = [0]

        def dying(real):
            def operation(*args, **kwargs):
                if made[0] == die_before:
                    os._exit(137)
                made[0] += 1
                return real(*args, **kwargs)

            return operation

        staging = staging_beside(target)
        for name, content in new.items():
            (staging / name).write_text(content)
        for name in ("replace", "rename", "unlink", "rmdir", "fsync"):
            setattr(os, name, dying(getattr(os, name)))
        replace_folder(staging, target)
        os.write(writer, str(made[0]).encode())
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        made = pipe.read()
    os.waitpid(pid, 0)
    return int(made or -1)


def test_an_export_killed_at_any_point_is_finished_or_undone_by_the_next(tmp_path, capsys):
    """--force over an old export, killed before each file operation of the swap in turn: the next export's start
    leaves the old export or the new one in out_dir, whole, and nothing beside it; killed once the new one was
    complete and the old one set aside, the new one is put in place."""
    old = {"config.json": "old", "model.safetensors": "old weights"}
    new = {"config.json": "new", "model.safetensors": "new weights", "README.md": "card"}

    def old_export(folder):
        (folder / "merged").mkdir(parents=True)
        for name, content in old.items():
            (folder / "merged" / name).write_text(content)
        return folder / "merged"

    operations = replace_and_die(old_export(tmp_path / "whole"), new, die_before=None)
    assert {path.name: path.read_text() for path in (tmp_path / "whole" / "merged").iterdir()} == new
    outcomes = []
    for die_before in range(operations):
        target = old_export(tmp_path / f"killed-{die_before}")
        replace_and_die(target, new, die_before)
        finish_cut_off_replace(target, "an export", print)
        found = {path.name: path.read_text() for path in target.iterdir()}
        assert found in (old, new), f"killed before operation {die_before}: {found}"
        assert [path.name for path in target.parent.iterdir()] == ["merged"], die_before
        outcomes.append("new" if found == new else "old")
    assert outcomes[0] == "old" and outcomes[-1] == "new", outcomes
    assert outcomes == sorted(outcomes, key=lambda outcome: outcome == "new"), outcomes
    assert "which an export that was stopped had finished writing" in capsys.readouterr().out


def test_a_corrupt_source_is_one_line(tmp_path, capsys):
    cut_off = fake_source(tmp_path / "cut", adapter_config_json=b'{"peft_type": "LORA", "base_', adapter_model_st=b"")
    assert "adapter_config.json is not valid JSON" in export_fails(capsys, cut_off, "--out-dir", tmp_path / "x")
    empty = fake_source(tmp_path / "empty", adapter_config_json=b'{"peft_type": "LORA"}', adapter_model_st=b"")
    error = export_fails(capsys, empty, "--out-dir", tmp_path / "x")
    assert f"{empty}: adapter_model.safetensors is cut off (0 bytes): the folder is corrupt" in error
    assert not (tmp_path / "x").exists()


def test_a_read_only_target_is_one_line_before_loading(tmp_path, mounted, capsys):
    read_only = mounted("ro", "ro,size=64k")
    source = fake_source(tmp_path / "src", config_json=b"{}")
    error = export_fails(capsys, source, "--out-dir", read_only / "merged")
    assert f"cannot be written (Read-only file system: {read_only})" in error


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_nothing(adapter, tmp_path, mounted, capsys):
    small = mounted("small", "size=256k")
    error = export_fails(capsys, adapter, "--out-dir", small / "merged", "--dtype", "fp32")
    assert f"error: cannot write the export into {small}: No space left on device" in error
    assert "it needs about " in error and "nothing was left there" in error
    assert list(small.iterdir()) == []


@pytest.mark.slow
def test_the_exported_card_shows_the_rows_the_run_used(adapter, tmp_path):
    facts = json.loads((adapter / "run.json").read_text())
    assert facts["train_rows"] == 80 and facts["eval_rows"] == 5
    export.main([str(adapter), "--out-dir", str(tmp_path / "merged"), "--dtype", "fp32"])
    card = (tmp_path / "merged" / "README.md").read_text(encoding="utf-8")
    assert "- training data: data/self_cognition.jsonl (80 rows)" in card
    assert "- evaluation data: 5 rows held out of the training data (val_size 5" in card
    assert "row count not recorded" not in card
    # A checkpoint-N of the run finds run.json in the run's output_dir.
    checkpoint = tmp_path / "run" / "checkpoint-1"
    checkpoint.mkdir(parents=True)
    for name in SOURCE_FILES:
        shutil.copy(adapter / name, (checkpoint if name.startswith("adapter") else checkpoint.parent) / name)
    tokenizer, family = load_tokenizer("builtin:tiny-glm4")
    card = export_card(
        checkpoint, {"dataset_name": "d.jsonl"}, {"base": "b"}, family, "fp32", tokenizer, "GlmForCausalLM"
    )
    assert "- training data: d.jsonl (80 rows)" in card
