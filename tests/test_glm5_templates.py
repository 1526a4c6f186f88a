"""GLM-5, 5.1 and 5.2 (model type glm_moe_dsa): our templates against the released texts (released/glm5.jinja,
glm51.jinja, glm52.jinja) rendered the transformers way and token by token, under every template switch; the labels
(exactly what the model writes after the generation prompt, and the token that ends its turn, also after the
reasoning split); what each version keeps of earlier reasoning; detection from a shipped template. Tokenizer only:
no model is built."""

import copy
import itertools
import json

import pytest
from conftest import REPO, glm_moe_dsa_tokenizer_dir
from transformers.utils.chat_template_utils import render_jinja_template

from glm_sft import UserError
from glm_sft.loading import load_tokenizer
from glm_sft.reasoning import reasoning_samples
from glm_sft.template import (
    IGNORE_INDEX,
    MODEL_TYPE_FAMILIES,
    REASONING_KEPT,
    SPECIAL_TOKENS,
    attach_template,
    family_template,
    output_items,
    probe_conversations,
    template_difference,
)
from glm_sft.tokenization import encode_chat, encode_conversation

FAMILIES = MODEL_TYPE_FAMILIES["glm_moe_dsa"]
RELEASED = REPO / "glm_sft" / "templates" / "released"


def released(family: str) -> str:
    return (RELEASED / f"{family}.jinja").read_text(encoding="utf-8")


def render(chat_template, messages, **kwargs):
    """The text and the generation spans (as strings and as positions), as apply_chat_template renders (keys set to
    None left out)."""
    messages = [{key: value for key, value in message.items() if value is not None} for message in messages]
    rendered, spans = render_jinja_template(
        conversations=[messages], chat_template=chat_template, return_assistant_tokens_mask=True, **kwargs
    )
    return rendered[0], sorted(spans[0])


def released_text(family, messages, **kwargs):
    return render(released(family), messages, **kwargs)[0]


def tool(name, description, **function_keys):
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}}
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": parameters, **function_keys},
    }


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


WEATHER, TIME = tool("get_weather", "Current weather"), tool("get_time", "Local time")
# Conversations of our own beyond the probes: long agent sessions, reasoning spread over user turns.
CONVERSATIONS = [
    {
        "name": "agent_session_over_four_user_turns",
        "tools": [WEATHER, TIME],
        "messages": [
            {"role": "system", "content": "Use the tools."},
            {"role": "user", "content": "Weather and time in Oslo?"},
            {
                "role": "assistant",
                "reasoning_content": "Two lookups.",
                "content": "Looking both up.",
                "tool_calls": [call("get_weather", city="Oslo"), call("get_time", city="Oslo")],
            },
            {"role": "tool", "content": "rain, 9 C"},
            {"role": "tool", "content": "14:05"},
            {"role": "assistant", "content": "Rain, 9 C; 14:05."},
            {"role": "user", "content": "Thanks."},
            {"role": "assistant", "content": "Glad to help."},
            {"role": "user", "content": "And Bergen?"},
            {"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="Bergen")]},
            {"role": "tool", "content": "rain, 8 C"},
            {"role": "assistant", "reasoning_content": " Same as Oslo, nearly.\n", "content": "Rain too, 8 C."},
            {"role": "user", "content": "Time there?"},
            {"role": "assistant", "reasoning_content": "Same zone as Oslo.", "content": "14:06."},
        ],
    },
    {
        "name": "reasoning_in_some_user_turns",
        "messages": [
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "reasoning_content": "\n R1 \n", "content": "A1"},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2"},
            {"role": "user", "content": "Q3"},
            {"role": "assistant", "reasoning_content": "R3a", "content": "A3a"},
            {"role": "assistant", "content": "A3b"},
            {"role": "user", "content": "Q4"},
            {"role": "assistant", "reasoning_content": "", "content": "A4"},
        ],
    },
    {
        "name": "conversation_ending_on_tool_results",
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": "Weather in Rome and Milan?"},
            {
                "role": "assistant",
                "reasoning_content": "Two cities.",
                "content": "",
                "tool_calls": [call("get_weather", city="Rome"), call("get_weather", city="Milan")],
            },
            {"role": "tool", "content": "sunny"},
            {"role": "tool", "content": "fog"},
        ],
    },
]


def conversations_of(family):
    probes = [probe for probe in probe_conversations() if family in probe.get("families", FAMILIES)]
    return probes + CONVERSATIONS


def switch_settings(family):
    """Every combination of the template switches the family reads."""
    thinking = [{}, {"enable_thinking": True}, {"enable_thinking": False}]
    clearing = [{}, {"clear_thinking": False}, {"clear_thinking": True}]
    effort = [{}, {"reasoning_effort": "high"}, {"reasoning_effort": "low"}] if family == "glm52" else [{}]
    return [a | b | c for a, b, c in itertools.product(thinking, clearing, effort)]


def cuts(messages):
    """(messages, add_generation_prompt): the whole conversation, and every prefix that ends before an assistant
    message with the generation prompt."""
    prompts = [
        (messages[:index], True)
        for index in range(1, len(messages))
        if messages[index]["role"] == "assistant" and messages[index - 1]["role"] != "assistant"
    ]
    return [(messages, False), *prompts]


def has_control_spellings(conversation) -> bool:
    """Whether the conversation's strings hold a special token's spelling (`<think>` inline, `/nothink`): training
    encodes those as text (glm_sft/data/checks.py moves inline reasoning into reasoning_content before)."""
    return any(spelling in json.dumps(conversation, ensure_ascii=False) for spelling in SPECIAL_TOKENS["glm5"])


@pytest.fixture(scope="module")
def tokenizers():
    """A tiny GLM-4.5-style tokenizer (GLM-5's special tokens are GLM-4.5's) carrying each family's template."""
    base, _ = load_tokenizer("builtin:tiny-glm47-flash")
    result = {}
    for family in FAMILIES:
        tokenizer = copy.deepcopy(base)
        attach_template(tokenizer, family)
        result[family] = tokenizer
    return result


def test_the_released_texts_and_glm5s_template():
    assert released("glm5").encode() == released("glm47").encode()  # GLM-5 ships GLM-4.7-Flash's bytes
    assert family_template("glm5") == family_template("glm47")
    assert released("glm51") != released("glm5") and released("glm52") != released("glm51")
    for family in ("glm51", "glm52"):
        assert f"released/{family}.jinja" in family_template(family).split("-#}")[0]
        assert "{%- generation -%}" in family_template(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_our_text_and_tokens_equal_the_released_ones_under_every_switch(family, tokenizers):
    tokenizer = tokenizers[family]
    compared = 0
    for conversation in conversations_of(family):
        tools = conversation.get("tools")
        # GLM-5.1's text writes a result given as {"output"} items as nothing: training gives it the JSON text (as
        # any non-text result), tests/test_native_tools.py checks that
        output_lists = any(output_items(message.get("content")) for message in conversation["messages"])
        token_check = not has_control_spellings(conversation) and not (output_lists and family == "glm51")
        for settings in switch_settings(family):
            switches = conversation.get("template_kwargs", {}) | settings
            for messages, prompt in cuts(conversation["messages"]):
                expected = released_text(family, messages, tools=tools, add_generation_prompt=prompt, **switches)
                ours, _ = render(
                    family_template(family),
                    messages,
                    tools=tools,
                    add_generation_prompt=prompt,
                    close_final_turn=False,
                    **switches,
                )
                where = (conversation["name"], len(messages), prompt, switches)
                assert ours == expected, where
                if token_check:  # what training encodes (piece by piece) is the tokenizer's encoding of that text
                    ids, _ = encode_chat(
                        tokenizer,
                        messages,
                        tools=tools,
                        add_generation_prompt=prompt,
                        close_final_turn=False,
                        template_kwargs=switches,
                    )
                    assert ids == tokenizer(expected, add_special_tokens=False)["input_ids"], where
                compared += 1
    assert compared > 300


def trained_runs(tokenizer, messages, **kwargs):
    """The decoded runs of trained tokens of a row, checking on the way that the row's ids are the tokenizer's ids of
    its text and that each trained label is its token."""
    encoded = encode_conversation(tokenizer, messages, **kwargs)
    runs, current = [], []
    for token, label in zip(encoded["input_ids"], encoded["labels"], strict=True):
        assert label in (IGNORE_INDEX, token)
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs, current = [*runs, current], []
    runs += [current] if current else []
    return [tokenizer.decode(run) for run in runs]


TOOL_ROUND = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "reasoning_content": "Need the tool.",
        "content": "",
        "tool_calls": [call("get_weather", city="Paris", days=2), call("get_weather")],
    },
    {"role": "tool", "content": "sunny"},
    {"role": "tool", "content": "no data"},
    {"role": "assistant", "content": "Sunny."},
]
CALLS = (
    "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value><arg_key>days</arg_key>"
    "<arg_value>2</arg_value></tool_call><tool_call>get_weather</tool_call><|observation|>"
)
THREE_ROUNDS = [
    {"role": "user", "content": "Q1"},
    {"role": "assistant", "reasoning_content": "\n R1 \n", "content": "A1"},
    {"role": "user", "content": "Q2"},
    {"role": "assistant", "content": "A2"},
    {"role": "user", "content": "Q3"},
    {"role": "assistant", "reasoning_content": "R3", "content": "A3"},
]
# The trained text of each row, written out by hand: per family, per switches.
EXPECTED_RUNS = {
    # The reply after the calls has no reasoning: GLM-5 (GLM-4.7's text) writes a bare </think>, which is the
    # generation prompt with thinking off; GLM-5.1 and 5.2 write <think></think>, whose </think> is the model's with
    # thinking on.
    ("glm5", "tool_round", ()): ["Need the tool.</think>" + CALLS, "Sunny.<|user|>"],
    ("glm51", "tool_round", ()): ["Need the tool.</think>" + CALLS, "</think>Sunny.<|user|>"],
    ("glm52", "tool_round", ()): ["Need the tool.</think>" + CALLS, "</think>Sunny.<|user|>"],
    # Thinking off: the generation prompt writes </think> (GLM-5.1) or <think></think> (GLM-5.2): nothing left to train
    # before the answer.
    ("glm5", "tool_round", ("enable_thinking", False)): ["Need the tool.</think>" + CALLS, "Sunny.<|user|>"],
    ("glm51", "tool_round", ("enable_thinking", False)): ["Need the tool.</think>" + CALLS, "Sunny.<|user|>"],
    ("glm52", "tool_round", ("enable_thinking", False)): ["Need the tool.</think>" + CALLS, "Sunny.<|user|>"],
    # Earlier reasoning dropped (one row, not split here): GLM-5 and 5.1 write a bare </think> before earlier answers,
    # GLM-5.2 <think></think>.
    ("glm5", "three_rounds", ()): ["A1<|user|>", "A2<|user|>", "R3</think>A3<|user|>"],
    ("glm51", "three_rounds", ()): ["A1<|user|>", "A2<|user|>", "R3</think>A3<|user|>"],
    ("glm52", "three_rounds", ()): ["</think>A1<|user|>", "</think>A2<|user|>", "R3</think>A3<|user|>"],
    # clear_thinking=false keeps it: GLM-5 stripped, GLM-5.1 and 5.2 as given.
    ("glm5", "three_rounds", ("clear_thinking", False)): [
        "R1</think>A1<|user|>",
        "A2<|user|>",
        "R3</think>A3<|user|>",
    ],
    ("glm51", "three_rounds", ("clear_thinking", False)): [
        "\n R1 \n</think>A1<|user|>",
        "A2<|user|>",
        "R3</think>A3<|user|>",
    ],
    ("glm52", "three_rounds", ("clear_thinking", False)): [
        "\n R1 \n</think>A1<|user|>",
        "</think>A2<|user|>",
        "R3</think>A3<|user|>",
    ],
}
ROWS = {"tool_round": TOOL_ROUND, "three_rounds": THREE_ROUNDS}


@pytest.mark.parametrize(("family", "row", "switch"), sorted(EXPECTED_RUNS), ids=str)
def test_labels_are_the_generated_spans_and_their_end_tokens(family, row, switch, tokenizers):
    switches = dict([switch]) if switch else {}
    tools = [WEATHER] if row == "tool_round" else None
    runs = trained_runs(tokenizers[family], ROWS[row], tools=tools, template_kwargs=switches)
    assert runs == EXPECTED_RUNS[family, row, switch]
    text, spans = render(family_template(family), ROWS[row], tools=tools, close_final_turn=True, **switches)
    assert runs == [text[start:end] for start, end in spans]


@pytest.mark.parametrize("family", FAMILIES)
def test_glm52_reasoning_effort_and_the_thinking_off_prompt(family, tokenizers):
    tokenizer = tokenizers[family]
    question = [{"role": "user", "content": "Q"}]

    def prompt(**switches):
        ids, mask = encode_chat(tokenizer, question, add_generation_prompt=True, template_kwargs=switches)
        assert not any(mask)
        return tokenizer.decode(ids)

    off = "</think>" if family != "glm52" else "<think></think>"
    if family == "glm52":
        assert prompt() == "[gMASK]<sop><|system|>Reasoning Effort: Max<|user|>Q<|assistant|><think>"
        assert prompt(reasoning_effort="high").startswith("[gMASK]<sop><|system|>Reasoning Effort: High<|user|>")
        assert prompt(reasoning_effort="medium") == prompt()  # any other value is Max
        assert prompt(enable_thinking=False, reasoning_effort="high") == f"[gMASK]<sop><|user|>Q<|assistant|>{off}"
    else:
        assert prompt() == prompt(reasoning_effort="high") == "[gMASK]<sop><|user|>Q<|assistant|><think>"
        assert prompt(enable_thinking=False) == f"[gMASK]<sop><|user|>Q<|assistant|>{off}"


def generated_after_the_prompt(family, sample, index, switches, tools):
    """What the model writes for message `index` of `sample` with that history: for the switches given, or with
    thinking off (whose generation prompt writes the </think> of a turn without reasoning), the text the released
    template adds after its generation prompt when that reply is the last message; with the prompt."""
    found = []
    for setting in (switches, switches | {"enable_thinking": False}, switches | {"enable_thinking": True}):
        prompt = released_text(family, sample[:index], tools=tools, add_generation_prompt=True, **setting)
        reply = released_text(family, sample[: index + 1], tools=tools, **setting)
        if reply.startswith(prompt):
            found.append((prompt, reply[len(prompt) :]))
    return found


def end_token(messages, index):
    if index + 1 < len(messages):
        role = messages[index + 1]["role"]
        return "<|observation|>" if role == "tool" else f"<|{role}|>"
    return "<|observation|>" if messages[index].get("tool_calls") else "<|user|>"


@pytest.mark.parametrize("family", FAMILIES)
def test_every_trained_token_is_what_the_model_writes_with_that_history(family):
    """After the reasoning split, each trained span is exactly the text the released template adds after its
    generation prompt for that history (the span starts where that prompt ends) and the token that ends the turn."""
    checked = 0
    multi_round = [
        conversation
        for conversation in conversations_of(family)
        if len(conversation["messages"]) > 3
        and not has_control_spellings(conversation)
        and {message["role"] for message in conversation["messages"]} <= {"system", "user", "assistant", "tool"}
    ]
    for conversation in multi_round:
        tools = conversation.get("tools")
        for switches in ({}, {"enable_thinking": False}, {"clear_thinking": False}, {"reasoning_effort": "high"}):
            switches = conversation.get("template_kwargs", {}) | switches
            messages = conversation["messages"]
            if switches.get("enable_thinking") is False:  # with thinking off the replies come without reasoning
                messages = [{k: v for k, v in message.items() if k != "reasoning_content"} for message in messages]
            for sample in reasoning_samples([{"messages": messages}], family):
                sample = sample["messages"]
                text, spans = render(family_template(family), sample, tools=tools, close_final_turn=True, **switches)
                trained = [
                    index
                    for index, message in enumerate(sample)
                    if message["role"] == "assistant" and message.get("loss") is not False
                ]
                assert len(spans) == len(trained), conversation["name"]
                for index, (start, end) in zip(trained, spans, strict=True):
                    where = (conversation["name"], index, switches)
                    candidates = generated_after_the_prompt(family, sample, index, switches, tools)
                    assert any(
                        text[:start] == prompt and text[start:end] == written + end_token(sample, index)
                        for prompt, written in candidates
                    ), where
                    checked += 1
    assert checked > 50


def test_the_split_keeps_reasoning_as_each_version_does():
    """GLM-5, 5.1 and 5.2 all drop the reasoning of turns before the last user message by default (GLM-5.1's
    per-user-turn choice only matters with clear_thinking=false), so their rows split as GLM-4.7's do."""
    assert {REASONING_KEPT[family] for family in FAMILIES} == {REASONING_KEPT["glm47"]} == {"after last user"}
    row = {"messages": THREE_ROUNDS, "source": "r.jsonl:1"}
    first, full = reasoning_samples([row], "glm51")
    assert first["messages"] == THREE_ROUNDS[:2]
    assert [message.get("loss") for message in full["messages"]] == [None, False, None, None, None, None]
    for family in FAMILIES:
        assert reasoning_samples([row], family) == [first, full]
    # In one rendering each drops the earlier reasoning, whether or not that user turn had reasoning.
    kept = {"glm5": "</think>A1", "glm51": "</think>A1", "glm52": "<think></think>A1"}
    for family, earlier in kept.items():
        text = released_text(family, THREE_ROUNDS)
        assert "R1" not in text and f"Q1<|assistant|>{earlier}<|user|>Q2" in text


def test_glm51_decides_empty_thinking_per_user_turn_with_clear_thinking_false():
    """GLM-5.1's thinking_indices: with clear_thinking=false, an earlier reply without reasoning shows <think></think>
    when another reply to the same user message has reasoning_content, else </think>; GLM-5.2 always <think></think>;
    GLM-5 always </think>."""
    messages = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "reasoning_content": "R1", "content": "A1a"},
        {"role": "assistant", "content": "A1b"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"},
        {"role": "user", "content": "Q3"},
        {"role": "assistant", "content": "A3"},
    ]
    turns = {
        "glm5": "<|assistant|></think>A1b<|user|>Q2<|assistant|></think>A2<|user|>Q3<|assistant|></think>A3",
        "glm51": "<|assistant|><think></think>A1b<|user|>Q2<|assistant|></think>A2<|user|>Q3<|assistant|>"
        "<think></think>A3",
        "glm52": "<|assistant|><think></think>A1b<|user|>Q2<|assistant|><think></think>A2<|user|>Q3<|assistant|>"
        "<think></think>A3",
    }
    for family, expected in turns.items():
        text = released_text(family, messages, clear_thinking=False)
        assert text.startswith("[gMASK]<sop>") and text.endswith(f"<think>R1</think>A1a{expected}"), family
        assert render(family_template(family), messages, clear_thinking=False)[0] == text
    # By default the same earlier turns all lose their reasoning, and A1b and A2 look alike for GLM-5.1.
    assert "<|assistant|></think>A1a<|assistant|></think>A1b<|user|>Q2<|assistant|></think>A2" in released_text(
        "glm51", messages
    )


DEFERRED = [
    tool("get_weather", "Current weather", strict=True),
    tool("search_docs", "Search the manual", defer_loading=True),
]


def test_glm51_and_glm52_write_tools_without_defer_loading_and_strict():
    messages = [{"role": "user", "content": "Hi"}]
    weather = WEATHER["function"]
    listed = json.dumps(weather, ensure_ascii=False)
    for family in ("glm51", "glm52"):
        text = released_text(family, messages, tools=DEFERRED)
        assert f"<tools>\n{listed}\n</tools>" in text and "search_docs" not in text and "strict" not in text
        assert render(family_template(family), messages, tools=DEFERRED)[0] == text
    # GLM-5 writes every tool whole, as GLM-4.7 does
    text = released_text("glm5", messages, tools=DEFERRED)
    assert '"strict": true' in text and '"defer_loading": true' in text
    assert render(family_template("glm5"), messages, tools=DEFERRED)[0] == text


def test_tool_results_given_as_output_items_and_tool_references():
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="Lyon")]},
        {"role": "tool", "content": [{"output": "cloudy"}, {"output": "12 C"}]},
        {"role": "assistant", "content": "Cloudy, 12 C."},
    ]
    results = {
        "glm5": "<|observation|><tool_response>cloudy</tool_response><tool_response>12 C</tool_response>",
        "glm51": "<|observation|><tool_response></tool_response>",  # joined as text: {output} items give nothing
        "glm52": "<|observation|><tool_response>cloudy</tool_response><tool_response>12 C</tool_response>",
    }
    for family, expected in results.items():
        text = released_text(family, messages, tools=[WEATHER])
        assert f"</tool_call>{expected}<|assistant|>" in text, family
        assert render(family_template(family), messages, tools=[WEATHER])[0] == text
    referenced = [*messages[:2], {"role": "tool", "content": [{"type": "tool_reference", "name": "search_docs"}]}]
    listed = json.dumps(
        {"name": "search_docs", "description": "Search the manual", "parameters": WEATHER["function"]["parameters"]}
    )
    for family in ("glm51", "glm52"):
        text = released_text(family, referenced, tools=DEFERRED)
        assert text.endswith(f"<|observation|><tool_response><tools>\n{listed}\n</tools></tool_response>")
        assert render(family_template(family), referenced, tools=DEFERRED)[0] == text


def test_glm52_turns_media_items_into_a_reminder():
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "See: "}, {"type": "image_url", "image_url": {}}]},
        {"role": "assistant", "content": "I cannot."},
    ]
    reminder = (
        "<reminder>You are unable to process this image because you don't have multi-modal input ability. "
        "Try different methods.</reminder>"
    )
    assert f"<|user|>See: {reminder}<|assistant|>" in released_text("glm52", messages)
    assert "<|user|>See: <|assistant|>" in released_text("glm51", messages)
    for family in FAMILIES:
        assert render(family_template(family), messages)[0] == released_text(family, messages)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_glm_moe_dsa_checkpoint_is_trained_in_the_family_of_the_text_it_ships(family, tmp_path):
    tokenizer, detected = load_tokenizer(str(glm_moe_dsa_tokenizer_dir(tmp_path / family, family)))
    assert detected == family
    assert tokenizer.chat_template == family_template(family) and tokenizer.shipped_chat_template == released(family)


def test_a_glm_moe_dsa_checkpoint_without_template_gets_glm5_and_an_edited_one_stops(tmp_path):
    bare = glm_moe_dsa_tokenizer_dir(tmp_path / "bare", "glm5")
    (bare / "chat_template.jinja").unlink()
    assert load_tokenizer(str(bare))[1] == "glm5"
    edited = glm_moe_dsa_tokenizer_dir(tmp_path / "edited", "glm51", lambda text: text + "{{- ' edited' -}}")
    with pytest.raises(UserError, match=r"none of the released formats; nearest is glm51: probe .* template: glm51"):
        load_tokenizer(str(edited))


@pytest.mark.parametrize(
    ("family", "old", "new", "probe"),
    [
        # a GLM-5.1 text that writes the `strict` key
        ("glm51", "k != 'defer_loading' and k != 'strict'", "k != 'defer_loading'", "tools_defer_loading_and_strict"),
        # a GLM-5.1 text without its per-user-turn choice
        ("glm51", "loop.index0 < ns.last_user_index and ns.has_thinking", "false", "reasoning_across_user_turns_kept"),
        # a GLM-5.2 text that ignores reasoning_effort
        ("glm52", "reasoning_effort == 'high'", "false", "reasoning_effort_high"),
        # a GLM-5.2 text that joins {output} items as text, as GLM-5.1 does
        ("glm52", "m.content.0.output is defined", "false", "tool_results_as_output_items"),
    ],
)
def test_the_probes_catch_each_version_specific_edit(family, old, new, probe):
    text = released(family)
    assert text.count(old) == 1
    difference = template_difference(text.replace(old, new), family)
    assert difference is not None and difference.startswith(f"probe {probe!r}")
