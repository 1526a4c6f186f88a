"""Mistakes a user can make end in one clear message and a non-zero exit, never a traceback."""

import json

import pytest
from conftest import run_script

GOOD_ROW = {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]}


def bad_line(case):
    if case == "malformed JSON line":
        return '{"messages": [{"role": "user", "content": "hi"}'
    messages = {
        "unknown role": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}],
        "empty assistant content": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}],
        "no assistant turn": [{"role": "user", "content": "hi"}],
        "non-string content": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "hello"}],
    }[case]
    return json.dumps({"messages": messages}, ensure_ascii=False)


def train_on(path, *extra):
    return run_script(
        "train.py",
        "--config",
        "recipes/demo.yaml",
        "--dataset_name",
        path,
        "--output_dir",
        path.parent / "out",
        *extra,
    )


def assert_clean_failure(result, *expected):
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr[-2000:]
    assert "Loading weights" not in result.stderr  # stopped before any model was loaded


@pytest.mark.parametrize(
    "case, message",
    [
        ("malformed JSON line", "not valid JSON"),
        ("unknown role", 'role "bot"'),
        ("empty assistant content", "empty content"),
        ("no assistant turn", "no assistant message"),
        ("non-string content", "content of type list"),
    ],
)
def test_bad_row_is_reported_with_file_and_line(tmp_path, case, message):
    path = tmp_path / "train.jsonl"
    lines = [json.dumps(GOOD_ROW, ensure_ascii=False)] * 2 + [bad_line(case)] + [json.dumps(GOOD_ROW)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert_clean_failure(train_on(path), f"{path}:3: ", message)


def test_every_problem_in_a_file_is_listed(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([bad_line("unknown role"), json.dumps(GOOD_ROW), bad_line("no assistant turn")]) + "\n")
    assert_clean_failure(train_on(path), f"{path}:1: ", f"{path}:3: ")


def test_missing_data_file(tmp_path):
    path = tmp_path / "nowhere.jsonl"
    assert_clean_failure(train_on(path), f"{path}: no such file or folder")


def test_unknown_recipe_key(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model_name_or_path: builtin:tiny-glm4\ndataset_name: data/self_cognition.jsonl\nlora_rnk: 8\n")
    result = run_script("train.py", "--config", recipe)
    assert_clean_failure(result, f"{recipe}: unknown key(s) lora_rnk")


def test_unknown_command_line_option():
    result = run_script("train.py", "--config", "recipes/demo.yaml", "--lora_rnk", "8")
    assert result.returncode != 0 and "lora_rnk" in result.stderr and "Traceback" not in result.stderr


def test_missing_recipe_file():
    assert_clean_failure(run_script("train.py", "--config", "recipes/nope.yaml"), "recipes/nope.yaml: no such recipe")


def test_model_neither_local_nor_reachable_names_the_download_command(tmp_path):
    result = run_script(
        "train.py",
        "--config",
        "recipes/demo.yaml",
        "--model_name_or_path",
        "THUDM/glm-4-9b-chat-hf",
        "--output_dir",
        tmp_path / "out",
    )
    assert_clean_failure(result, "THUDM/glm-4-9b-chat-hf", "hf download THUDM/glm-4-9b-chat-hf --local-dir")


def test_missing_local_model_directory(tmp_path):
    result = run_script("chat_cli.py", "--model", tmp_path / "no-model", "--prompt", "hi")
    assert_clean_failure(result, "no such model directory")


def test_eval_strategy_without_eval_data(tmp_path):
    result = run_script(
        "train.py", "--config", "recipes/demo.yaml", "--eval_strategy", "steps", "--output_dir", tmp_path / "out"
    )
    assert_clean_failure(result, "no eval data")
