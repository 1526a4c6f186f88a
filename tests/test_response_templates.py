"""The response templates (glm_sft/templates/response/): transformers' own parser, `tokenizer.parse_response` (what
`transformers serve` and the pipelines call), reads every family's replies as glm_sft.replies.parse_reply does: whole,
from token ids, streamed, with and without the token that ends the turn; and every tokenizer we save carries the
family's template.

The replies are the exact text a model writes: for each assistant message of the probe conversations (and a few of
our own), what the family's template renders for it after the generation prompt, up to the first stop token."""

import json

import pytest
from transformers import AutoTokenizer
from transformers.utils.chat_template_utils import render_jinja_template

from glm_sft.loading import load_tokenizer
from glm_sft.replies import Reply, parse_reply
from glm_sft.responses import RESPONSE_DIR, response_template
from glm_sft.switches import family_switches
from glm_sft.template import (
    FAMILIES,
    STOP_TOKENS,
    THINKING_FAMILIES,
    family_messages,
    family_template,
    probe_conversations,
    save_tokenizer,
)

# The built-in model whose tokenizer stands in for each family (GLM-4.6 and GLM-5.1 have the tokens of 4.5 and 5).
BUILTIN = {
    "glm4": "tiny-glm4",
    "chatglm3": "tiny-chatglm3",
    "glm4_0414": "tiny-glm4-0414",
    "glmz1": "tiny-glmz1",
    "glm45": "tiny-glm45",
    "glm46": "tiny-glm45",
    "glm47": "tiny-glm47-flash",
    "glm5": "tiny-glm5",
    "glm51": "tiny-glm5",
    "glm52": "tiny-glm52",
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
    },
}


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


# Values ChatGLM3's template writes in a form its response template reads: non-ASCII, numbers, quotes and commas.
PLAIN_VALUES = {
    "城市": "上海",
    "scale": -0.5,
    "big": 1e20,
    "empty": "",
    "note": 'a,b "引号" = x',
    "padded": "  空格  ",
}
# Conversations of our own beyond the probes: reasoning, text and two calls in one reply, with PLAIN_VALUES.
EXTRA_CONVERSATIONS = [
    {
        "name": "plain_python_values",
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": "北京和上海三天的天气？"},
            {
                "role": "assistant",
                "reasoning_content": "先查北京。",
                "content": "我先查北京。",
                "tool_calls": [
                    call("get_weather", city="北京", days=3),
                    call("查询", **PLAIN_VALUES),
                ],
            },
        ],
    },
]
# Rendered assistant turns that are not replies of the family: parse_reply refuses them as calls of its own form.
NOT_REPLIES = {("chatglm3", "glm4_native_metadata_turns", 1): "a GLM-4 JSON call, which ChatGLM3 does not write"}


def render(family, messages, tools, switches, **flags):
    return render_jinja_template(
        [family_messages(messages, family)], tools=tools, chat_template=family_template(family), **switches, **flags
    )[0][0]


def generated(family, messages, index, tools, switches):
    """(prompt, what the model writes after it) for the assistant message at `index`, or (None, why not)."""
    reply = messages[index]
    attempts = [switches]
    if "enable_thinking" in family_switches(family) and "enable_thinking" not in switches:
        # GLM-4.7 and later render a reply without reasoning after `<|assistant|></think>`: thinking's off prompt
        attempts.append({**switches, "enable_thinking": False})
    for attempt in attempts:
        prompt = render(family, messages[:index], tools, attempt, add_generation_prompt=True)
        whole = render(family, messages[: index + 1], tools, attempt, close_final_turn=True)
        if whole.startswith(prompt):
            return prompt, whole[len(prompt) :]
        opening = "\n<think>"
        if family == "glmz1" and prompt.endswith(opening) and whole.startswith(prompt.removesuffix(opening)):
            # GLM-Z1's prompt always opens the thinking, while its template renders a call turn without it: the model
            # closes the thinking, then writes the turn after an <|assistant|> of its own, as parse_reply reads it.
            turn = whole[len(prompt) - len(opening) :]
            lead = "" if turn.startswith("\n") else "<|assistant|>"
            return prompt, (reply.get("reasoning_content") or "") + "</think>" + lead + turn
    return None, "the template renders this turn otherwise than after the generation prompt (no generation writes it)"


def until_stop(text, family):
    """(the reply, the stop token that ends it, or "")."""
    found = [(text.find(token), token) for token in STOP_TOKENS[family] if token in text]
    if not found:
        return text, ""
    at, token = min(found)
    return text[:at], token


def reply_cases():
    cases = []
    for family in FAMILIES:
        for probe in [*probe_conversations(), *EXTRA_CONVERSATIONS]:
            if "families" in probe and family not in probe["families"]:
                continue
            messages = probe["messages"]
            for index, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                case_id = f"{family}-{probe['name']}-{index}"
                if (family, probe["name"], index) in NOT_REPLIES:
                    skip = pytest.mark.skip(reason=NOT_REPLIES[family, probe["name"], index])
                    cases.append(pytest.param(family, None, None, None, id=case_id, marks=skip))
                    continue
                prompt, text = generated(family, messages, index, probe.get("tools"), probe.get("template_kwargs", {}))
                marks = [] if prompt is not None else [pytest.mark.skip(reason=text)]
                cases.append(pytest.param(family, prompt, text, probe.get("tools"), id=case_id, marks=marks))
    return cases


CASES = reply_cases()


@pytest.fixture(scope="module")
def tokenizers():
    """A tokenizer of each family (its built-in's) with the family's response template set."""
    loaded = {}
    for family in FAMILIES:
        tokenizer, _ = load_tokenizer(f"builtin:{BUILTIN[family]}")
        tokenizer.response_template = response_template(family)
        loaded[family] = tokenizer
    return loaded


def as_reply(message: dict) -> Reply:
    """transformers' message dict in parse_reply's terms."""
    assert message["role"] == "assistant"
    assert set(message) <= {"role", "content", "reasoning_content", "tool_calls"}, message
    calls = []
    for tool_call in message.get("tool_calls", []):
        assert tool_call["type"] == "function" and set(tool_call["function"]) == {"name", "arguments"}
        calls.append({"name": tool_call["function"]["name"], "arguments": tool_call["function"]["arguments"]})
    return Reply(message.get("content", ""), calls, message.get("reasoning_content", ""))


def expected_reply(family, prompt, text, tools=None) -> Reply:
    """parse_reply on the reply as ChatModel.raw_reply gives it: with what the prompt wrote after its <|assistant|>."""
    opening = prompt.rpartition("<|assistant|>")[2] if "<|assistant|>" in prompt else ""
    return parse_reply(opening + text, family, tools)


def chatglm3_reads(arguments: dict) -> bool:
    """Whether ChatGLM3's response template reads a call with these arguments (docs/serving.md): every value a number
    or a string with no quote, backslash, newline or ", " in it."""
    return all(
        (isinstance(value, int | float) and not isinstance(value, bool))
        or (isinstance(value, str) and not any(part in value for part in ("'", "\\", "\n", ", ")))
        for value in arguments.values()
    )


def streamed(tokenizer, prompt_ids, ids) -> dict:
    """The message a streaming parser gives when fed the reply's text token by token, as a streamer decodes it (a
    character split across tokens is held back until it is whole)."""
    parser = tokenizer.get_response_parser(prefix=prompt_ids)
    sent = ""
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:end])
        if not text.endswith("\ufffd"):
            parser.feed(text[len(sent) :])
            sent = text
    return parser.finalize()[0]


@pytest.mark.parametrize(("family", "prompt", "reply", "tools"), CASES)
def test_transformers_reads_each_rendered_reply_as_parse_reply_does(tokenizers, family, prompt, reply, tools):
    tokenizer = tokenizers[family]
    text, stop = until_stop(reply, family)
    expected = expected_reply(family, prompt, text)
    if family == "chatglm3" and not all(chatglm3_reads(call["arguments"]) for call in expected.calls):
        pytest.skip("ChatGLM3's tool_call(...) with Python-only values is beyond the declarative form: it stays text")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(text + stop, add_special_tokens=False)["input_ids"]
    assert as_reply(tokenizer.parse_response(text + stop, prefix=prompt)) == expected
    assert as_reply(tokenizer.parse_response(text, prefix=prompt)) == expected  # as raw_reply gives it: no stop token
    assert as_reply(tokenizer.parse_response(ids, prefix=prompt_ids)) == expected  # as serve and the pipelines call it
    assert as_reply(streamed(tokenizer, prompt_ids, ids)) == expected
    # with the tools: transformers casts call arguments by their schema, parse_reply keeps strings typed "string"
    assert as_reply(tokenizer.parse_response(text + stop, prefix=prompt, tools=tools)) == expected_reply(
        family, prompt, text, tools
    )


def compared(family):
    """The reference replies of the cases the test above compares for the family."""
    replies = []
    for case in CASES:
        case_family, prompt, reply, _tools = case.values
        if case_family == family and not case.marks:
            reply = expected_reply(family, prompt, until_stop(reply, family)[0])
            if family != "chatglm3" or all(chatglm3_reads(call["arguments"]) for call in reply.calls):
                replies.append(reply)
    return replies


@pytest.mark.parametrize("family", FAMILIES)
def test_the_compared_replies_hold_every_kind_of_reply(family):
    replies = compared(family)
    assert any(reply.content and not reply.calls and not reply.reasoning for reply in replies)  # a plain answer
    assert any(len(reply.calls) == 1 for reply in replies)
    assert any(len(reply.calls) >= 2 for reply in replies)  # GLM-4: chained by the <|assistant|> of each call
    assert any(reply.content and reply.calls for reply in replies)
    assert any(any(not name.isascii() for name in call["arguments"]) for reply in replies for call in reply.calls)
    assert any(
        any(not isinstance(value, str) for value in call["arguments"].values())
        for reply in replies
        for call in reply.calls
    )
    if family in THINKING_FAMILIES:
        assert any(reply.reasoning and reply.content for reply in replies)
        assert any(reply.reasoning and reply.calls for reply in replies)


# Replies written out, for the shapes rendering does not give: a reply cut before its end (max_new_tokens), the
# tokenizer_config form of GLM-4-0414's template (a space after the function name), two text turns in one reply, no
# prompt at all.
WRITTEN_REPLIES = [
    ("glm4", "<|assistant|>", '\n我来查一下。<|assistant|>get_weather\n{"city": "北京"}'),
    ("glm4", "<|assistant|>", "\n第一段。<|assistant|>\n第二段。<|user|>"),
    ("glm4", "", 'get_weather\n{"city": "北京", "days": 3}\n'),
    ("glm4_0414", "<|assistant|>", 'get_weather \n{"city": "北京"}<|observation|>'),
    ("chatglm3", "<|assistant|>", "\n我来查一下。<|assistant|>get_weather\n```python\ntool_call(city='北京')\n```"),
    ("chatglm3", "<|assistant|>", "get_weather\n```python\ntool_call()\n```<|observation|>"),
    ("glmz1", "<|user|>\n你好<|assistant|>\n<think>", "想一想，还没想完"),
    ("glmz1", "<|assistant|>\n<think>", 'R</think>get_weather\n{"city": "北京"}'),  # no <|assistant|>: text
    ("glm45", "<|assistant|>", "\n<think>想</think>\n你好！\n"),
    ("glm45", "<|assistant|>", "\n<think></think>\n<tool_call>now\n</tool_call>"),
    ("glm47", "<|assistant|><think>", "想一想，还没想完"),
    ("glm47", "<|assistant|></think>", "你好！<|user|>"),
    (
        "glm47",
        "<|assistant|><think>",
        "想</think>好<tool_call>f<arg_key>s</arg_key><arg_value>a\n  b </arg_value></tool_call>",
    ),
    ("glm47", "", "<tool_call>f<arg_key> n </arg_key><arg_value>42</arg_value></tool_call>\n"),
    ("glm52", "<|assistant|><think></think>", "<tool_call>f</tool_call><tool_call>g</tool_call><|observation|>"),
]


@pytest.mark.parametrize(
    ("family", "prompt", "reply"), [pytest.param(*case, id=f"{case[0]}-{n}") for n, case in enumerate(WRITTEN_REPLIES)]
)
def test_written_replies_read_as_parse_reply_reads_them(tokenizers, family, prompt, reply):
    text = until_stop(reply, family)[0]
    assert as_reply(tokenizers[family].parse_response(reply, prefix=prompt)) == expected_reply(family, prompt, text)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_stop_token_ends_the_reply(tokenizers, family):
    assert parse_reply("\n你好！ ", family) == Reply("你好！")
    for token in STOP_TOKENS[family]:
        message = tokenizers[family].parse_response(f"\n你好！ {token}", prefix="<|assistant|>")
        assert message == {"role": "assistant", "content": "你好！"}


@pytest.mark.parametrize(
    "arguments",
    [
        {"flag": True},
        {"note": None},
        {"tags": ["x", "y"]},
        {"where": {"城市": "北京"}},
        {"text": "it's"},
        {"text": "a, b"},
        {"text": "back\\slash"},
        {"text": "two\nlines"},
    ],
)
def test_a_chatglm3_call_the_declarative_form_cannot_read_stays_text(tokenizers, arguments):
    """ChatGLM3 writes a call's arguments as Python literals (True, None, lists, dicts, escapes); transformers' parsers
    read JSON, `key=value` lines and XML only, so such a call comes back as the text the model wrote, not half read."""
    prompt = render("chatglm3", [{"role": "user", "content": "q"}], [WEATHER], {}, add_generation_prompt=True)
    calling = {"role": "assistant", "content": "", "tool_calls": [call("f", **arguments)]}
    full = render("chatglm3", [{"role": "user", "content": "q"}, calling], [WEATHER], {}, close_final_turn=True)
    text, stop = until_stop(full[len(prompt) :], "chatglm3")
    assert parse_reply(text, "chatglm3").calls == [{"name": "f", "arguments": arguments}]
    assert tokenizers["chatglm3"].parse_response(text + stop, prefix=prompt) == {"role": "assistant", "content": text}


def test_with_tools_a_string_parameter_whose_value_reads_as_json_comes_back_as_json(tokenizers):
    """parse_reply keeps the value of a parameter the tools type as "string" a string; transformers casts only values
    its parser left as strings, and ours has read `42` as JSON already (docs/serving.md)."""
    schema = {"properties": {"code": {"type": "string"}}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    reply = "<tool_call>f<arg_key>code</arg_key><arg_value>42</arg_value></tool_call>"
    assert parse_reply(reply, "glm47", tools).calls == [{"name": "f", "arguments": {"code": "42"}}]
    message = tokenizers["glm47"].parse_response(reply, prefix="<|assistant|></think>", tools=tools)
    assert message["tool_calls"][0]["function"]["arguments"] == {"code": 42}
    assert parse_reply(reply, "glm47").calls == [{"name": "f", "arguments": {"code": 42}}]  # alike without tools


def test_there_is_one_response_template_per_family():
    assert sorted(path.stem for path in RESPONSE_DIR.iterdir()) == sorted(FAMILIES)
    assert all(path.suffix == ".json" for path in RESPONSE_DIR.iterdir())
    with pytest.raises(ValueError, match="no response template for 'glm3'"):
        response_template("glm3")
    template = response_template("glm47")
    template["fields"].clear()
    assert response_template("glm47")["fields"]  # a fresh copy each time


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_tokenizers_carry_the_response_template_and_parse_after_a_fresh_load(tmp_path, family):
    tokenizer, _ = load_tokenizer(f"builtin:{BUILTIN[family]}", template=family)
    # Attached when the tokenizer is loaded: every save carries it, the trainer's checkpoints too.
    assert tokenizer.response_template == response_template(family)
    save_tokenizer(tokenizer, family, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["response_template"] == response_template(family)
    fresh = AutoTokenizer.from_pretrained(tmp_path)
    assert fresh.response_template == response_template(family)
    messages = EXTRA_CONVERSATIONS[0]["messages"]
    prompt, reply = generated(family, messages, 1, [WEATHER], {})
    text, stop = until_stop(reply, family)
    expected = expected_reply(family, prompt, text)
    assert expected.calls[0] == {"name": "get_weather", "arguments": {"city": "北京", "days": 3}}
    assert as_reply(fresh.parse_response(text + stop, prefix=prompt)) == expected


def test_transformers_serve_reads_a_saved_tokenizer_s_calls_and_reasoning(tmp_path):
    """What `transformers serve` makes of a generation (its parse_assistant_message, on the ids): the reasoning apart,
    the calls with their arguments as JSON text, as the OpenAI API sends them."""
    from transformers.cli.serving.utils import parse_assistant_message

    tokenizer, family = load_tokenizer("builtin:tiny-glm47-flash")
    save_tokenizer(tokenizer, family, tmp_path)
    fresh = AutoTokenizer.from_pretrained(tmp_path)
    prompt, reply = generated(family, EXTRA_CONVERSATIONS[0]["messages"], 1, [WEATHER], {})
    ids = fresh(reply, add_special_tokens=False)["input_ids"]
    prompt_ids = fresh(prompt, add_special_tokens=False)["input_ids"]
    content, reasoning, calls = parse_assistant_message(fresh, None, ids, prompt_ids, tools=[WEATHER])
    assert (content, reasoning) == ("我先查北京。", "先查北京。")
    assert [(call.name, json.loads(call.arguments)) for call in calls] == [
        ("get_weather", {"city": "北京", "days": 3}),
        ("查询", PLAIN_VALUES),
    ]
