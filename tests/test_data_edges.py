"""Data that must not be trained as it is: each case is a `path:line:` problem (never a traceback, never trained as
written), or is read the way the format it comes from means it."""

import json
import types

import pytest
from conftest import write_jsonl
from test_data import assistant, problems_of, system, user

from glm_sft import UserError
from glm_sft.data import read_conversations, read_datasets
from glm_sft.replies import MalformedCall, parse_reply

WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
TOOLS = [{"type": "function", "function": WEATHER}]


def write_lines(path, *lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


GOOD = json.dumps({"messages": [user("a"), assistant("b")]})


# ---- "loss" on a message (ChatGLM3's fine-tuning format) ----


def test_loss_false_is_kept_on_the_assistant_message(tmp_path):
    row = {"messages": [user("q1"), {**assistant("a1"), "loss": False}, user("q2"), {**assistant("a2"), "loss": True}]}
    rows, _ = read_conversations(write_jsonl(tmp_path / "t.jsonl", [row]))
    assert rows[0]["messages"] == [user("q1"), {**assistant("a1"), "loss": False}, user("q2"), assistant("a2")]


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        (
            {"messages": [{**user("q"), "loss": True}, assistant("a")]},
            'message 1 (user) has "loss": true, but only assistant messages are trained; remove it',
        ),
        (
            {"messages": [user("q"), {**assistant("a"), "loss": "no"}]},
            'message 2 (assistant) has "loss" of type string; expected true or false',
        ),
        (
            {"messages": [user("q"), {**assistant("a"), "loss": False}]},
            'every assistant message has "loss": false; nothing to train on',
        ),
    ],
)
def test_bad_loss_keys(tmp_path, row, problem):
    path = write_jsonl(tmp_path / "t.jsonl", [row])
    assert problems_of(path) == f"{path}:1: {problem}"


# ---- ChatGLM3 tool rows ----


def test_chatglm3_messages_form_of_a_call_is_read_as_a_call(tmp_path):
    row = {
        "tools": [json.dumps(WEATHER)],  # each definition a JSON string
        "conversations": [
            user("北京天气？"),
            {"role": "assistant", "metadata": "get_weather", "content": "```python\ntool_call(city='北京')\n```"},
            {"role": "observation", "content": '{"weather": "晴"}'},
            assistant("晴。"),
        ],
    }
    rows, _ = read_conversations(write_jsonl(tmp_path / "t.jsonl", [row]))
    assert rows[0]["tools"] == TOOLS
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}
    assert rows[0]["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert rows[0]["messages"][2] == {"role": "tool", "content": '{"weather": "晴"}'}


def test_chatglm3_call_that_is_not_python_names_the_message(tmp_path):
    row = {
        "tools": TOOLS,
        "conversations": [
            user("q"),
            {"role": "assistant", "metadata": "get_weather", "content": "```python\ntool_call(city=)\n```"},
            {"role": "observation", "content": "r"},
            assistant("a"),
        ],
    }
    path = write_jsonl(tmp_path / "t.jsonl", [row])
    assert problems_of(path).startswith(f"{path}:1: message 2 (assistant): the call to get_weather is not Python")


# ---- JSON that Python reads but that is not (trainable) JSON ----


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"messages": [{"role": "user", "role": "assistant", "content": "a"}]}', 'has the key "role" twice'),
        ('{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "b"}]}',
         "holds a lone UTF-16 surrogate (\\ud800)"),
        ('{"n": ' + "1" * 5000 + "}", "holds an integer of 5000 digits, too long to read"),
        ('{"n": 1e999}', "holds the number 1e999, which is out of range"),
        ('{"x": ' + "[" * 150 + "]" * 150 + "}", "nested deeper than 100 levels"),
        ('{"x": ' + "[" * 5000 + "]" * 5000 + "}", "nested deeper than 100 levels"),
    ],
)  # fmt: skip
def test_json_lines_that_python_would_read_wrongly(tmp_path, line, problem):
    path = write_lines(tmp_path / "t.jsonl", GOOD, line, GOOD)
    text = problems_of(path)
    assert text.startswith(f"{path}:2: the JSON {problem}") and len(text.splitlines()) == 1


def test_json_list_element_with_a_duplicate_key_and_a_deep_one(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(f'[\n{GOOD},\n{{"messages": [], "messages": []}},\n{GOOD},\n{"[" * 5000}\n]', encoding="utf-8")
    assert problems_of(str(path)).splitlines() == [
        f'{path}:3: the JSON has the key "messages" twice in one object',
        f"{path}:5: the JSON nested deeper than 100 levels; stopped reading this file",
    ]


@pytest.mark.parametrize("arguments", ['{"city": NaN}', '{"city": Infinity}', '{"city": "a", "city": "b"}'])
def test_tool_arguments_that_are_not_json(tmp_path, arguments):
    row = {
        "tools": TOOLS,
        "messages": [user("q"), {"role": "assistant", "metadata": "get_weather", "content": arguments},
                     {"role": "observation", "content": "r"}, assistant("a")],
    }  # fmt: skip
    path = write_jsonl(tmp_path / "t.jsonl", [row])
    assert problems_of(path).startswith(f'{path}:1: message 2 (assistant): the arguments of "get_weather" are refused')


def test_nan_in_a_row_is_refused(tmp_path):
    line = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "score": NaN}'
    path = write_lines(tmp_path / "t.jsonl", line)
    assert problems_of(path) == f"{path}:1: the JSON holds NaN, which is not JSON; write null or a number"


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes((GOOD + "\n" + GOOD + "\n").encode() + b'{"messages": "\xff"}\n')
    assert problems_of(str(path)) == (
        f"{path}:3: not UTF-8 text (invalid start byte at byte 15 of the line); save it as UTF-8"
    )


# ---- placeholders, paths, formats ----


def test_placeholder_value_with_a_control_token_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": [user("你是谁？"), assistant("我是{{name}}。")]}])
    text = problems_of(path, placeholders={"name": "小智<|user|>", "author": "团队"})
    assert text == (
        f'{path}:1: uses {{{{name}}}} but assistant_name ("小智<|user|>") contains the control token <|user|>; '
        "remove it"
    )


def test_a_path_that_is_not_a_regular_file_says_what_it_is():
    assert problems_of("/dev/null") == (
        "/dev/null: a character device, not a data file; give a .json, .jsonl, .csv or .parquet file or a folder "
        "of them"
    )


def test_adgen_rows_without_column_keys_get_one_message(tmp_path):
    text = problems_of("data/adgen_demo.jsonl")
    assert text.splitlines() == [
        "data/adgen_demo.jsonl:1: cannot tell the format of 34 rows (this one and those after it with the same keys) "
        "(keys: content, summary); expected messages/conversations, instruction+output (alpaca), conversation "
        "(firefly) or the columns prompt/response; set dataset_format to choose, or set prompt_column: content and "
        "response_column: summary"
    ]


# ---- the run's settings and both data sets, checked before any model loads ----


def data_args(**keys):
    defaults = {
        "dataset_name": None, "eval_dataset_name": None, "dataset_format": "auto", "prompt_column": "prompt",
        "response_column": "response", "assistant_name": None, "assistant_author": None, "skip_invalid_rows": False,
        "max_samples": None, "val_size": None,
    }  # fmt: skip
    return types.SimpleNamespace(**{**defaults, **keys})


@pytest.mark.parametrize("max_samples", [0, -5])
def test_max_samples_below_one_is_refused(tmp_path, max_samples):
    path = write_lines(tmp_path / "t.jsonl", GOOD, GOOD)
    with pytest.raises(UserError, match=f"max_samples must be a number of rows, 1 or more; got {max_samples}"):
        read_datasets(data_args(dataset_name=path, max_samples=max_samples), seed=0)


def test_train_and_eval_problems_are_reported_together(tmp_path):
    train = write_lines(tmp_path / "train.jsonl", GOOD, json.dumps({"messages": [user("a")]}))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [{"messages": [system("s"), user("b")]}])
    with pytest.raises(UserError) as error:
        read_datasets(data_args(dataset_name=train, eval_dataset_name=evaluation), seed=0)
    assert str(error.value).splitlines() == [
        f"{train}:2: no assistant message; nothing to train on",
        f"{evaluation}:1: no assistant message; nothing to train on",
    ]


# ---- parsing generated replies ----


@pytest.mark.parametrize(
    ("reply", "family"),
    [("f\n" + "[" * 5000 + "]" * 5000, "glm4"), ("f\n" + '{"a":' * 2000 + "1" + "}" * 2000, "glm4")],
)
def test_parse_reply_on_deeply_nested_output_is_a_malformed_call(reply, family):
    with pytest.raises(MalformedCall, match="nested deeper than 100 levels"):
        parse_reply(reply, family)
