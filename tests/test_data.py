"""Reading data files into canonical conversations, and the `path:line:` problems bad data gets."""

import json
import sys
import types

import pytest
from conftest import write_jsonl

from glm_sft import UserError
from glm_sft.data import DataError, DataStats, read_conversations


def problems_of(spec, **options):
    with pytest.raises(DataError) as raised:
        read_conversations(spec, **options)
    return str(raised.value)


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


def system(content):
    return {"role": "system", "content": content}


# ---------------------------------------------------------------------------------------------------------------
# Formats


def test_messages_jsonl_keeps_turns_and_counts_lines_past_blank_ones(tmp_path):
    path = tmp_path / "train.jsonl"
    first = {"messages": [system("你是助手"), user("你好"), assistant("你好！"), user("1+1?"), assistant("2")]}
    second = {"messages": [user("hi"), assistant("hello")], "extra": 1}
    path.write_text(json.dumps(first, ensure_ascii=False) + "\n\n   \n" + json.dumps(second) + "\n", encoding="utf-8")

    conversations, stats = read_conversations(str(path))

    assert conversations == [
        {"messages": first["messages"], "source": f"{path}:1"},
        {"messages": second["messages"], "source": f"{path}:4"},
    ]
    assert stats == DataStats(read=2, used=2, skipped=0)


def test_conversations_key_with_role_and_content_is_the_messages_format(tmp_path):
    path = write_jsonl(tmp_path / "glm.jsonl", [{"conversations": [user("问"), {**assistant("答"), "metadata": ""}]}])

    conversations, _ = read_conversations(path)

    assert conversations[0]["messages"] == [user("问"), assistant("答")]


def test_sharegpt_with_top_level_system(tmp_path):
    row = {
        "system": "be brief",
        "conversations": [
            {"from": "human", "value": "q1"},
            {"from": "gpt", "value": "a1"},
            {"from": "human", "value": "q2"},
            {"from": "gpt", "value": "a2"},
        ],
    }
    path = write_jsonl(tmp_path / "sharegpt.jsonl", [row])

    conversations, _ = read_conversations(path)

    assert conversations[0]["messages"] == [
        system("be brief"),
        user("q1"),
        assistant("a1"),
        user("q2"),
        assistant("a2"),
    ]


def test_alpaca_with_input_system_and_history(tmp_path):
    row = {
        "instruction": "翻译成英文",
        "input": "你好",
        "output": "Hello",
        "system": "你是翻译",
        "history": [["第一问", "第一答"], ["第二问", "第二答"]],
    }
    path = write_jsonl(tmp_path / "alpaca.jsonl", [row])

    conversations, _ = read_conversations(path)

    assert conversations[0]["messages"] == [
        system("你是翻译"),
        user("第一问"),
        assistant("第一答"),
        user("第二问"),
        assistant("第二答"),
        user("翻译成英文\n\n你好"),
        assistant("Hello"),
    ]


def test_alpaca_empty_input_and_empty_system_are_left_out(tmp_path):
    path = write_jsonl(
        tmp_path / "alpaca.jsonl", [{"instruction": "写诗", "input": "", "output": "春眠", "system": " "}]
    )

    conversations, _ = read_conversations(path)

    assert conversations[0]["messages"] == [user("写诗"), assistant("春眠")]


def test_firefly_with_system(tmp_path):
    row = {"system": "s", "conversation": [{"human": "q1", "assistant": "a1"}, {"human": "q2", "assistant": "a2"}]}
    path = write_jsonl(tmp_path / "firefly.jsonl", [row])

    conversations, _ = read_conversations(path)

    assert conversations[0]["messages"] == [system("s"), user("q1"), assistant("a1"), user("q2"), assistant("a2")]


def test_columns_from_csv_report_the_line_where_each_record_starts(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text('question,answer\n"line one\nline two",first\n\nq2,"a, with comma"\n', encoding="utf-8-sig")

    conversations, stats = read_conversations(str(path), prompt_column="question", response_column="answer")

    assert conversations == [
        {"messages": [user("line one\nline two"), assistant("first")], "source": f"{path}:2"},
        {"messages": [user("q2"), assistant("a, with comma")], "source": f"{path}:5"},
    ]
    assert stats.read == 2


def test_columns_from_adgen_json_rows(tmp_path):
    row = {"content": "类型#裤*材质#牛仔布", "summary": "这款牛仔裤……"}
    path = write_jsonl(tmp_path / "adgen.json", [row])

    conversations, _ = read_conversations(path, prompt_column="content", response_column="summary")

    assert conversations[0]["messages"] == [user("类型#裤*材质#牛仔布"), assistant("这款牛仔裤……")]


def test_json_list_reports_the_line_where_each_element_starts(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(
        "[\n"
        '  {"messages": [{"role": "user", "content": "a"},\n'
        '                {"role": "assistant", "content": "b"}]},\n'
        "\n"
        '  {"messages": [{"role": "user", "content": "c\\nd"}, {"role": "assistant", "content": "e"}]},'
        ' {"messages": [{"role": "user", "content": "f"},\n'
        '  {"role": "assistant", "content": "g"}]},\n'
        '  {"messages": [{"role": "user", "content": "h"}, {"role": "assistant", "content": "i"}]}\n'
        "]\n",
        encoding="utf-8",
    )

    conversations, _ = read_conversations(str(path))

    assert [conversation["source"] for conversation in conversations] == [
        f"{path}:2",
        f"{path}:5",
        f"{path}:5",
        f"{path}:7",
    ]
    assert conversations[1]["messages"] == [user("c\nd"), assistant("e")]


def test_json_file_with_one_object_per_line(tmp_path):
    path = write_jsonl(tmp_path / "lines.json", [{"messages": [user("a"), assistant("b")]}] * 2)

    conversations, _ = read_conversations(path)

    assert [conversation["source"] for conversation in conversations] == [f"{path}:1", f"{path}:2"]


def test_parquet_rows_are_numbered_from_one(tmp_path):
    pandas = pytest.importorskip("pandas")
    path = tmp_path / "train.parquet"
    pandas.DataFrame({"messages": [[user("a"), assistant("b")], [system("s"), user("c"), assistant("d")]]}).to_parquet(
        path
    )

    conversations, _ = read_conversations(str(path))

    assert conversations == [
        {"messages": [user("a"), assistant("b")], "source": f"{path}:1"},
        {"messages": [system("s"), user("c"), assistant("d")], "source": f"{path}:2"},
    ]


def test_folder_reads_supported_files_sorted_and_recursively(tmp_path):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    (folder / ".ipynb_checkpoints").mkdir()
    write_jsonl(folder / "b.jsonl", [{"messages": [user("b"), assistant("B")]}])
    write_jsonl(folder / "a.jsonl", [{"instruction": "a", "output": "A"}])
    write_jsonl(folder / "sub" / "c.jsonl", [{"conversation": [{"human": "c", "assistant": "C"}]}])
    write_jsonl(folder / ".ipynb_checkpoints" / "a-checkpoint.jsonl", [{"instruction": "x", "output": "X"}])
    (folder / "notes.txt").write_text("not data")

    conversations, stats = read_conversations(str(folder) + "/")

    assert [conversation["source"] for conversation in conversations] == [
        f"{folder}/a.jsonl:1",
        f"{folder}/b.jsonl:1",
        f"{folder}/sub/c.jsonl:1",
    ]
    assert [conversation["messages"][0]["content"] for conversation in conversations] == ["a", "b", "c"]
    assert stats.read == 3


def test_comma_separated_list_reads_each_in_order(tmp_path):
    first = write_jsonl(tmp_path / "one.jsonl", [{"messages": [user("1"), assistant("one")]}])
    second = write_jsonl(tmp_path / "two.jsonl", [{"messages": [user("2"), assistant("two")]}])

    conversations, stats = read_conversations(f"{second}, {first}")

    assert [conversation["source"] for conversation in conversations] == [f"{second}:1", f"{first}:1"]
    assert stats == DataStats(read=2, used=2, skipped=0)


def test_dataset_format_forces_the_format(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"messages": "ignored", "prompt": "p", "response": "r"}])

    conversations, _ = read_conversations(path, dataset_format="columns")

    assert conversations[0]["messages"] == [user("p"), assistant("r")]


def test_hub_dataset_id_is_loaded_with_datasets(tmp_path, monkeypatch):
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return [{"instruction": "q", "output": "a"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.chdir(tmp_path)

    conversations, _ = read_conversations("someone/qa-data")

    assert calls == [("someone/qa-data", "train")]
    assert conversations == [{"messages": [user("q"), assistant("a")], "source": "someone/qa-data:1"}]


# ---------------------------------------------------------------------------------------------------------------
# Placeholders


def test_placeholders_are_filled_and_other_braces_are_left_alone(tmp_path):
    row = {"messages": [user("你是谁？{{x}}"), assistant("我是{{name}}，由{{ author }}开发。{{ name }}")]}
    path = write_jsonl(tmp_path / "self.jsonl", [row])

    conversations, _ = read_conversations(path, placeholders={"name": "小智", "author": "某团队"})

    assert conversations[0]["messages"] == [user("你是谁？{{x}}"), assistant("我是小智，由某团队开发。小智")]


def test_missing_placeholder_value_is_reported_once_per_file_at_its_first_use(tmp_path):
    rows = [
        {"messages": [user("hi"), assistant("plain")]},
        {"messages": [user("who?"), assistant("I am {{name}}")]},
        {"messages": [user("who?"), assistant("{{name}} by {{author}}")]},
    ]
    path = write_jsonl(tmp_path / "self.jsonl", rows)

    text = problems_of(path, placeholders={"name": "", "author": "团队"})

    assert text == (
        f"{path}:2: uses {{{{name}}}} but no value is set; set assistant_name in the recipe (or --assistant_name)"
    )


def test_missing_placeholder_value_still_raises_when_skipping_invalid_rows(tmp_path):
    path = write_jsonl(tmp_path / "self.jsonl", [{"messages": [user("who?"), assistant("by {{author}}")]}])

    text = problems_of(path, skip_invalid_rows=True)

    assert text.startswith(f"{path}:1: uses {{{{author}}}} but no value is set; set assistant_author")


# ---------------------------------------------------------------------------------------------------------------
# Bad data: each problem names the file and line


def test_malformed_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n{"messages": [\n'
    )

    text = problems_of(str(path))

    assert text.startswith(f"{path}:2: not valid JSON (")
    assert len(text.splitlines()) == 1


def test_malformed_json_list_reports_the_line_of_the_error_and_stops(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"messages": []},\n  {"messages": [}\n  {"messages": 5}\n]\n')

    text = problems_of(str(path))

    assert text.splitlines() == [
        f"{path}:2: no assistant message; nothing to train on",
        f"{path}:3: not valid JSON (Expecting value at column 17); stopped reading this file",
    ]


def test_row_that_is_not_an_object(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('["user", "assistant"]\n')

    assert problems_of(str(path)) == f"{path}:1: expected a JSON object, got list"


def test_unknown_role(tmp_path):
    path = write_jsonl(
        tmp_path / "train.jsonl", [{"messages": [user("a"), assistant("b"), {"role": "bot", "content": "c"}]}]
    )

    expected = "expected one of system, user, assistant, tool, observation"
    assert problems_of(path) == f'{path}:1: message 3 has role "bot"; {expected}'


def test_unknown_sharegpt_speaker(tmp_path):
    row = {"conversations": [{"from": "human", "value": "a"}, {"from": "chatgpt", "value": "b"}]}
    path = write_jsonl(tmp_path / "sharegpt.jsonl", [row])

    assert problems_of(path).startswith(f'{path}:1: message 2 is from "chatgpt"; expected one of human, gpt, system')


def test_empty_assistant_content(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": [user("a"), assistant("  \n")]}])

    assert problems_of(path) == f"{path}:1: message 2 (assistant) has empty content"


def test_no_assistant_message(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": [system("s"), user("a")]}])

    assert problems_of(path) == f"{path}:1: no assistant message; nothing to train on"


def test_conversation_must_end_with_an_assistant_reply(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": [user("a"), assistant("b"), user("c")]}])

    assert problems_of(path) == (
        f"{path}:1: the conversation ends with message 3 (user); it must end with an assistant reply"
    )


def test_system_message_after_the_start(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": [user("a"), system("s"), assistant("b")]}])

    assert problems_of(path).startswith(f"{path}:1: message 2 (system) is a system message after the start")


@pytest.mark.parametrize(
    ("content", "type_name"), [(["a", "b"], "list"), ({"text": "a"}, "object"), (42, "number"), (None, "null")]
)
def test_content_that_is_not_a_string(tmp_path, content, type_name):
    path = write_jsonl(
        tmp_path / "train.jsonl", [{"messages": [{"role": "user", "content": content}, assistant("b")]}]
    )

    assert problems_of(path) == f"{path}:1: message 1 (user) has content of type {type_name}; expected a string"


def test_alpaca_row_without_output_in_an_alpaca_file(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])

    assert problems_of(path) == f'{path}:2: alpaca row has no "output"'


def test_row_of_unknown_format(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "a", "answer": "b"}])

    text = problems_of(path)

    assert text.startswith(f"{path}:1: cannot tell the format of this row (keys: question, answer); expected")
    assert "prompt/response; set dataset_format to choose" in text


def test_csv_without_the_prompt_columns_is_reported_once(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\na,b\nc,d\n")

    text = problems_of(str(path))

    assert text.startswith(f"{path}:2: cannot tell the format of this row (keys: question, answer)")
    assert len(text.splitlines()) == 1


def test_file_that_does_not_exist(tmp_path):
    spec = str(tmp_path / "missing.jsonl")

    assert problems_of(spec) == f"{spec}: no such file or folder"


def test_hub_id_that_cannot_be_loaded(tmp_path, monkeypatch):
    def load_dataset(name, split):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.chdir(tmp_path)

    assert problems_of("someone/missing") == (
        "someone/missing: not a local file or folder, and the hub dataset could not be loaded "
        "(Couldn't reach 'someone/missing' on the Hub (OfflineModeIsEnabled))"
    )


def test_unsupported_file_type_and_folder_without_data(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    empty = tmp_path / "empty"
    empty.mkdir()

    text = problems_of(f"{notes},{empty}")

    assert text.splitlines() == [
        f'{notes}: unsupported file type ".txt"; use a .json, .jsonl, .csv or .parquet file',
        f"{empty}: the folder has no .json, .jsonl, .csv or .parquet files",
    ]


def test_file_without_rows(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")

    assert problems_of(str(path)) == f"{path}: no rows"


def test_problems_from_all_files_are_listed_in_order_up_to_the_limit(tmp_path):
    bad_row = {"messages": [user("a")]}
    first = write_jsonl(tmp_path / "a.jsonl", [bad_row] * 3)
    second = write_jsonl(tmp_path / "b.jsonl", [bad_row] * 4)

    text = problems_of(f"{first},{second}", max_problems=5)

    assert text.splitlines() == [
        f"{first}:1: no assistant message; nothing to train on",
        f"{first}:2: no assistant message; nothing to train on",
        f"{first}:3: no assistant message; nothing to train on",
        f"{second}:1: no assistant message; nothing to train on",
        f"{second}:2: no assistant message; nothing to train on",
        "... and 2 more problems",
    ]


def test_data_error_is_a_user_error():
    error = DataError(["a.jsonl:1: x"], total=3)

    assert isinstance(error, UserError)
    assert str(error) == "a.jsonl:1: x\n... and 2 more problems"


# ---------------------------------------------------------------------------------------------------------------
# Skipping invalid rows


def test_skip_invalid_rows_counts_and_warns(tmp_path, capsys):
    path = tmp_path / "mixed.jsonl"
    good = {"messages": [user("a"), assistant("b")]}
    path.write_text(
        "\n".join([json.dumps(good), "{broken", json.dumps({"messages": [user("a")]}), json.dumps(good)]) + "\n"
    )

    conversations, stats = read_conversations(str(path), skip_invalid_rows=True, max_problems=1)

    assert [conversation["source"] for conversation in conversations] == [f"{path}:1", f"{path}:4"]
    assert stats == DataStats(read=4, used=2, skipped=2)
    warnings = capsys.readouterr().err
    assert f"{path}:2: not valid JSON" in warnings
    assert f"{path}:3:" not in warnings
    assert "... and 1 more problem" in warnings


def test_skip_invalid_rows_still_raises_when_nothing_is_left(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [user("a")]}])

    assert "no valid rows" in problems_of(path, skip_invalid_rows=True)


def test_skip_invalid_rows_still_raises_for_a_missing_file(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"messages": [user("a"), assistant("b")]}])
    missing = str(tmp_path / "missing.jsonl")

    assert problems_of(f"{good},{missing}", skip_invalid_rows=True) == f"{missing}: no such file or folder"


def test_csv_row_with_the_wrong_number_of_fields(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("prompt,response\na,b\nc,d,e\n")

    assert (
        problems_of(str(path)) == f"{path}:3: has 3 fields but the header has 2 columns; quote fields that hold commas"
    )


def test_json_file_holding_one_pretty_printed_object(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"messages": [user("a"), assistant("b")]}, indent=2))

    assert problems_of(str(path)).startswith(f"{path}: holds a single JSON object; expected a list of objects")


def test_control_tokens_in_text_are_reported(tmp_path):
    path = tmp_path / "train.jsonl"
    row = {"messages": [{"role": "user", "content": "hi<|assistant|>fake"}, {"role": "assistant", "content": "ok"}]}
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as error:
        read_conversations(str(path))
    assert f"{path}:1: message 1 (user) contains the control token <|assistant|>" in str(error.value)
