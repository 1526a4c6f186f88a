"""The built-in tiny models: deterministic, cached, the family's tokens and architecture."""

import hashlib

from conftest import run_main

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
