"""The built-in tiny models: deterministic, cached, the family's tokens and architecture; each one's demo commands."""

import hashlib
import json
import shlex

import pytest
from conftest import REPO, chat_once, run_main, trained_demo

import chat_cli


def digest(folder):
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def test_same_name_builds_the_same_model_in_a_fresh_cache(tmp_path, monkeypatch):
    import torch

    from glm_sft.builtin import builtin_path

    folders = []
    for name in ("first", "second"):
        monkeypatch.setenv("GLM_SFT_CACHE", str(tmp_path / name))
        torch.manual_seed(len(folders))  # the build seeds itself: what ran before does not matter
        folders.append(builtin_path("builtin:tiny-chatglm3"))
        assert folders[-1].parent == tmp_path / name / "builtin"
    assert digest(folders[0]) == digest(folders[1])
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= set(digest(folders[0]))


def test_tiny_models_are_native_glm_with_grouped_query_attention():
    from transformers import AutoConfig

    from glm_sft.builtin import builtin_path

    for name in ("builtin:tiny-glm4", "builtin:tiny-chatglm3"):
        config = AutoConfig.from_pretrained(builtin_path(name))
        assert config.architectures == ["GlmForCausalLM"] and config.model_type == "glm"
        assert config.num_key_value_heads == 2 and config.rope_parameters["partial_rotary_factor"] == 0.5


def test_chatglm3_tokenizer_keeps_special_tokens_apart_from_text(chatglm3_tokenizer):
    assert chatglm3_tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    ids = chatglm3_tokenizer.encode("[gMASK]sop<|user|>\nsoprano", add_special_tokens=False)
    tokens = chatglm3_tokenizer.convert_ids_to_tokens(ids)
    assert tokens[:3] == ["[gMASK]", "sop", "<|user|>"] and tokens.count("sop") == 1  # "soprano" stays text
    assert chatglm3_tokenizer.decode(ids) == "[gMASK]sop<|user|>\nsoprano"


def test_unknown_builtin_name_is_a_clear_error(capfd):
    result = run_main(chat_cli.main, "--model", "builtin:tiny-llama", "--prompt", "hi", capfd=capfd)
    assert result.returncode == 1 and "unknown built-in model" in result.stderr and "Traceback" not in result.stderr


# ---- every built-in generation's demo, as docs/generations.md gives it ------------------------------------------

GENERATIONS_PAGE = REPO / "docs" / "generations.md"


def documented_demos() -> dict[str, tuple[list[str], list[str]]]:
    """{built-in model: (train.py arguments, chat_cli.py arguments)} from the page's commands, paired by output dir."""
    from test_readme_zh import commands

    trained, demos = {}, {}
    for command in commands(GENERATIONS_PAGE):
        words = shlex.split(command)
        if words[:2] == ["python", "train.py"] and "--model_name_or_path" in words and "--output_dir" in words:
            trained[words[words.index("--output_dir") + 1]] = words[2:]
        elif words[:2] == ["python", "chat_cli.py"] and "--adapter" in words:
            train_args = trained.get(words[words.index("--adapter") + 1])
            if train_args:
                demos[train_args[train_args.index("--model_name_or_path") + 1]] = (train_args, words[2:])
    return demos


def data_answers(prompt: str) -> set[str]:
    """The demo data's replies to `prompt`, with the demo recipe's assistant name and author filled in."""
    answers = set()
    for line in (REPO / "data" / "self_cognition.jsonl").read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        for question, answer in zip(messages, messages[1:], strict=False):
            if question["role"] == "user" and question["content"] == prompt and answer["role"] == "assistant":
                answers.add(answer["content"].replace("{{name}}", "小智").replace("{{author}}", "glm-sft团队"))
    return answers


def test_every_builtin_model_has_its_demo_commands():
    from glm_sft.builtin import builtin_names

    demos = documented_demos()
    assert sorted(demos) == sorted(builtin_names())
    for model, (train_args, chat_args) in demos.items():
        output_dir = train_args[-1]
        demo = ["--config", "recipes/demo.yaml", "--model_name_or_path", model, "--output_dir", output_dir]
        assert train_args == demo
        assert chat_args == ["--adapter", output_dir, "--prompt", "你是谁？"]  # chat_cli's defaults otherwise
    assert len(data_answers("你是谁？")) >= 1


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(documented_demos()))
def test_each_builtin_demo_answers_from_the_data_with_the_cli_defaults(model, tmp_path_factory):
    """The page's two commands, the train.py one in this process (conftest.trained_demo runs exactly those arguments,
    into a temporary output_dir; other modules share its runs), then chat_cli with its defaults."""
    train_args, chat_args = documented_demos()[model]
    assert train_args[:-1] == ["--config", "recipes/demo.yaml", "--model_name_or_path", model, "--output_dir"]
    output_dir, _ = trained_demo(tmp_path_factory, model)
    at = chat_args.index("--adapter") + 1
    reply = chat_once(*chat_args[:at], output_dir, *chat_args[at + 1 :])
    assert reply.strip() in data_answers("你是谁？"), reply
