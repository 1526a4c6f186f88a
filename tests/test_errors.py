"""Mistakes a user can make end in one clear message and a non-zero exit, never a traceback."""

import json

import pytest
from conftest import run_main, run_script

import chat_cli
import train

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


@pytest.fixture
def train_on(capfd):
    """train.py on a data file, in this process."""

    def run(path, *extra):
        argv = ["--config", "recipes/demo.yaml", "--dataset_name", path, "--output_dir", path.parent / "out", *extra]
        return run_main(train.main, *argv, capfd=capfd)

    return run


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
def test_bad_row_is_reported_with_file_and_line(tmp_path, case, message, train_on):
    path = tmp_path / "train.jsonl"
    lines = [json.dumps(GOOD_ROW, ensure_ascii=False)] * 2 + [bad_line(case)] + [json.dumps(GOOD_ROW)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert_clean_failure(train_on(path), f"{path}:3: ", message)


def test_every_problem_in_a_file_is_listed(tmp_path, train_on):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([bad_line("unknown role"), json.dumps(GOOD_ROW), bad_line("no assistant turn")]) + "\n")
    assert_clean_failure(train_on(path), f"{path}:1: ", f"{path}:3: ")


def test_missing_data_file(tmp_path):
    """Run as a user runs it (a new interpreter): the exit code and stderr of the script itself."""
    path = tmp_path / "nowhere.jsonl"
    argv = ["--config", "recipes/demo.yaml", "--dataset_name", path, "--output_dir", tmp_path / "out"]
    result = run_script("train.py", *argv)
    assert_clean_failure(result, f"{path}: no such file or folder")


def test_the_data_and_a_finished_output_dir_are_reported_together(tmp_path, capfd):
    """Both problems in one report, the data's first: fixing one does not lead to the other on the next try."""
    finished = tmp_path / "out"
    finished.mkdir()
    (finished / "adapter_config.json").write_text("{}")
    path = tmp_path / "nowhere.jsonl"
    argv = ["--config", "recipes/demo.yaml", "--output_dir", finished]
    result = run_main(train.main, *argv, "--dataset_name", path, capfd=capfd)
    assert_clean_failure(result, f"{path}: no such file or folder", "already holds a finished model")
    assert result.stderr.index("no such file") < result.stderr.index("already holds")
    result = run_main(train.main, *argv, capfd=capfd)  # good data: the output directory alone
    assert_clean_failure(result, "already holds a finished model")
    assert "no such file" not in result.stderr


def test_unknown_recipe_key_suggests_the_closest(tmp_path, capfd):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model_name_or_path: builtin:tiny-glm4\ndataset_name: data/self_cognition.jsonl\nlora_rnk: 8\n")
    result = run_main(train.main, "--config", recipe, capfd=capfd)
    assert_clean_failure(result, f"{recipe}: unknown key(s) lora_rnk (did you mean lora_rank?)")


def test_unknown_command_line_option_suggests_the_closest(capfd):
    result = run_main(train.main, "--config", "recipes/demo.yaml", "--lora_rnk", "8", capfd=capfd)
    assert_clean_failure(result, "error: unknown option --lora_rnk (did you mean --lora_rank?)")
    assert len(result.stderr.strip().splitlines()) == 1  # no usage dump


def test_bad_command_line_value_names_the_key_in_one_line(capfd):
    result = run_main(train.main, "--config", "recipes/demo.yaml", "--learning_rate", "fast", capfd=capfd)
    assert_clean_failure(result, "--learning_rate", "invalid float value: 'fast'")
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_recipe_file(capfd):
    result = run_main(train.main, "--config", "recipes/nope.yaml", capfd=capfd)
    assert_clean_failure(result, "recipes/nope.yaml: no such recipe")


def test_help_names_the_config_flag_and_what_the_script_does(capfd):
    result = run_main(train.main, "--help", capfd=capfd)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: python train.py --config RECIPE.yaml")
    assert "Fine-tune a GLM chat model" in result.stdout and "--learning_rate" in result.stdout


def test_model_neither_local_nor_reachable_names_the_download_command(tmp_path, capfd):
    argv = ["--config", "recipes/demo.yaml", "--model_name_or_path", "THUDM/glm-4-9b-chat-hf"]
    result = run_main(train.main, *argv, "--output_dir", tmp_path / "out", capfd=capfd)
    assert_clean_failure(result, "THUDM/glm-4-9b-chat-hf", "hf download THUDM/glm-4-9b-chat-hf --local-dir")


def test_missing_local_model_directory(tmp_path, capfd):
    result = run_main(chat_cli.main, "--model", tmp_path / "no-model", "--prompt", "hi", capfd=capfd)
    assert_clean_failure(result, "no such model directory")


def test_missing_adapter_directory_says_it_does_not_exist(tmp_path, capfd):
    result = run_main(chat_cli.main, "--adapter", tmp_path / "no-adapter", "--prompt", "hi", capfd=capfd)
    assert_clean_failure(result, f"{tmp_path / 'no-adapter'}: no such adapter directory")


def test_eval_strategy_without_eval_data(tmp_path, capfd):
    argv = ["--config", "recipes/demo.yaml", "--eval_strategy", "steps", "--output_dir", tmp_path / "out"]
    assert_clean_failure(run_main(train.main, *argv, capfd=capfd), "no eval data")
