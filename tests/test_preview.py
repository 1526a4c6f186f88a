"""The preview shows exactly what the trainer trains on."""

import contextlib
import io
import json

import torch
from conftest import REPO, build_run, run_main

from glm_sft import preview
from glm_sft.template import IGNORE_INDEX


def preview_records(*args):
    """`python -m glm_sft.preview --config recipes/demo.yaml ARGS`'s JSON lines, run in this process."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        preview.main(["--config", "recipes/demo.yaml", *args])
    return [json.loads(line) for line in output.getvalue().splitlines()]


def test_preview_json_matches_the_trainers_dataset_and_batches(tmp_path, monkeypatch):
    records = preview_records("--json", "--n", "1000")
    assert len(records) == 85
    monkeypatch.chdir(REPO)
    trainer = build_run(["--config", "recipes/demo.yaml", "--output_dir", str(tmp_path / "out")]).trainer
    dataset = trainer.train_dataset
    assert [row["input_ids"] for row in dataset] == [record["input_ids"] for record in records]
    assert [row["labels"] for row in dataset] == [record["labels"] for record in records]
    # The collator lays the rows end to end (padding-free) and changes no label: the batch trains exactly the
    # previewed tokens. With padding (--padding_free false) the rows keep their labels and the rest is ignored.
    batch = trainer.data_collator([dataset[0], dataset[1]])
    assert batch["labels"][0].tolist() == records[0]["labels"] + records[1]["labels"]
    padded = build_run(
        ["--config", "recipes/demo.yaml", "--output_dir", str(tmp_path / "out"), "--padding_free", "false"]
    ).trainer
    batch = padded.data_collator([dataset[0], dataset[1]])
    for row, record in enumerate(records[:2]):
        length = len(record["labels"])
        assert batch["labels"][row, :length].tolist() == record["labels"]
        assert torch.all(batch["labels"][row, length:] == IGNORE_INDEX)
    tokenizer = trainer.processing_class
    first = records[0]
    assert first["text"] == tokenizer.decode(first["input_ids"])
    assert first["text"].startswith("[gMASK]<sop><|user|>\n你是谁？<|assistant|>\n您好，我是小智")
    assert first["text"].endswith("<|user|>")  # the final turn is closed by GLM-4's end token
    assert first["source"] == "data/self_cognition.jsonl:1"


def test_preview_marks_trained_spans_and_follows_overrides(capfd):
    argv = ["--config", "recipes/demo.yaml", "--n", "1", "--dataset_name", "data/multi_turn.jsonl"]
    result = run_main(preview.main, *argv, "--last_turn_only", "true", capfd=capfd)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("--- data/multi_turn.jsonl:1 (glm4 format,")
    body = "\n".join(lines[1:])
    assert body.count("⟦") == 1 and body.endswith("<|user|>⟧")  # only the last assistant turn is trained


def test_preview_help_and_bad_flags_use_the_recipe_parser(capfd):
    result = run_main(preview.main, "--help", capfd=capfd)
    assert result.returncode == 0 and "--n N" in result.stdout and "--lora_rank" in result.stdout
    result = run_main(preview.main, "--config", "recipes/demo.yaml", "--nn", "2", capfd=capfd)
    assert result.returncode == 1 and "unknown option --nn (did you mean --n?)" in result.stderr


def test_preview_json_all_turns_trains_every_assistant_turn():
    records = preview_records("--json", "--n", "2", "--dataset_name", "data/multi_turn.jsonl")
    for record in records:
        trained_runs = 0
        previous = IGNORE_INDEX
        for label in record["labels"]:
            if label != IGNORE_INDEX and previous == IGNORE_INDEX:
                trained_runs += 1
            previous = label
        assert trained_runs == record["text"].count("<|assistant|>")
