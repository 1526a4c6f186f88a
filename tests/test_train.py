"""End to end on the tiny models: train with the demo recipe, chat with the result, and the other methods."""

import ast
import json
import re

import pytest
import yaml
from conftest import REPO, chat_once, run_main, run_script, trained_demo

WHO_ANSWER = "您好，我是小智，一个由glm-sft团队开发的人工智能助手，很高兴为您提供帮助。"


def logged_losses(output: str) -> list[float]:
    """The training losses from the trainer's log lines, in order."""
    losses = []
    for line in output.splitlines():
        start = line.find("{'loss'")
        if start >= 0:
            losses.append(float(ast.literal_eval(line[start : line.index("}", start) + 1])["loss"]))
    return losses


def trainable_and_total(output: str) -> tuple[int, int]:
    match = re.search(r"trainable parameters: ([\d,]+) of ([\d,]+)", output)
    return int(match[1].replace(",", "")), int(match[2].replace(",", ""))


@pytest.fixture(scope="module", params=["builtin:tiny-glm4", "builtin:tiny-chatglm3"])
def demo_run(request, tmp_path_factory):
    """The demo recipe, trained once per family (shared with other modules: conftest.trained_demo)."""
    output_dir, result = trained_demo(tmp_path_factory, request.param)
    return request.param, output_dir, result


def test_demo_loss_goes_down(demo_run):
    _, _, result = demo_run
    losses = logged_losses(result.stdout + result.stderr)
    assert len(losses) >= 5
    assert losses[-1] < losses[0] / 10


def test_demo_writes_adapter_tokenizer_stop_ids_and_recipe(demo_run):
    model_name, output_dir, result = demo_run
    adapter_config = json.loads((output_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == model_name  # the adapter knows its base
    assert (output_dir / "adapter_model.safetensors").is_file()
    recipe = yaml.safe_load((output_dir / "recipe.yaml").read_text())
    assert recipe["model_name_or_path"] == model_name and recipe["lora_rank"] == 16
    assert recipe["assistant_name"] == "小智"

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    family_stops = (
        ["<|endoftext|>", "<|user|>", "<|observation|>"]
        if "glm4" in model_name
        else ["</s>", "<|user|>", "<|observation|>"]
    )
    generation = json.loads((output_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids(family_stops)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True
    )
    assert text == ("[gMASK]<sop>" if "glm4" in model_name else "[gMASK]sop") + "<|user|>\n你好<|assistant|>"
    trainable, total = trainable_and_total(result.stdout)
    assert 0 < trainable < total / 10  # LoRA trains a small fraction
    assert "85 rows read" in result.stderr


def test_demo_adapter_answers_who_are_you(demo_run):
    _, output_dir, _ = demo_run
    assert chat_once("--adapter", output_dir, "--prompt", "你是谁？", "--temperature", "0") == WHO_ANSWER + "\n"


def test_chat_repl_multi_turn_clear_and_exit(demo_run):
    _, output_dir, _ = demo_run
    session = "你是谁？\nclear\n你是谁？\nexit\n"
    result = run_script("chat_cli.py", "--adapter", output_dir, "--temperature", "0", input=session)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(WHO_ANSWER) == 2
    assert "(new conversation)" in result.stdout


def test_rerun_into_a_finished_output_dir_is_refused(demo_run, capfd, monkeypatch):
    import train

    _, output_dir, _ = demo_run
    before = (output_dir / "adapter_model.safetensors").read_bytes()
    monkeypatch.chdir(REPO)
    result = run_main(train.main, "--config", "recipes/demo.yaml", "--output_dir", output_dir, capfd=capfd)
    assert result.returncode == 1
    assert "already holds a finished model" in result.stderr and "--overwrite_output_dir" in result.stderr
    assert "Traceback" not in result.stderr
    assert (output_dir / "adapter_model.safetensors").read_bytes() == before


def test_saved_recipe_repeats_the_run(demo_run, capfd, monkeypatch):
    from glm_sft.preview import main as preview

    model_name, output_dir, _ = demo_run
    saved = yaml.safe_load((output_dir / "recipe.yaml").read_text())
    assert "resume_from_checkpoint" not in saved and saved["output_dir"] == str(output_dir)
    monkeypatch.chdir(REPO)
    previews = []
    for config in ("recipes/demo.yaml", output_dir / "recipe.yaml"):
        result = run_main(preview, "--config", config, "--model_name_or_path", model_name, "--json", capfd=capfd)
        assert result.returncode == 0, result.stderr[-3000:]
        previews.append(result.stdout)
    assert previews[0] == previews[1] and previews[0].count("\n") == 3
