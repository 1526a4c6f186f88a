"""glm_sft.tokenization: the dataset the trainer gets, tokenized once per machine under a launch."""

import contextlib
from types import SimpleNamespace

import pytest

from glm_sft import tokenization
from glm_sft.data import read_conversations
from glm_sft.tokenization import encode_conversation, tokenize_dataset


def launch_process(index: int):
    """The training arguments of process `index` of a 2-process launch on one machine."""

    @contextlib.contextmanager
    def main_process_first(local=True, desc=""):
        yield

    return SimpleNamespace(world_size=2, process_index=index, main_process_first=main_process_first)


def test_under_a_launch_the_other_processes_load_the_main_processs_tokens(glm4_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("GLM_SFT_CACHE", str(tmp_path))
    rows, _ = read_conversations("data/multi_turn.jsonl")
    settings = dict(name="train", max_length=256, training_args=None)
    main = tokenize_dataset(rows, glm4_tokenizer, **{**settings, "training_args": launch_process(0)})
    assert len(list((tmp_path / "tokenized").glob("train-*.arrow"))) == 1  # datasets' cache file, by fingerprint

    def must_not_tokenize(*args, **kwargs):
        raise AssertionError("the second process tokenized again")

    monkeypatch.setattr(tokenization, "encode_conversation", must_not_tokenize)
    monkeypatch.setattr(tokenization, "encode_conversations", must_not_tokenize)  # the batched path
    other = tokenize_dataset(rows, glm4_tokenizer, **{**settings, "training_args": launch_process(1)})
    assert other["input_ids"] == main["input_ids"] and other["labels"] == main["labels"]
    with pytest.raises(AssertionError, match="tokenized again"):  # other rows: other fingerprint, no cache hit
        tokenize_dataset(rows[:2], glm4_tokenizer, **{**settings, "training_args": launch_process(1)})


def test_one_process_keeps_no_cache_file_and_gives_the_same_tokens(glm4_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("GLM_SFT_CACHE", str(tmp_path))
    rows, _ = read_conversations("data/multi_turn.jsonl")
    dataset = tokenize_dataset(rows, glm4_tokenizer, name="train", max_length=256)
    assert not (tmp_path / "tokenized").exists()
    expected = [encode_conversation(glm4_tokenizer, row["messages"], max_length=256) for row in rows]
    assert dataset["input_ids"] == [row["input_ids"] for row in expected]
    assert dataset["labels"] == [row["labels"] for row in expected]
    assert dataset["source"] == [row["source"] for row in rows]
