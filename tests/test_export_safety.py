"""export.py under faults: a killed export's staging folder cleaned on the next run, a corrupt source, a full disk
and a read-only target each end in one line and exit 1; the card shows the rows the run used."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import mount_tmpfs, train_in_process

import export
from glm_sft.loading import load_tokenizer

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
    card = export.model_card(
        checkpoint, {"dataset_name": "d.jsonl"}, {"base": "b"}, family, "fp32", tokenizer, "GlmForCausalLM"
    )
    assert "- training data: d.jsonl (80 rows)" in card
