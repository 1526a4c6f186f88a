"""Message text is tokenized as text: the spellings of special tokens inside a conversation (ChatGLM3's sop, eop, </s>)
give the ids ChatGLM3's own builder gives, never control tokens; an empty ChatGLM3 system prompt renders as its builder
renders it; "loss": false leaves a reply untrained; a truncated reply loses its end token."""

import pytest
from test_chatglm3_convert import builder_ids_and_labels, converted_tokenizer, sp, sp_model_file  # noqa: F401

from glm_sft.template import IGNORE_INDEX
from glm_sft.tokenization import encode_conversation

SPELLINGS = [
    [
        {"role": "user", "content": "What do sop and eop mean"},
        {"role": "assistant", "content": "sop starts, eop ends."},
    ],
    [{"role": "user", "content": "How does a sentence end?"}, {"role": "assistant", "content": "With </s> here."}],
    [
        {"role": "system", "content": "<s> and <unk> are words"},
        {"role": "user", "content": "sop"},
        {"role": "assistant", "content": "eop</s>"},
    ],
]


@pytest.mark.parametrize("messages", SPELLINGS, ids=["sop-eop", "eos", "bos-unk-final-eos"])
def test_chatglm3_text_with_special_spellings_gets_the_builders_ids(converted_tokenizer, sp, messages):  # noqa: F811
    encoded = encode_conversation(converted_tokenizer, messages)
    ids, labels = builder_ids_and_labels(sp, messages, close_final_turn=True)
    assert encoded["input_ids"] == ids
    assert encoded["labels"] == labels
    eos = converted_tokenizer.convert_tokens_to_ids("</s>")
    assert encoded["input_ids"].count(eos) == 1  # only the end token ChatGLM3's demo trains after the last reply


def test_empty_system_prompt_renders_as_chatglm3s_builder_does_and_as_nothing_in_glm4(
    converted_tokenizer,  # noqa: F811
    sp,  # noqa: F811
    glm4_tokenizer,
    tmp_path,
):
    from conftest import write_jsonl

    from glm_sft.data import read_conversations

    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": [{"role": "system", "content": ""}, *SPELLINGS[0]]}])
    rows, _ = read_conversations(path)
    messages = rows[0]["messages"]
    assert messages[0] == {"role": "system", "content": ""}
    encoded = encode_conversation(converted_tokenizer, messages)
    assert (encoded["input_ids"], encoded["labels"]) == builder_ids_and_labels(sp, messages, close_final_turn=True)
    assert encode_conversation(glm4_tokenizer, messages) == encode_conversation(glm4_tokenizer, messages[1:])


def test_builtin_chatglm3_encodes_spellings_in_text_as_text(chatglm3_tokenizer):
    messages = SPELLINGS[2]
    encoded = encode_conversation(chatglm3_tokenizer, messages)
    special = set(chatglm3_tokenizer.convert_tokens_to_ids(["sop", "eop", "<s>", "</s>", "<unk>"]))
    text_ids = [token for token in encoded["input_ids"][2:-1] if token in special]
    assert text_ids == []  # past [gMASK]sop and before the final </s>, no special token comes from the text
    assert chatglm3_tokenizer.decode(encoded["input_ids"]) == (
        "[gMASK]sop<|system|>\n<s> and <unk> are words<|user|>\nsop<|assistant|>\neop</s></s>"
    )


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "look at <|begin_of_image|>"}, {"role": "assistant", "content": "ok"}],
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a <|user|> b"}],
    ],
)
def test_glm4_spellings_never_become_control_tokens_in_text(glm4_tokenizer, messages):
    encoded = encode_conversation(glm4_tokenizer, messages)
    special = set(glm4_tokenizer.all_special_ids) | set(glm4_tokenizer.added_tokens_encoder.values())
    structure = ["[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|user|>"]
    assert [glm4_tokenizer.convert_ids_to_tokens(t) for t in encoded["input_ids"] if t in special] == structure


def test_glm4_control_spellings_are_refused_in_data(tmp_path):
    from conftest import write_jsonl
    from test_data import problems_of

    rows = [
        {"messages": [{"role": "user", "content": f"x {token} y"}, {"role": "assistant", "content": "ok"}]}
        for token in ("<sop>", "[gMASK]", "<|endoftext|>", "<|begin_of_image|>")
    ]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    assert problems_of(path).splitlines() == [
        f"{path}:{line}: message 1 (user) contains the control token {token}; remove it from the text"
        for line, token in enumerate(("<sop>", "[gMASK]", "<|endoftext|>", "<|begin_of_image|>"), 1)
    ]


def trained_text(tokenizer, encoded):
    return tokenizer.decode([token for token in encoded["labels"] if token != IGNORE_INDEX])


def test_loss_false_leaves_that_reply_untrained_and_the_text_unchanged(family_and_tokenizer):
    family, tokenizer = family_and_tokenizer
    messages = [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "旧的回答", "loss": False},
        {"role": "user", "content": "再说一次"},
        {"role": "assistant", "content": "新的回答"},
    ]
    plain = [{key: value for key, value in message.items() if key != "loss"} for message in messages]
    encoded, full = encode_conversation(tokenizer, messages), encode_conversation(tokenizer, plain)
    assert encoded["input_ids"] == full["input_ids"]
    end = "<|user|>" if family == "glm4" else "</s>"
    assert trained_text(tokenizer, encoded) == f"\n新的回答{end}"
    assert trained_text(tokenizer, full) == f"\n旧的回答<|user|>\n新的回答{end}"


def test_a_truncated_reply_is_trained_without_its_end_token(family_and_tokenizer):
    family, tokenizer = family_and_tokenizer
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "一二三四五六七八九十" * 3}]
    full = encode_conversation(tokenizer, messages)
    cut = encode_conversation(tokenizer, messages, max_length=len(full["input_ids"]) - 3)
    assert cut["truncated"] and cut["length"] == len(full["input_ids"])
    end = tokenizer.convert_tokens_to_ids("<|user|>" if family == "glm4" else "</s>")
    assert full["labels"][-1] == end and end not in cut["labels"]
    assert cut["labels"] == full["labels"][: len(cut["labels"])]


def test_the_report_names_the_first_truncated_rows(glm4_tokenizer, capsys):
    from glm_sft.tokenization import tokenize_dataset

    long = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "一二三四五六七八九十" * 3}]
    short = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "好"}]
    rows = [{"messages": short, "source": "d.jsonl:1"}]
    rows += [{"messages": long, "source": f"d.jsonl:{line}"} for line in range(2, 7)]
    length = len(encode_conversation(glm4_tokenizer, long)["input_ids"])
    tokenize_dataset(rows, glm4_tokenizer, name="train", max_length=12)
    report = capsys.readouterr().err
    assert (
        f"train: 6 rows used, 5 truncated to max_length=12 (d.jsonl:2 ({length} tokens), d.jsonl:3 ({length} "
        f"tokens), d.jsonl:4 ({length} tokens) and 2 more)"
    ) in report
