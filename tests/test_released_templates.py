"""Our training-ready templates against the released ones (glm_sft/templates/released/): the same text, rendered the
transformers way, for every probe and a few more conversations; and generation spans over exactly what the model
writes after each <|assistant|> and the token that ends the turn."""

import hashlib
import json
from pathlib import Path

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from glm_sft.template import NATIVE_TOOL_FAMILIES, family_template, native_messages

TEMPLATES = Path(__file__).resolve().parent.parent / "glm_sft" / "templates"
FAMILIES = ("glm4_0414", "glm45", "glm46", "glm47", "glmz1", "glm5", "glm51", "glm52")
HYBRID_THINKING = ("glm45", "glm46", "glm47", "glm5", "glm51", "glm52")
# The formats with no newline after role tokens, whose generation prompt writes the turn's opening <think> (or,
# thinking off, </think> / GLM-5.2's <think></think>).
COMPACT = ("glm47", "glm5", "glm51", "glm52")
PROBES = json.loads((TEMPLATES / "probes.json").read_text(encoding="utf-8"))
# The bytes of each stored released text, so that an edit to the data shows (SOURCES.md says where each came from).
RELEASED_SHA256 = {
    "glm4_0414": "db700f25fa300e53634c6fc78dee86b7fbd6d27e624edb855b18a4078c83a822",
    "glm45": "44f815868bf02fa458dd2f741a338046f4bf45f398eb6d067766726b9d96cce3",
    "glm46": "46786fd637de2728b41928ac3b6983e2d8a04706e51778de031fa933eb6f566f",
    "glm47": "d63ad536c3c81880043e22ec7fd08db42b4d8fb7c89c7138bc562bfa25281375",
    "glmz1": "adee3accece2e4a347280cb16580b3575d6164f2a0f4ac58a1a8392a346eb241",
    "glm5": "d63ad536c3c81880043e22ec7fd08db42b4d8fb7c89c7138bc562bfa25281375",  # GLM-4.7-Flash's bytes
    "glm51": "03b1bbff20331e54647c68167e8ac7f0b5b7ceb40ead372f44826624a9ad79cd",
    "glm52": "172dc74a35e1752df75ecfb2b2cf9326d2852bb1379868ebeec9571654489679",
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
# Conversations of our own beyond the probes: shapes the probes do not have.
EXTRA_CONVERSATIONS = [
    {
        "name": "assistant_after_assistant",
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "reasoning_content": "first", "content": "one"},
            {"role": "assistant", "content": "<think>second</think>two"},
        ],
    },
    {
        "name": "system_in_the_middle_and_text_parts",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "two"}]},
            {"role": "assistant", "content": "  padded answer \n"},
            {"role": "system", "content": "Now answer in French."},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "encore"},
        ],
        # GLM-Z1's released text splits the content: a string only; GLM-4-0414's writes a list as Python text
        "families": ["glm45", "glm46", "glm47", "glm5", "glm51", "glm52"],
    },
    {
        "name": "tool_results_as_a_list",
        "tools": [WEATHER_TOOL],
        "messages": [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {}}}],
            },
            {"role": "tool", "content": [{"output": "sunny"}, "windy"]},
            {"role": "assistant", "content": "Sunny and windy."},
        ],
        # GLM-5.2 reads a list starting with an {"output"} item as {"output"} items only: a bare string fails
        "families": ["glm45", "glm46", "glm47", "glm5", "glm51"],
    },
    {
        "name": "conversation_ending_on_a_tool_result",
        "tools": [WEATHER_TOOL],
        "messages": [
            {"role": "user", "content": "weather in Rome?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Rome"}}}],
            },
            {"role": "tool", "content": "sunny"},
        ],
    },
]
CONVERSATIONS = PROBES + EXTRA_CONVERSATIONS


def template(family: str) -> str:
    return family_template(family)


def released(family: str) -> str:
    return (TEMPLATES / "released" / f"{family}.jinja").read_text(encoding="utf-8")


def render(chat_template, conversation, family=None, **kwargs):
    """The text and the generation spans as strings, rendered as apply_chat_template renders (keys set to None left
    out, as encode_chat leaves them out; tool rows in GLM-4-0414's / GLM-Z1's native form for those families, as
    encode_chat gives them)."""
    messages = [{key: value for key, value in message.items() if value is not None} for message in conversation]
    messages = native_messages(messages, family)
    rendered, spans = render_jinja_template(
        conversations=[messages], chat_template=chat_template, return_assistant_tokens_mask=True, **kwargs
    )
    text = rendered[0]
    return text, [text[start:end] for start, end in spans[0]]


def applies(conversation, family):
    return family in conversation.get("families", FAMILIES)


def settings(family):
    """(add_generation_prompt, template keyword arguments) combinations to compare under."""
    thinking = [{}]
    if family in HYBRID_THINKING:
        thinking += [{"enable_thinking": True}, {"enable_thinking": False}]
    return [(prompt, extra) for prompt in (False, True) for extra in thinking]


@pytest.mark.parametrize("family", FAMILIES)
def test_released_text_is_the_stored_data(family):
    data = (TEMPLATES / "released" / f"{family}.jinja").read_bytes()
    assert hashlib.sha256(data).hexdigest() == RELEASED_SHA256[family]


def test_every_probe_is_well_formed():
    names = [probe["name"] for probe in PROBES]
    assert len(names) == len(set(names))
    for probe in PROBES:
        assert set(probe) <= {"name", "messages", "tools", "template_kwargs", "families"}, probe["name"]
        assert set(probe.get("families", FAMILIES)) <= set(FAMILIES), probe["name"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=lambda conversation: conversation["name"])
def test_our_text_equals_the_released_text(family, conversation):
    for prompt, extra in settings(family):
        kwargs = {
            "tools": conversation.get("tools"),
            "add_generation_prompt": prompt,
            **conversation.get("template_kwargs", {}),
            **extra,
        }
        if not applies(conversation, family):
            # Left out where the released text refuses it, or where it tests nothing (a switch or a key the family
            # does not read): wherever the released text renders it, ours must still give the same text.
            try:
                expected, _ = render(released(family), conversation["messages"], family, **kwargs)
            except Exception:  # whatever jinja raises
                continue
        else:
            expected, _ = render(released(family), conversation["messages"], family, **kwargs)
        ours, _ = render(template(family), conversation["messages"], family, close_final_turn=False, **kwargs)
        assert ours == expected, (prompt, extra)
        if not prompt:  # without close_final_turn at all, as a tokenizer's apply_chat_template renders it
            assert render(template(family), conversation["messages"], family, **kwargs)[0] == expected


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=lambda conversation: conversation["name"])
def test_closing_the_final_turn_only_appends_its_end_token(family, conversation):
    if not applies(conversation, family):
        return
    tools, kwargs = conversation.get("tools"), conversation.get("template_kwargs", {})
    expected, _ = render(released(family), conversation["messages"], family, tools=tools, **kwargs)
    closed, spans = render(
        template(family), conversation["messages"], family, tools=tools, close_final_turn=True, **kwargs
    )
    messages = conversation["messages"]
    native = family in NATIVE_TOOL_FAMILIES
    if native:  # their templates render these roles only, and calls as metadata turns
        messages = native_messages(messages, family)
        messages = [message for message in messages if message["role"] in ("user", "assistant", "observation")]
    last = messages[-1]
    if last["role"] != "assistant":
        assert closed == expected
        return
    called = bool(last.get("metadata") if native else last.get("tool_calls"))
    end = "<|observation|>" if called else "<|user|>"
    if family == "glmz1" and not called:
        # GLM-Z1 trains a final reply (its reasoning, if any, and its answer) as the model writes it after its prompt
        # <|assistant|>\n<think>, though its released text drops reasoning: only the final turn differs, and only
        # when training.
        reply = "\n" + last["content"].split("</think>")[-1].strip()
        assert expected.endswith(reply)
        written = f"{(last.get('reasoning_content') or '').strip()}</think>{reply}{end}"
        assert closed == expected[: -len(reply)] + "\n<think>" + written
        assert spans[-1] == written
    else:
        assert closed == expected + end
    assert spans[-1].endswith(end) and closed.endswith(spans[-1])
    # with a generation prompt nothing is closed: the released text comes out
    prompted, _ = render(
        released(family), conversation["messages"], family, tools=tools, add_generation_prompt=True, **kwargs
    )
    ours, _ = render(
        template(family),
        conversation["messages"],
        family,
        tools=tools,
        add_generation_prompt=True,
        close_final_turn=True,
        **kwargs,
    )
    assert ours == prompted


# Generation spans, written out by hand.
def weather_call(arguments):
    return {"type": "function", "function": {"name": "get_weather", "arguments": arguments}}


TOOL_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "reasoning_content": "Need the tool.",
        "content": "",
        "tool_calls": [weather_call({"city": "Paris", "days": 2}), weather_call({})],
    },
    {"role": "tool", "content": "sunny"},
    {"role": "tool", "content": "no data"},
    {"role": "assistant", "reasoning_content": "Got it.", "content": "Sunny."},
]
TWO_ROUNDS = [
    {"role": "user", "content": "Q1"},
    {"role": "assistant", "reasoning_content": "R1", "content": "A1"},
    {"role": "user", "content": "Q2"},
    {"role": "assistant", "content": "<think>\nR2\n</think>\n\nA2"},
]
EXPECTED_SPANS = {
    ("glm45", "tool_turns"): [
        "\n<think>Need the tool.</think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
        "<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>\n<tool_call>get_weather\n</tool_call>"
        "<|observation|>",
        "\n<think>Got it.</think>\nSunny.<|user|>",
    ],
    ("glm45", "two_rounds"): ["\n<think></think>\nA1<|user|>", "\n<think>R2</think>\nA2<|user|>"],
    ("glm46", "tool_turns"): [
        "\n<think>Need the tool.</think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
        "<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>\n<tool_call>get_weather\n</tool_call>"
        "<|observation|>",
        "\n<think>Got it.</think>\nSunny.<|user|>",
    ],
    ("glm46", "two_rounds"): ["\n<think></think>\nA1<|user|>", "\n<think>R2</think>\nA2<|user|>"],
    # GLM-4.7's generation prompt writes the <think> (or </think>) that opens a turn: not trained.
    ("glm47", "tool_turns"): [
        "Need the tool.</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
        "<arg_key>days</arg_key><arg_value>2</arg_value></tool_call><tool_call>get_weather</tool_call><|observation|>",
        "Got it.</think>Sunny.<|user|>",
    ],
    ("glm47", "two_rounds"): ["A1<|user|>", "R2</think>A2<|user|>"],
    # GLM-4-0414 and GLM-Z1: each call a turn of its own, ended by the <|observation|> of its result; GLM-Z1 trains
    # the final reply's reasoning after the <|assistant|>\n<think> of its generation prompt, and no call's.
    ("glm4_0414", "tool_turns"): [
        'get_weather\n{"city": "Paris", "days": 2}<|observation|>',
        "get_weather\n{}<|observation|>",
        "\nSunny.<|user|>",
    ],
    ("glmz1", "tool_turns"): [
        'get_weather\n{"city": "Paris", "days": 2}<|observation|>',
        "get_weather\n{}<|observation|>",
        "Got it.</think>\nSunny.<|user|>",
    ],
    # GLM-5 is GLM-4.7's text. GLM-5.1 writes empty reasoning after the last user message as <think></think>: the
    # model's part of it is the </think>.
    ("glm5", "tool_turns"): [
        "Need the tool.</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
        "<arg_key>days</arg_key><arg_value>2</arg_value></tool_call><tool_call>get_weather</tool_call><|observation|>",
        "Got it.</think>Sunny.<|user|>",
    ],
    ("glm5", "two_rounds"): ["A1<|user|>", "R2</think>A2<|user|>"],
    ("glm51", "tool_turns"): [
        "Need the tool.</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
        "<arg_key>days</arg_key><arg_value>2</arg_value></tool_call><tool_call>get_weather</tool_call><|observation|>",
        "Got it.</think>Sunny.<|user|>",
    ],
    ("glm51", "two_rounds"): ["A1<|user|>", "\nR2\n</think>A2<|user|>"],
    # GLM-5.2: an earlier turn is <think></think>{content}; the generation prompt writes only its <think>.
    ("glm52", "tool_turns"): [
        "Need the tool.</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
        "<arg_key>days</arg_key><arg_value>2</arg_value></tool_call><tool_call>get_weather</tool_call><|observation|>",
        "Got it.</think>Sunny.<|user|>",
    ],
    ("glm52", "two_rounds"): ["</think>A1<|user|>", "\nR2\n</think>A2<|user|>"],
}
SPAN_CONVERSATIONS = {"tool_turns": TOOL_TURNS, "two_rounds": TWO_ROUNDS}


@pytest.mark.parametrize(("family", "name"), sorted(EXPECTED_SPANS))
def test_generation_spans_are_what_the_model_writes_and_its_end_token(family, name):
    text, spans = render(template(family), SPAN_CONVERSATIONS[name], family, close_final_turn=True)
    assert spans == EXPECTED_SPANS[family, name]
    # each span starts right after an <|assistant|> token (GLM-4.7: after the <think> / </think> its generation
    # prompt writes; GLM-Z1's final reply: after its \n<think>), and every <|assistant|> is followed by one
    assert text.count("<|assistant|>") == len(spans)
    prompt_part = ("<think>", "</think>") if family in COMPACT else {"glmz1": ("", "\n<think>")}.get(family, ("",))
    for piece in text.split("<|assistant|>")[1:]:
        assert any(piece.startswith(opening + span) for span in spans for opening in prompt_part)


def test_glm45_spans_of_the_full_text_by_position():
    text, spans = render(template("glm45"), TWO_ROUNDS, close_final_turn=True)
    assert text == (
        "[gMASK]<sop><|user|>\nQ1<|assistant|>\n<think></think>\nA1<|user|>\nQ2<|assistant|>\n<think>R2</think>\nA2"
        "<|user|>"
    )
    assert "".join(spans) == "\n<think></think>\nA1<|user|>\n<think>R2</think>\nA2<|user|>"


def test_glm47_thinking_kept_everywhere_with_clear_thinking_false():
    _, spans = render(template("glm47"), TWO_ROUNDS, close_final_turn=True, clear_thinking=False)
    assert spans == ["R1</think>A1<|user|>", "R2</think>A2<|user|>"]


@pytest.mark.parametrize("family", HYBRID_THINKING)
def test_enable_thinking_false_marks_users_and_the_prompt(family):
    text, _ = render(template(family), TWO_ROUNDS[:3], add_generation_prompt=True, enable_thinking=False)
    if family == "glm52":
        assert text.endswith("<|user|>Q2<|assistant|><think></think>") and "/nothink" not in text
    elif family in COMPACT:
        assert text.endswith("<|user|>Q2<|assistant|></think>") and "/nothink" not in text
    else:
        assert text.endswith("<|user|>\nQ2/nothink<|assistant|>\n<think></think>")
        assert text.count("/nothink") == 2


def test_glmz1_spans_drop_reasoning_and_end_with_the_next_role_token():
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Rome"}'},
        {"role": "observation", "content": '{"sky": "sunny"}'},
        {"role": "assistant", "content": "<think>It is sunny.</think>\nSunny in Rome."},
        {"role": "tool", "content": "never rendered"},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]
    text, spans = render(template("glmz1"), conversation, close_final_turn=True)
    assert spans == [
        'get_weather\n{"city": "Rome"}<|observation|>',
        "\nSunny in Rome.<|user|>",
        "</think>\nYou're welcome.<|user|>",  # the final reply, after the prompt's \n<think>
    ]
    assert text == (
        "[gMASK]<sop><|system|>\nBe brief.<|user|>\nWeather in Rome?<|assistant|>get_weather\n"
        '{"city": "Rome"}<|observation|>\n{"sky": "sunny"}<|assistant|>\nSunny in Rome.<|user|>\nThanks'
        "<|assistant|>\n<think></think>\nYou're welcome.<|user|>"
    )
    prompt, spans = render(template("glmz1"), conversation[:-1], add_generation_prompt=True, close_final_turn=True)
    assert prompt.endswith("<|user|>\nThanks<|assistant|>\n<think>") and spans[-1] == "\nSunny in Rome.<|user|>"


@pytest.mark.parametrize("family", FAMILIES)
def test_an_assistant_message_with_loss_false_renders_the_same_text_untrained(family):
    conversation = [dict(message) for message in TWO_ROUNDS]
    conversation[1]["loss"] = False
    text, spans = render(template(family), conversation, close_final_turn=True)
    assert text == render(template(family), TWO_ROUNDS, close_final_turn=True)[0]
    assert len(spans) == 1 and spans[0].endswith("A2<|user|>")


@pytest.mark.parametrize("family", FAMILIES)
def test_each_template_says_where_its_released_text_is(family):
    header = template(family).split("-#}")[0]
    assert header.startswith("{#-") and f"released/{family}.jinja" in header
