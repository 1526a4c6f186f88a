"""Our tokenization is the only place that truncates: truncation_mode keep_start and keep_end, exact ids and labels;
the trainer gets our rows as they are (TRL's own dataset preparation does not run), padded or padding-free."""

import re

import pytest
from conftest import build_run

from glm_sft import UserError, tokenization
from glm_sft.arguments import parse_recipe
from glm_sft.data import read_conversations
from glm_sft.template import IGNORE_INDEX
from glm_sft.tokenization import encode_conversation, tokenize_dataset

WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "天气", "parameters": {"type": "object", "properties": {}}},
}
ROUNDS = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "q1"},
    {"role": "assistant", "content": "a1"},
    {"role": "user", "content": "q2"},
    {"role": "assistant", "content": "a2"},
    {"role": "user", "content": "q3"},
    {"role": "assistant", "content": "a3"},
]


def text_and_trained(tokenizer, encoded: dict) -> tuple[str, str]:
    trained = [token for token in encoded["labels"] if token != IGNORE_INDEX]
    return tokenizer.decode(encoded["input_ids"]), tokenizer.decode(trained)


def test_keep_end_drops_the_earliest_rounds_and_keeps_the_system_prompt(glm4_tokenizer):
    full = encode_conversation(glm4_tokenizer, ROUNDS)
    last_two = encode_conversation(glm4_tokenizer, ROUNDS[:1] + ROUNDS[3:])
    assert len(last_two["input_ids"]) < len(full["input_ids"])
    cut = encode_conversation(
        glm4_tokenizer, ROUNDS, max_length=len(last_two["input_ids"]), truncation_mode="keep_end"
    )
    assert cut["input_ids"] == last_two["input_ids"] and cut["labels"] == last_two["labels"]
    assert cut["truncated"] and cut["length"] == len(full["input_ids"])
    assert text_and_trained(glm4_tokenizer, cut) == (
        "[gMASK]<sop><|system|>\nS<|user|>\nq2<|assistant|>\na2<|user|>\nq3<|assistant|>\na3<|user|>",
        "\na2<|user|>\na3<|user|>",  # only what remains is trained
    )
    # One token short of two rounds: the last round alone.
    shorter = encode_conversation(
        glm4_tokenizer, ROUNDS, max_length=len(last_two["input_ids"]) - 1, truncation_mode="keep_end"
    )
    assert text_and_trained(glm4_tokenizer, shorter) == (
        "[gMASK]<sop><|system|>\nS<|user|>\nq3<|assistant|>\na3<|user|>",
        "\na3<|user|>",
    )
    # What fits is not touched, in either mode.
    for mode in ("keep_start", "keep_end"):
        whole = encode_conversation(glm4_tokenizer, ROUNDS, max_length=len(full["input_ids"]), truncation_mode=mode)
        assert whole == full


def test_keep_end_keeps_the_tools_and_cuts_a_last_round_that_does_not_fit_at_its_end(glm4_tokenizer):
    messages = ROUNDS[1:5]  # no system message: the tools are the system block
    last = encode_conversation(glm4_tokenizer, messages[2:], tools=[WEATHER])
    cut = encode_conversation(
        glm4_tokenizer, messages, tools=[WEATHER], max_length=len(last["input_ids"]), truncation_mode="keep_end"
    )
    assert cut["input_ids"] == last["input_ids"] and cut["labels"] == last["labels"]
    text, _ = text_and_trained(glm4_tokenizer, cut)
    assert "get_weather" in text and text.endswith("<|user|>\nq2<|assistant|>\na2<|user|>") and "q1" not in text
    # Shorter than the last round with the tools: that round is cut as keep_start cuts it ("2" and the end token go).
    tight = encode_conversation(
        glm4_tokenizer, messages, tools=[WEATHER], max_length=len(last["input_ids"]) - 2, truncation_mode="keep_end"
    )
    assert tight["input_ids"] == last["input_ids"][:-2] and tight["labels"] == last["labels"][:-2]
    assert glm4_tokenizer.decode([token for token in tight["labels"] if token != IGNORE_INDEX]) == "\na"


def test_keep_end_with_last_turn_only_trains_the_final_reply(chatglm3_tokenizer):
    last_two = ROUNDS[:1] + ROUNDS[3:]
    expected = encode_conversation(chatglm3_tokenizer, last_two, last_turn_only=True)
    cut = encode_conversation(
        chatglm3_tokenizer,
        ROUNDS,
        max_length=len(expected["input_ids"]),
        last_turn_only=True,
        truncation_mode="keep_end",
    )
    assert cut["input_ids"] == expected["input_ids"] and cut["labels"] == expected["labels"]
    assert chatglm3_tokenizer.decode([token for token in cut["labels"] if token != IGNORE_INDEX]) == "\na3</s>"


def test_tokenize_dataset_keep_end_reports_and_keeps_every_row(glm4_tokenizer, capsys):
    rows, _ = read_conversations("data/multi_turn.jsonl")
    dataset = tokenize_dataset(rows, glm4_tokenizer, name="train", max_length=100, truncation_mode="keep_end")
    expected = [
        encode_conversation(glm4_tokenizer, row["messages"], max_length=100, truncation_mode="keep_end")
        for row in rows
    ]
    assert dataset["input_ids"] == [row["input_ids"] for row in expected]
    assert dataset["labels"] == [row["labels"] for row in expected]
    truncated = sum(row["truncated"] for row in expected)
    assert truncated > 0 and all(len(ids) <= 100 for ids in dataset["input_ids"])
    assert f"{len(rows)} rows used, {truncated} truncated to max_length=100" in capsys.readouterr().err


def test_other_truncation_modes_are_refused_in_one_line(glm4_tokenizer, tmp_path):
    with pytest.raises(UserError, match=r"^truncation_mode 'middle' is unknown; use keep_start .* or keep_end"):
        encode_conversation(glm4_tokenizer, ROUNDS, max_length=8, truncation_mode="middle")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("dataset_name: data/multi_turn.jsonl\nbf16: false\ntruncation_mode: middle\n")
    with pytest.raises(UserError, match="truncation_mode 'middle' is unknown") as refused:
        parse_recipe(["--config", str(recipe)])
    assert "\n" not in str(refused.value)
    with pytest.raises(UserError, match="invalid choice: 'middle'"):
        parse_recipe(["--dataset_name", "data/multi_turn.jsonl", "--truncation_mode", "middle"])


def test_two_processes_give_the_tokens_of_one(glm4_tokenizer, monkeypatch):
    rows, _ = read_conversations("data/multi_turn.jsonl")
    one = tokenize_dataset(rows, glm4_tokenizer, name="train", max_length=64)
    monkeypatch.setattr(tokenization, "ENCODE_BATCH_ROWS", 4)  # several batches, so the forked processes share them
    two = tokenize_dataset(rows, glm4_tokenizer, name="train", max_length=64, num_proc=2)
    assert two["input_ids"] == one["input_ids"] and two["labels"] == one["labels"]
    assert two["source"] == one["source"] and two.features == one.features


@pytest.mark.parametrize("padding_free", ["true", "false"])
def test_the_trainer_gets_our_rows_as_they_are(padding_free, glm4_tokenizer, tmp_path, monkeypatch):
    from trl import SFTTrainer

    def must_not_prepare(*args, **kwargs):
        raise AssertionError("TRL prepared the dataset again")

    monkeypatch.setattr(SFTTrainer, "_prepare_dataset", must_not_prepare)
    argv = [
        "--config", "recipes/demo.yaml", "--dataset_name", "data/multi_turn.jsonl", "--output_dir", tmp_path / "o",
        "--report_to", "none", "--sample_count", "0", "--max_length", "90", "--truncation_mode", "keep_end",
        "--val_size", "4", "--eval_strategy", "no", "--per_device_eval_batch_size", "2",
        "--padding_free", padding_free,
    ]  # fmt: skip
    run = build_run([str(arg) for arg in argv])
    trainer = run.trainer
    assert trainer.args.dataset_kwargs["skip_prepare_dataset"] is True
    assert trainer.args.max_length == (None if padding_free == "true" else 90)
    expected = [
        encode_conversation(glm4_tokenizer, row["messages"], max_length=90, truncation_mode="keep_end")
        for row in run.train_rows
    ]
    assert any(row["truncated"] for row in expected)
    assert trainer.train_dataset.column_names == ["input_ids", "labels"]
    assert trainer.train_dataset["input_ids"] == [row["input_ids"] for row in expected]
    assert trainer.train_dataset["labels"] == [row["labels"] for row in expected]

    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    lengths = [len(expected[0]["input_ids"]), len(expected[1]["input_ids"])]
    if padding_free == "true":  # one row of both, positions restarting at the second
        assert "attention_mask" not in batch and batch["input_ids"].shape == (1, sum(lengths))
        assert batch["position_ids"][0].tolist() == [*range(lengths[0]), *range(lengths[1])]
    else:  # padded to the longer one
        assert batch["input_ids"].shape == (2, max(lengths))
        assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0 and "eval_runtime" in metrics


def test_packing_leaves_trl_to_pack_our_rows(tmp_path):
    from glm_sft.run import trainer_arguments

    argv = ["--config", "recipes/demo.yaml", "--output_dir", str(tmp_path / "o"), "--report_to", "none"]
    training = parse_recipe([*argv, "--packing", "true"]).training
    assert not (trainer_arguments(training, "disabled").dataset_kwargs or {}).get("skip_prepare_dataset")


@pytest.mark.slow
@pytest.mark.parametrize("padding_free", ["true", "false"])
def test_a_run_trains_on_rows_only_our_tokenization_cut(padding_free, tmp_path, monkeypatch):
    from conftest import train_in_process
    from trl import SFTTrainer

    def must_not_prepare(*args, **kwargs):
        raise AssertionError("TRL prepared the dataset again")

    monkeypatch.setattr(SFTTrainer, "_prepare_dataset", must_not_prepare)
    result = train_in_process(
        "--config", "recipes/demo.yaml", "--dataset_name", "data/multi_turn.jsonl", "--output_dir", tmp_path / "o",
        "--report_to", "none", "--sample_count", "0", "--max_length", "90", "--max_steps", "2",
        "--val_size", "4", "--eval_strategy", "steps", "--eval_steps", "2", "--padding_free", padding_free,
    )  # fmt: skip
    used = re.search(r"train: 13 rows used, (\d+) truncated to max_length=90", result.stderr)
    assert used and int(used[1]) > 0
    assert "'eval_loss'" in result.stdout + result.stderr
    assert (tmp_path / "o" / "adapter_model.safetensors").is_file()
