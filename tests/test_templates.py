"""The chat formats, character for character, and the training labels, token by token, for both families."""

import pytest

from glm_sft.template import IGNORE_INDEX, family_template
from glm_sft.tokenization import encode_conversation

CONVERSATION = [
    {"role": "system", "content": "你是一个乐于助人的助手。"},
    {"role": "user", "content": "你好"},
    {"role": "assistant", "content": "你好！有什么可以帮你？"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "2+2 equals 4."},
]

# What the formats look like, written out by hand.
EXPECTED_TEXT = {
    "glm4": "[gMASK]<sop><|system|>\n你是一个乐于助人的助手。<|user|>\n你好<|assistant|>\n你好！有什么可以帮你？"
    "<|user|>\nWhat is 2+2?<|assistant|>\n2+2 equals 4.",
    "chatglm3": "[gMASK]sop<|system|>\n你是一个乐于助人的助手。<|user|>\n你好<|assistant|>\n你好！有什么可以帮你？"
    "<|user|>\nWhat is 2+2?<|assistant|>\n2+2 equals 4.",
}
PREFIX = {"glm4": ["[gMASK]", "<sop>"], "chatglm3": ["[gMASK]", "sop"]}
FINAL_END_TOKEN = {"glm4": "<|user|>", "chatglm3": "</s>"}

# The template glm-4-9b-chat ships, reduced to its part for conversations without tools.
OFFICIAL_GLM4_TEMPLATE = (
    "[gMASK]<sop>{% for item in messages %}{% if item['content'] %}<|{{ item['role'] }}|>{{ item['metadata'] }}\n"
    "{{ item['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def render(tokenizer, messages, **kwargs):
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def test_multi_turn_with_system_renders_the_official_format(family_and_tokenizer):
    family, tokenizer = family_and_tokenizer
    assert render(tokenizer, CONVERSATION) == EXPECTED_TEXT[family]


def test_generation_prompt_is_the_bare_assistant_token(family_and_tokenizer):
    family, tokenizer = family_and_tokenizer
    prompt = render(tokenizer, CONVERSATION[:-1], add_generation_prompt=True)
    assert prompt == EXPECTED_TEXT[family][: -len("\n2+2 equals 4.")]
    assert prompt.endswith("What is 2+2?<|assistant|>")


def test_without_system_prompt(family_and_tokenizer):
    family, tokenizer = family_and_tokenizer
    text = render(tokenizer, CONVERSATION[1:3])
    assert text == "".join(PREFIX[family]) + "<|user|>\n你好<|assistant|>\n你好！有什么可以帮你？"


@pytest.mark.parametrize("cut", [2, 3, 4, 5])
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_glm4_text_equals_the_template_glm4_ships(glm4_tokenizer, cut, generation_prompt):
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = CONVERSATION[:cut]
    official = render_jinja_template(
        [messages], chat_template=OFFICIAL_GLM4_TEMPLATE, add_generation_prompt=generation_prompt
    )[0][0]
    assert render(glm4_tokenizer, messages, add_generation_prompt=generation_prompt) == official


def test_glm4_skips_messages_without_content_like_the_official_template(glm4_tokenizer):
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [{"role": "system", "content": ""}, *CONVERSATION[1:]]
    official = render_jinja_template([messages], chat_template=OFFICIAL_GLM4_TEMPLATE)[0][0]
    assert render(glm4_tokenizer, messages) == official
    assert "<|system|>" not in official


def expected_ids_and_labels(tokenizer, family, trained_turns):
    """Build the expected ids piece by piece: special tokens by id, text pieces encoded alone.

    Assistant turn k (0-based) is trained when k is in `trained_turns`: its "\\n{content}" and the token that ends it.
    """
    ids, labels = [], []

    def add_special(token, trained=False):
        token_id = tokenizer.convert_tokens_to_ids(token)
        ids.append(token_id)
        labels.append(token_id if trained else IGNORE_INDEX)

    def add_text(text, trained=False):
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids.extend(piece)
        labels.extend(piece if trained else [IGNORE_INDEX] * len(piece))

    for token in PREFIX[family]:
        add_special(token)
    assistant_turn = -1
    previous_trained = False
    for message in CONVERSATION:
        role_token = f"<|{message['role']}|>"
        add_special(role_token, trained=previous_trained)  # a role token that ends an assistant turn is trained
        trained = False
        if message["role"] == "assistant":
            assistant_turn += 1
            trained = assistant_turn in trained_turns
        add_text("\n" + message["content"], trained=trained)
        previous_trained = trained
    add_special(FINAL_END_TOKEN[family], trained=previous_trained)
    return ids, labels


@pytest.mark.parametrize("last_turn_only", [False, True])
def test_labels_are_exactly_the_assistant_continuations_and_end_tokens(family_and_tokenizer, last_turn_only):
    family, tokenizer = family_and_tokenizer
    encoded = encode_conversation(tokenizer, CONVERSATION, last_turn_only=last_turn_only)
    ids, labels = expected_ids_and_labels(tokenizer, family, trained_turns={1} if last_turn_only else {0, 1})
    assert encoded["input_ids"] == ids
    assert encoded["labels"] == labels
    trained_text = tokenizer.decode([t for t in encoded["labels"] if t != IGNORE_INDEX])
    end = FINAL_END_TOKEN[family]
    assert trained_text == ("" if last_turn_only else "\n你好！有什么可以帮你？<|user|>") + f"\n2+2 equals 4.{end}"


def test_the_first_trained_token_follows_the_assistant_token(family_and_tokenizer):
    family, tokenizer = family_and_tokenizer
    encoded = encode_conversation(tokenizer, CONVERSATION)
    assistant_id = tokenizer.convert_tokens_to_ids("<|assistant|>")
    for index, token_id in enumerate(encoded["input_ids"]):
        if token_id == assistant_id:
            assert encoded["labels"][index] == IGNORE_INDEX  # the prompt's <|assistant|> is given, not generated
            assert encoded["labels"][index + 1] == encoded["input_ids"][index + 1]


def test_truncation_keeps_the_start_and_reports_it(glm4_tokenizer):
    full = encode_conversation(glm4_tokenizer, CONVERSATION)
    cut = encode_conversation(glm4_tokenizer, CONVERSATION, max_length=12)
    assert cut["truncated"] and not full["truncated"]
    assert cut["input_ids"] == full["input_ids"][:12] and cut["labels"] == full["labels"][:12]


def test_each_family_has_its_own_template_file():
    assert family_template("glm4").count("{%- generation -%}") == 1
    assert "[gMASK]sop" in family_template("chatglm3") and "[gMASK]<sop>" in family_template("glm4")
