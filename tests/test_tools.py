"""Tool calling: every input shape read into canonical rows, rendered in each family's native format, trained on
exactly the calls and answers, parsed back from replies, and a tiny model that learns to call."""

import ast
import json

import pytest
from conftest import REPO, write_jsonl
from transformers.utils.chat_template_utils import render_jinja_template

from glm_sft import UserError
from glm_sft.data import DataError, read_conversations
from glm_sft.replies import MalformedCall, ReasoningStream, Reply, call_or_text, parse_reply, split_reasoning
from glm_sft.template import IGNORE_INDEX
from glm_sft.tokenization import encode_conversation
from glm_sft.tools import ToolSession

WEATHER = {
    "name": "get_weather",
    "description": "查询某个城市今天的天气",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CALCULATOR = {
    "name": "calculator",
    "description": "计算数学表达式",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}},
}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": CALCULATOR}]


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def user(text):
    return {"role": "user", "content": text}


def assistant(text, *calls):
    message = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = list(calls)
    return message


def tool(text):
    return {"role": "tool", "content": text}


ONE_CALL = [
    user("北京天气怎么样？"),
    assistant("", call("get_weather", city="北京")),
    tool('{"weather": "晴"}'),
    assistant("北京今天晴。"),
]
TWO_CALLS = [
    user("北京和上海呢？"),
    assistant("", call("get_weather", city="北京"), call("get_weather", city="上海")),
    tool('{"weather": "晴"}'),
    tool('{"weather": "雨"}'),
    assistant("北京晴，上海雨。"),
]
CALL_THEN_MORE_TURNS = [*ONE_CALL, user("算一下 3*4"), assistant("", call("calculator", expression="3*4")), tool("12"),
                        assistant("结果是 12。"), user("谢谢"), assistant("不客气！")]  # fmt: skip

# ---- the native formats, written out by hand ----

# One newline before "## name": the template glm-4-9b-chat ships has two, but
# transformers (and so vLLM) render templates with trim_blocks, which drops the first; this is the text the released
# model meets at inference, and the official-template test below checks it.
GLM4_TOOLS_BLOCK = (
    "<|system|>\n你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具"
    + "".join(
        f"\n## {function['name']}\n\n{json.dumps(function, indent=4, ensure_ascii=False)}"
        "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
        for function in (WEATHER, CALCULATOR)
    )
)
CHATGLM3_TOOLS_BLOCK = (
    "<|system|>\nAnswer the following questions as best as you can. You have access to the following tools:\n"
    + json.dumps([WEATHER, CALCULATOR], indent=4, ensure_ascii=False)
)


def glm4_call(name, arguments):
    return f"<|assistant|>{name}\n{arguments}"


def chatglm3_call(name, arguments):
    return f"<|assistant|>{name}\n```python\ntool_call({arguments})\n```"


EXPECTED = {
    ("glm4", "one call"): "[gMASK]<sop>" + GLM4_TOOLS_BLOCK + "<|user|>\n北京天气怎么样？"
    + glm4_call("get_weather", '{"city": "北京"}') + '<|observation|>\n{"weather": "晴"}<|assistant|>\n北京今天晴。',
    ("chatglm3", "one call"): "[gMASK]sop" + CHATGLM3_TOOLS_BLOCK + "<|user|>\n北京天气怎么样？"
    + chatglm3_call("get_weather", "city='北京'") + '<|observation|>\n{"weather": "晴"}<|assistant|>\n北京今天晴。',
    ("glm4", "two calls"): "[gMASK]<sop>" + GLM4_TOOLS_BLOCK + "<|user|>\n北京和上海呢？"
    + glm4_call("get_weather", '{"city": "北京"}') + '<|observation|>\n{"weather": "晴"}'
    + glm4_call("get_weather", '{"city": "上海"}') + '<|observation|>\n{"weather": "雨"}'
    + "<|assistant|>\n北京晴，上海雨。",
    ("chatglm3", "two calls"): "[gMASK]sop" + CHATGLM3_TOOLS_BLOCK + "<|user|>\n北京和上海呢？"
    + chatglm3_call("get_weather", "city='北京'") + '<|observation|>\n{"weather": "晴"}'
    + chatglm3_call("get_weather", "city='上海'") + '<|observation|>\n{"weather": "雨"}'
    + "<|assistant|>\n北京晴，上海雨。",
    ("glm4", "more turns"): "[gMASK]<sop>" + GLM4_TOOLS_BLOCK + "<|user|>\n北京天气怎么样？"
    + glm4_call("get_weather", '{"city": "北京"}') + '<|observation|>\n{"weather": "晴"}<|assistant|>\n北京今天晴。'
    + "<|user|>\n算一下 3*4" + glm4_call("calculator", '{"expression": "3*4"}') + "<|observation|>\n12"
    + "<|assistant|>\n结果是 12。<|user|>\n谢谢<|assistant|>\n不客气！",
    ("chatglm3", "more turns"): "[gMASK]sop" + CHATGLM3_TOOLS_BLOCK + "<|user|>\n北京天气怎么样？"
    + chatglm3_call("get_weather", "city='北京'") + '<|observation|>\n{"weather": "晴"}<|assistant|>\n北京今天晴。'
    + "<|user|>\n算一下 3*4" + chatglm3_call("calculator", "expression='3*4'") + "<|observation|>\n12"
    + "<|assistant|>\n结果是 12。<|user|>\n谢谢<|assistant|>\n不客气！",
}  # fmt: skip
CONVERSATIONS = {"one call": ONE_CALL, "two calls": TWO_CALLS, "more turns": CALL_THEN_MORE_TURNS}

# What the model must generate in each conversation: calls up to <|observation|>, answers up to the end token.
TRAINED = {
    ("glm4", "one call"): ['get_weather\n{"city": "北京"}<|observation|>', "\n北京今天晴。<|user|>"],
    ("chatglm3", "one call"): [
        "get_weather\n```python\ntool_call(city='北京')\n```<|observation|>",
        "\n北京今天晴。</s>",
    ],
    ("glm4", "two calls"): [
        'get_weather\n{"city": "北京"}<|observation|>',
        'get_weather\n{"city": "上海"}<|observation|>',
        "\n北京晴，上海雨。<|user|>",
    ],
    ("chatglm3", "two calls"): [
        "get_weather\n```python\ntool_call(city='北京')\n```<|observation|>",
        "get_weather\n```python\ntool_call(city='上海')\n```<|observation|>",
        "\n北京晴，上海雨。</s>",
    ],
    ("glm4", "more turns"): [
        'get_weather\n{"city": "北京"}<|observation|>',
        "\n北京今天晴。<|user|>",
        'calculator\n{"expression": "3*4"}<|observation|>',
        "\n结果是 12。<|user|>",
        "\n不客气！<|user|>",
    ],
    ("chatglm3", "more turns"): [
        "get_weather\n```python\ntool_call(city='北京')\n```<|observation|>",
        "\n北京今天晴。<|user|>",
        "calculator\n```python\ntool_call(expression='3*4')\n```<|observation|>",
        "\n结果是 12。<|user|>",
        "\n不客气！</s>",
    ],
}

# The template glm-4-9b-chat ships, reduced to its function-tool part.
OFFICIAL_GLM4_TEMPLATE = (
    "[gMASK]<sop>{% for item in messages %}{% if item['tools'] is defined %}<|system|>\n"
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具"
    "{% set tools = item['tools'] %}{% for tool in tools %}{% if tool['type'] == 'function' %}\n\n## "
    "{{ tool['function']['name'] }}\n\n{{ tool['function'] | tojson(indent=4) }}\n"
    "在调用上述函数时，请使用 Json 格式表示调用的参数。"
    "{% endif %}{% endfor %}{% endif %}{% if item['content'] %}<|{{ item['role'] }}|>{{ item['metadata'] }}\n"
    "{{ item['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.mark.parametrize("case", list(CONVERSATIONS))
def test_tool_conversations_render_in_the_native_format(family_and_tokenizer, case):
    family, tokenizer = family_and_tokenizer
    text = tokenizer.apply_chat_template(CONVERSATIONS[case], tools=TOOLS, tokenize=False)
    assert text == EXPECTED[family, case]


@pytest.mark.parametrize("case", list(CONVERSATIONS))
def test_labels_cover_exactly_calls_answers_and_end_tokens(family_and_tokenizer, case):
    family, tokenizer = family_and_tokenizer
    encoded = encode_conversation(tokenizer, CONVERSATIONS[case], tools=TOOLS)
    ids, labels = encoded["input_ids"], encoded["labels"]
    text = tokenizer.apply_chat_template(CONVERSATIONS[case], tools=TOOLS, tokenize=False, close_final_turn=True)
    assert text == EXPECTED[family, case] + ("<|user|>" if family == "glm4" else "</s>")
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    groups, current = [], []
    for index, label in enumerate(labels):
        if label != IGNORE_INDEX:
            assert label == ids[index]
            if not current:  # every trained stretch starts right after an <|assistant|> token
                assert tokenizer.convert_ids_to_tokens(ids[index - 1]) == "<|assistant|>"
            current.append(label)
        elif current:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    assert [tokenizer.decode(group) for group in groups] == TRAINED[family, case]


def test_glm4_text_equals_the_official_template_on_native_rows(glm4_tokenizer):
    native = [
        {"role": "system", "content": "", "tools": TOOLS},
        {"role": "user", "content": "北京天气怎么样？"},
        {"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'},
        {"role": "observation", "content": '{"weather": "晴"}'},
        {"role": "assistant", "content": "北京今天晴。"},
    ]
    for generation_prompt, messages in ((False, ONE_CALL), (True, ONE_CALL[:1])):
        official = render_jinja_template(
            [native if not generation_prompt else native[:2]],
            chat_template=OFFICIAL_GLM4_TEMPLATE,
            add_generation_prompt=generation_prompt,
        )[0][0]
        ours = glm4_tokenizer.apply_chat_template(
            messages, tools=TOOLS, tokenize=False, add_generation_prompt=generation_prompt
        )
        assert ours == official


def render_training_example(tokenizer, messages, tools):
    """The conversation's text, final turn closed by its end token, and the character span of each trained turn."""
    rendered, spans = render_jinja_template(
        [messages],
        tools=tools,
        chat_template=tokenizer.chat_template,
        return_assistant_tokens_mask=True,
        close_final_turn=True,
        **tokenizer.special_tokens_map,
    )
    return rendered[0], spans[0]


def test_a_final_call_is_closed_with_observation(family_and_tokenizer):
    _, tokenizer = family_and_tokenizer
    text, spans = render_training_example(tokenizer, ONE_CALL[:2], TOOLS)
    assert text.endswith("<|observation|>")
    assert len(spans) == 1 and text[spans[0][0] : spans[0][1]].startswith("get_weather\n")


# ---- parsing replies: the inverse of rendering ----

ARGUMENT_SETS = [
    {"city": "北京"},
    {},
    {"expression": "3*(4+5)", "precise": True, "digits": 3, "scale": 0.5, "unit": None},
    {"text": 'it\'s "quoted" \\ back', "lines": "a\nb\tc", "tags": ["x", "y'z"], "nested": {"k": [1, 2.5]}},
]


@pytest.mark.parametrize("arguments", ARGUMENT_SETS)
def test_render_then_parse_recovers_every_call(family_and_tokenizer, arguments):
    family, tokenizer = family_and_tokenizer
    calls = [call("calculator", **arguments), call("get_weather", city="上海")]
    messages = [user("q"), assistant("", *calls), tool("r1"), tool("r2"), assistant("done")]
    text, spans = render_training_example(tokenizer, messages, TOOLS)
    calls = [text[start:end].removesuffix("<|observation|>") for start, end in spans[:2]]
    assert parse_reply(calls[0], family) == Reply("", [{"name": "calculator", "arguments": arguments}])
    assert parse_reply(calls[1], family) == Reply("", [{"name": "get_weather", "arguments": {"city": "上海"}}])
    answer = text[spans[2][0] : spans[2][1]]
    assert parse_reply(answer.removesuffix("<|user|>").removesuffix("</s>"), family) == Reply("done")


def test_chatglm3_call_is_the_python_that_chatglm3_preprocessing_writes(chatglm3_tokenizer):
    """ChatGLM3's own data preparation writes tool_call(...) with ast.unparse over constants."""
    arguments = {"city": "北京", "days": 3, "scale": 0.5, "exact": False, "note": None, "quote": "it's"}
    code = ast.unparse(
        ast.Call(
            func=ast.Name(id="tool_call"),
            args=[],
            keywords=[ast.keyword(arg=key, value=ast.Constant(value)) for key, value in arguments.items()],
        )
    )
    text = chatglm3_tokenizer.apply_chat_template(
        [user("q"), assistant("", call("get_weather", **arguments))], tools=TOOLS, tokenize=False
    )
    assert text.endswith(f"<|assistant|>get_weather\n```python\n{code}\n```")


def test_parse_reply_plain_text_and_text_before_a_call():
    assert parse_reply("\n你好！", "glm4") == Reply("你好！")
    assert parse_reply("\n你好！", "chatglm3") == Reply("你好！")
    assert parse_reply('\n我来查一下。<|assistant|>get_weather\n{"city": "北京"}', "glm4") == Reply(
        "我来查一下。", [{"name": "get_weather", "arguments": {"city": "北京"}}]
    )


@pytest.mark.parametrize(
    ("reply", "family", "problem"),
    [
        ("get_weather\n{city: 北京}", "glm4", "not valid JSON"),
        ('get_weather\n["北京"]', "glm4", "expected a JSON object"),
        ("get_weather\n```python\ntool_call(城市=)\n```", "chatglm3", "is not Python"),
        ("get_weather\n```python\nprint('x')\n```", "chatglm3", "is not tool_call"),
        ("get_weather\n```python\ntool_call(city=input())\n```", "chatglm3", "not a literal"),
    ],
)
def test_unreadable_calls_raise(reply, family, problem):
    with pytest.raises(MalformedCall, match=problem):
        parse_reply(reply, family)


# ---- the newer generations: XML tool calls (GLM-4.5 and later) and a thinking family's reasoning ----

# As the released templates write a call (glm_sft/templates/released): GLM-4.5 and 4.6 put a newline around each tag,
# GLM-4.7 none; non-string values as JSON (ensure_ascii off), strings as they are.
GLM45_TWO_CALLS = (
    "\n<think>要查两个城市。</think>\n我来查一下。"
    "\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>北京</arg_value>\n"
    "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>"
    "\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>上海</arg_value>\n</tool_call>"
)
GLM47_TWO_CALLS = (
    "<think>要查两个城市。</think>我来查一下。"
    "<tool_call>get_weather<arg_key>city</arg_key><arg_value>北京</arg_value>"
    "<arg_key>days</arg_key><arg_value>3</arg_value></tool_call>"
    "<tool_call>get_weather<arg_key>city</arg_key><arg_value>上海</arg_value></tool_call>"
)
TWO_WEATHER_CALLS = [
    {"name": "get_weather", "arguments": {"city": "北京", "days": 3}},
    {"name": "get_weather", "arguments": {"city": "上海"}},
]


@pytest.mark.parametrize(("family", "text"), [("glm45", GLM45_TWO_CALLS), ("glm46", GLM45_TWO_CALLS),
                                               ("glm47", GLM47_TWO_CALLS)])  # fmt: skip
def test_xml_calls_are_read_in_order_with_the_reasoning_and_text_apart(family, text):
    assert parse_reply(text, family) == Reply("我来查一下。", TWO_WEATHER_CALLS, "要查两个城市。")


def test_xml_values_that_are_json_become_json_values_and_strings_stay_strings():
    values = {"n": 3, "x": 0.5, "ok": False, "none": None, "tags": ["a", "b"], "where": {"城市": "北京"}}
    text = "<tool_call>f" + "".join(
        f"<arg_key>{key}</arg_key><arg_value>{json.dumps(value, ensure_ascii=False)}</arg_value>"
        for key, value in values.items()
    )
    text += "<arg_key>s</arg_key><arg_value>it's {not json</arg_value>"
    text += "<arg_key>lines</arg_key><arg_value>a\n  b </arg_value></tool_call>"
    (parsed,) = parse_reply(text, "glm47").calls
    assert parsed == {"name": "f", "arguments": {**values, "s": "it's {not json", "lines": "a\n  b "}}


def test_a_parameter_the_tools_type_as_string_stays_a_string_even_when_it_reads_as_json():
    text = "<tool_call>calculator<arg_key>expression</arg_key><arg_value>42</arg_value></tool_call>"
    assert parse_reply(text, "glm45").calls[0]["arguments"] == {"expression": 42}
    assert parse_reply(text, "glm45", TOOLS).calls[0]["arguments"] == {"expression": "42"}


def test_an_xml_call_with_no_arguments_and_a_reply_with_no_call():
    assert parse_reply("<think></think>\n<tool_call>now\n</tool_call>", "glm45").calls == [
        {"name": "now", "arguments": {}}
    ]
    assert parse_reply("\n<think>想</think>\n你好！", "glm45") == Reply("你好！", [], "想")


@pytest.mark.parametrize(
    ("reply", "problem"),
    [
        ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>北京", "not closed"),  # cut at max_new_tokens
        ("<tool_call><arg_key>city</arg_key><arg_value>北京</arg_value></tool_call>", "no function name"),
        (
            "<tool_call>f<arg_key>a</arg_key><arg_value>1</arg_value><arg_key>a</arg_key><arg_value>2</arg_value>"
            "</tool_call>",
            "passes a twice",
        ),  # fmt: skip
        ("<tool_call>f<arg_key>a</arg_key>1</tool_call>", "not <arg_key>/<arg_value> pairs"),
        ("<tool_call>f</tool_call> 然后 <tool_call>g</tool_call>", "text between tool calls"),
    ],
)
def test_malformed_xml_calls_raise_and_come_back_as_text(reply, problem):
    with pytest.raises(MalformedCall, match=problem):
        parse_reply(reply, "glm47")

    class Chat:
        family = "glm47"

        def raw_reply(self, messages, **settings):
            return "<think>想一想</think>" + reply

    assert call_or_text(Chat(), [user("q")], TOOLS) == Reply(reply.strip(), [], "想一想")


@pytest.mark.parametrize(
    ("text", "in_reasoning", "expected"),
    [
        ("\n<think>\n先想一想。\n</think>\n\n答案是 4。", False, ("先想一想。", "答案是 4。")),  # GLM-4.5
        ("<think>先想。</think>答案", False, ("先想。", "答案")),  # GLM-4.7, the prompt's <think> included
        ("先想。</think>答案", False, ("先想。", "答案")),  # GLM-Z1 / 4.7 without the prompt's <think>
        ("\n<think></think>\n答案", False, ("", "答案")),  # thinking off
        ("</think>答案", False, ("", "答案")),  # GLM-4.7's prompt with thinking off
        ("<think>想到一半", False, ("想到一半", "")),  # cut before </think>
        ("想到一半", True, ("想到一半", "")),  # cut, the prompt having opened the block
        ("\n答案，没有思考", False, ("", "答案，没有思考")),
        ("答案 <think>x</think>", False, ("", "答案 <think>x</think>")),  # only a block at the start is reasoning
    ],
)
def test_split_reasoning(text, in_reasoning, expected):
    assert split_reasoning(text, in_reasoning) == expected


@pytest.mark.parametrize("size", [1, 2, 3, 7, 100])
@pytest.mark.parametrize(
    "text",
    ["\n<think>\n先想 一想。 \n</think>\n\n答案 是 4。\n", "<think></think>答案", "</think>答案", "<think>想到一半 ",
     "\n答案 <thin", "<thin", "\n\n"],
)  # fmt: skip
def test_streamed_reasoning_joins_to_the_whole_split_whatever_the_pieces(text, size):
    stream = ReasoningStream()
    parts = [part for start in range(0, len(text), size) for part in stream.feed(text[start : start + size])]
    parts += stream.finish()
    joined = {kind: "".join(piece for k, piece in parts if k == kind) for kind in ("reasoning", "answer")}
    assert (joined["reasoning"], joined["answer"]) == split_reasoning(text)
    assert all(kind in ("reasoning", "answer") and piece for kind, piece in parts)
    kinds = [kind for kind, _ in parts]
    assert kinds == sorted(kinds, key=("reasoning", "answer").index)  # the reasoning first, then the answer


def test_a_family_without_thinking_streams_everything_as_answer():
    stream = ReasoningStream(thinking=False)
    assert stream.feed("\n<think>x</think> y ") + stream.finish() == [("answer", "<think>x</think> y")]


def test_tool_session_answers_several_calls_and_keeps_the_reasoning_in_the_history(tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"get_weather": {"weather": "晴"}}), encoding="utf-8")
    raw = iter([GLM47_TWO_CALLS, "<think>都查到了。</think>北京和上海都晴。"])
    seen = []

    class Chat:
        family = "glm47"

        def raw_reply(self, messages, *, tools, **settings):
            seen.append([dict(message) for message in messages])
            return next(raw)

    messages = [user("北京和上海天气？")]
    session = ToolSession(str(REPO / "data" / "tools.json"), str(results))
    assert session.answer(Chat(), messages) == Reply("北京和上海都晴。", [], "都查到了。")
    calls = [call("get_weather", city="北京", days=3), call("get_weather", city="上海")]
    assert messages == [
        user("北京和上海天气？"),
        {"role": "assistant", "content": "我来查一下。", "reasoning_content": "要查两个城市。", "tool_calls": calls},
        tool('{"weather": "晴"}'),
        tool('{"weather": "晴"}'),
        {"role": "assistant", "content": "北京和上海都晴。", "reasoning_content": "都查到了。"},
    ]
    assert seen[1] == messages[:4]
    printed = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in printed] == TWO_WEATHER_CALLS


class ScriptedChat:
    """A GLM-4.7 chat model whose raw replies are the given texts in turn (the last one again once they run out);
    `seen` holds the prompts it was given."""

    family = "glm47"

    def __init__(self, *raw):
        self.raw, self.seen = list(raw), []

    def raw_reply(self, messages, *, tools, **settings):
        self.seen.append([dict(message) for message in messages])
        return self.raw.pop(0) if len(self.raw) > 1 else self.raw[0]


def test_a_turn_without_ask_waits_for_a_result_and_the_next_turn_answers_the_calls_left_first(tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"calculator": {"result": "2"}}), encoding="utf-8")
    two_calls = (
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>北京</arg_value></tool_call>"
        "<tool_call>calculator<arg_key>expression</arg_key><arg_value>1+1</arg_value></tool_call>"
    )
    chat = ScriptedChat(two_calls, "<think>都有了。</think>北京晴，1+1=2。")
    session = ToolSession(str(REPO / "data" / "tools.json"), str(results))
    system = [{"role": "system", "content": "简短回答。"}]
    messages = [user("北京天气和 1+1？")]
    weather = {"name": "get_weather", "arguments": {"city": "北京"}}
    calculator = {"name": "calculator", "arguments": {"expression": "1+1"}}
    events = list(session.turn(chat, messages, ask=None, system=system))
    assert events == [("reply", Reply("", [weather, calculator])), ("call", weather), ("call", calculator),
                      ("waiting", weather)]  # fmt: skip
    messages.append(tool("晴"))  # the result that came later
    events = list(session.turn(chat, messages, ask=None, system=system))
    assert events == [("result", (calculator, '{"result": "2"}')), ("reply", Reply("北京晴，1+1=2。", [], "都有了。"))]
    assert messages == [
        user("北京天气和 1+1？"),
        assistant("", call("get_weather", city="北京"), call("calculator", expression="1+1")),
        tool("晴"),
        tool('{"result": "2"}'),
        {"role": "assistant", "content": "北京晴，1+1=2。", "reasoning_content": "都有了。"},
    ]
    assert chat.seen == [system + messages[:1], system + messages[:4]]  # the system prompt leads each prompt only


def test_a_turn_stops_when_told_and_after_max_calls_per_turn(tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"get_weather": "晴"}), encoding="utf-8")
    session = ToolSession(str(REPO / "data" / "tools.json"), str(results))
    calling = "<tool_call>get_weather<arg_key>city</arg_key><arg_value>北京</arg_value></tool_call>"
    assert list(session.turn(ScriptedChat(calling), [user("q")], stop=lambda: True)) == [("stopped", None)]
    messages = [user("q")]
    events = list(session.turn(ScriptedChat(calling), messages))
    assert [kind for kind, _ in events] == ["reply", "call", "result"] * 8 + ["limit"]
    assert events[-1] == ("limit", ToolSession.MAX_CALLS_PER_TURN) and messages[-1] == tool("晴")
    with pytest.raises(UserError, match="the model made 8 calls in one turn without replying; stopped"):
        session.answer(ScriptedChat(calling), [user("q")])
    assert capsys.readouterr().out.count('{"name": "get_weather", "arguments": {"city": "北京"}}\n') == 8


# ---- reading every input shape ----


OPENAI_ROW = {
    "tools": TOOLS,
    "messages": [
        user("北京天气怎么样？"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"weather": "晴"}'},
        assistant("北京今天晴。"),
    ],
}
GLM4_ROW = {
    "messages": [
        {"role": "system", "content": "", "tools": TOOLS},
        user("北京天气怎么样？"),
        {"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'},
        {"role": "observation", "content": '{"weather": "晴"}'},
        assistant("北京今天晴。"),
    ]
}
CHATGLM3_ROW = {
    "tools": [WEATHER, CALCULATOR],
    "conversations": [
        user("北京天气怎么样？"),
        {"role": "tool", "name": "get_weather", "parameters": {"city": "北京"}, "observation": {"weather": "晴"}},
        assistant("北京今天晴。"),
    ],
}
SHAREGPT_ROW = {
    "tools": json.dumps([WEATHER, CALCULATOR], ensure_ascii=False),
    "conversations": [
        {"from": "human", "value": "北京天气怎么样？"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "北京"}}'},
        {"from": "observation", "value": '{"weather": "晴"}'},
        {"from": "gpt", "value": "北京今天晴。"},
    ],
}


def test_every_tool_row_shape_becomes_the_same_canonical_row_in_one_mixed_file(tmp_path):
    plain = {"messages": [user("你好"), assistant("你好！")]}
    path = write_jsonl(tmp_path / "mixed.jsonl", [OPENAI_ROW, plain, GLM4_ROW, CHATGLM3_ROW, SHAREGPT_ROW])
    rows, stats = read_conversations(path)
    assert stats.used == 5
    expected = {"messages": ONE_CALL, "tools": TOOLS}
    for row in (rows[0], rows[2], rows[3], rows[4]):
        assert {key: row[key] for key in ("messages", "tools")} == expected, row["source"]
    assert rows[1] == {"messages": plain["messages"], "source": f"{path}:2"}


def test_sharegpt_function_call_list_is_several_calls_in_one_turn(tmp_path):
    row = {
        "tools": json.dumps([WEATHER]),
        "conversations": [
            {"from": "human", "value": "北京和上海呢？"},
            {
                "from": "function_call",
                "value": json.dumps(
                    [
                        {"name": "get_weather", "arguments": {"city": "北京"}},
                        {"name": "get_weather", "arguments": {"city": "上海"}},
                    ]
                ),
            },  # fmt: skip
            {"from": "observation", "value": '{"weather": "晴"}'},
            {"from": "observation", "value": '{"weather": "雨"}'},
            {"from": "gpt", "value": "北京晴，上海雨。"},
        ],
    }
    rows, _ = read_conversations(write_jsonl(tmp_path / "t.jsonl", [row]))
    assert rows[0]["messages"] == TWO_CALLS


def test_bundled_tool_data_reads_in_every_shape():
    raw = [json.loads(line) for line in open("data/tool_calls.jsonl", encoding="utf-8")]
    shapes = {
        "openai": any("tool_calls" in m for r in raw for m in r.get("messages", [])),
        "glm4": any("metadata" in m for r in raw for m in r.get("messages", [])),
        "chatglm3": any("observation" in m for r in raw for m in r.get("conversations", [])),
        "sharegpt": any(m.get("from") == "function_call" for r in raw for m in r.get("conversations", [])),
    }
    assert all(shapes.values()), shapes
    rows, stats = read_conversations("data/tool_calls.jsonl")
    assert stats.used == len(raw)
    assert sum("tools" in row for row in rows) > len(rows) // 2
    assert any("tools" not in row for row in rows)  # plain rows mixed in


def problems_of(tmp_path, row):
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError) as error:
        read_conversations(path)
    return str(error.value).removeprefix(f"{path}:1: ")


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        (
            {"tools": TOOLS, "messages": [user("q"), assistant("", call("get_wether", city="北京")), tool("r"),
                                          assistant("a")]},
            'message 2 (assistant) calls "get_wether", which is not in "tools" (get_weather, calculator)',
        ),
        (
            {"messages": [user("q"), assistant("", call("get_weather", city="北京")), tool("r"), assistant("a")]},
            'message 2 (assistant) calls "get_weather" but the row has no "tools"; add the function definitions',
        ),
        (
            {"tools": TOOLS, "messages": [user("q"), {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "get_weather", "arguments": "北京"}}]}, tool("r"), assistant("a")]},
            'message 2 (assistant): the arguments of "get_weather" are not valid JSON '
            "(Expecting value at character 0)",
        ),
        (
            {"tools": TOOLS, "messages": [user("q"), {"role": "assistant", "metadata": "get_weather",
                                                      "content": '["北京"]'}, tool("r"), assistant("a")]},
            'message 2 (assistant): the arguments of "get_weather" are of type list; expected a JSON object',
        ),
        (
            {"tools": TOOLS, "messages": [user("q"), tool("r"), assistant("a")]},
            "message 2 (tool) is a tool result with no call before it",
        ),
        (
            {"tools": TOOLS, "messages": [user("q"), assistant("", call("get_weather", city="北京")), user("?"),
                                          assistant("a")]},
            'message 2 (assistant) calls "get_weather" but no result follows',
        ),
        (
            {"tools": TOOLS, "messages": [user("q"), assistant("", call("get_weather", city="北京")), tool("r")]},
            "the conversation ends with a tool result; it must end with an assistant reply",
        ),
        ({"tools": "get_weather", "messages": [user("q"), assistant("a")]},
         '"tools" is a string that is not valid JSON (Expecting value at character 0)'),
        ({"tools": {"name": "f"}, "messages": [user("q"), assistant("a")]},
         '"tools" is of type object; expected a list of function definitions'),
        ({"tools": [WEATHER, 3], "messages": [user("q"), assistant("a")]},
         '"tools" item 2 is of type number; expected a function definition object'),
        ({"tools": [{"type": "python"}], "messages": [user("q"), assistant("a")]},
         '"tools" item 1 has type "python"; only function tools can be trained'),
        ({"tools": [{"name": 7, "description": "no name"}], "messages": [user("q"), assistant("a")]},
         '"tools" item 1 has no usable "name" (got 7)'),
        ({"tools": [{"description": "f"}], "messages": [user("q"), assistant("a")]},
         '"tools" item 1 has neither "function" nor "name"; expected {"type": "function", "function": {"name", ...}}'),
    ],
)  # fmt: skip
def test_bad_tool_rows_are_reported_with_file_and_line(tmp_path, row, problem):
    assert problems_of(tmp_path, row) == problem


def test_a_conversation_may_end_with_one_call(tmp_path):
    row = {"tools": TOOLS, "messages": [user("q"), assistant("", call("get_weather", city="北京"))]}
    rows, _ = read_conversations(write_jsonl(tmp_path / "t.jsonl", [row]))
    assert rows[0]["messages"][-1]["tool_calls"][0]["function"]["name"] == "get_weather"


# ---- chat_cli with tools, and a tiny model that learns to call ----


def test_history_trimming_drops_whole_rounds_with_their_calls(glm4_tokenizer):
    from glm_sft.inference import fit_prompt

    messages = [*CALL_THEN_MORE_TURNS, user("最后的问题")]
    full = glm4_tokenizer.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, tokenize=True)
    ids, kept = fit_prompt(glm4_tokenizer, messages, len(full["input_ids"]) - 1, tools=TOOLS)
    assert kept == messages[4:]  # the first round (question, call, result, answer) went as a whole
    assert len(ids) < len(full["input_ids"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[{"name": ', "tools.json:1: not valid JSON (Expecting value); expected a list of function definitions"),
        ('{"name": "f"}', 'tools.json: "tools" is of type object; expected a list of function definitions'),
        ("[]", "tools.json: no tools defined"),
    ],
)
def test_chat_cli_rejects_a_bad_tools_file_before_loading_a_model(tmp_path, capsys, content, message):
    import chat_cli

    path = tmp_path / "tools.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        chat_cli.main(["--model", "builtin:tiny-glm4", "--tools", str(path), "--prompt", "hi"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == f"error: {tmp_path}/{message}"


@pytest.fixture(scope="module")
def tool_run(tmp_path_factory):
    """recipes/demo_tools.yaml, run as a user would: the tiny GLM-4 model on data/tool_calls.jsonl."""
    from conftest import trained_tools_demo

    return trained_tools_demo(tmp_path_factory)


@pytest.mark.parametrize(
    ("question", "expected_call"),
    [
        ("我在广州，今天要带伞吗？", {"name": "get_weather", "arguments": {"city": "广州"}}),
        ("请告诉我 7*8 的结果", {"name": "calculator", "arguments": {"expression": "7*8"}}),
    ],
)
def test_fine_tuned_tiny_model_emits_the_trained_call(tool_run, question, expected_call):
    from conftest import chat_once

    output = chat_once(
        "--adapter", tool_run, "--tools", "data/tools.json", "--tool_results", "data/tool_results.json",
        "--prompt", question, "--temperature", "0",
    )  # fmt: skip
    lines = output.splitlines()
    assert json.loads(lines[0]) == expected_call
    assert len(lines) == 2 and lines[1].strip()  # then, given the result, an answer in text
