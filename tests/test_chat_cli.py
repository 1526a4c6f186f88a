"""Fitting a conversation into the model's context (glm_sft.inference, shared by chat_cli, evaluate and samples)."""

import pytest
import torch

from glm_sft import UserError
from glm_sft.inference import fit_prompt, generate_replies

SYSTEM = {"role": "system", "content": "系统提示"}


def rounds(count):
    messages = []
    for index in range(count):
        messages += [
            {"role": "user", "content": f"问题{index} " * 10},
            {"role": "assistant", "content": f"回答{index} " * 10},
        ]
    return messages


def prompt_of(tokenizer, messages, tools=None):
    return tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False
    )


def test_long_history_drops_the_oldest_rounds_and_keeps_the_system_prompt(glm4_tokenizer):
    messages = [SYSTEM, *rounds(6), {"role": "user", "content": "最后的问题"}]
    budget = len(prompt_of(glm4_tokenizer, messages)) // 2
    ids, kept = fit_prompt(glm4_tokenizer, messages, budget)
    assert len(ids) <= budget
    assert kept[0] == SYSTEM and kept[-1] == messages[-1]
    assert kept[1:] == messages[len(messages) - len(kept) + 1 :]  # a suffix: the newest rounds
    assert kept[1]["role"] == "user"  # whole rounds dropped, never half of one
    assert ids == prompt_of(glm4_tokenizer, kept)


def test_history_that_fits_is_untouched(glm4_tokenizer):
    messages = [SYSTEM, *rounds(2), {"role": "user", "content": "最后的问题"}]
    ids, kept = fit_prompt(glm4_tokenizer, messages, 10_000)
    assert kept == messages and ids == prompt_of(glm4_tokenizer, messages)


def test_one_long_question_keeps_the_format_prefix_the_system_prompt_and_its_end(family_and_tokenizer):
    """A single question longer than the budget loses its beginning, never [gMASK]<sop> or the system prompt."""
    family, tokenizer = family_and_tokenizer
    messages = [SYSTEM, {"role": "user", "content": "很长的问题，" * 200 + "最后一句"}]
    full = prompt_of(tokenizer, messages)
    prefix = tokenizer.apply_chat_template([SYSTEM], tokenize=True, return_dict=False)
    budget = len(prefix) + 20
    ids, kept = fit_prompt(tokenizer, messages, budget)
    assert len(ids) == budget and kept == messages
    assert ids[: len(prefix)] == prefix  # [gMASK]<sop> (sop for ChatGLM3) and the system prompt
    assert tokenizer.decode(ids[:2]) == ("[gMASK]<sop>" if family == "glm4" else "[gMASK]sop")
    assert tokenizer.convert_ids_to_tokens(ids[len(prefix)]) == "<|user|>"
    assert ids[len(prefix) + 1 :] == full[-(budget - len(prefix) - 1) :]  # the end of the question, <|assistant|>
    assert tokenizer.convert_ids_to_tokens(ids[-1]) == "<|assistant|>"


def test_a_system_prompt_longer_than_the_context_is_a_clear_error(glm4_tokenizer):
    messages = [{"role": "system", "content": "规则。" * 100}, {"role": "user", "content": "你好"}]
    with pytest.raises(UserError, match="the system prompt and tools take"):
        fit_prompt(glm4_tokenizer, messages, 20)


def test_batched_generation_fits_long_prompts_the_same_way(glm4_tokenizer):
    """generate_replies (evaluate, do_predict, samples) hands the model the fitted prompt, prefix and system kept."""
    seen = []

    class RecordingModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.config = type("Config", (), {"max_position_embeddings": 64})()

        def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
            seen.append(
                [token for token, keep in zip(input_ids[0].tolist(), attention_mask[0].tolist(), strict=True) if keep]
            )
            return torch.cat([input_ids, torch.full((input_ids.shape[0], 1), kwargs["eos_token_id"][0])], dim=1)

    messages = [SYSTEM, {"role": "user", "content": "很长的问题，" * 200}]
    generate_replies(
        RecordingModel(), glm4_tokenizer, [{"messages": messages}], stop_ids=[0], max_new_tokens=8, batch_size=1
    )
    assert seen == [fit_prompt(glm4_tokenizer, messages, 64 - 8)[0]]
    assert glm4_tokenizer.decode(seen[0]).startswith("[gMASK]<sop><|system|>\n系统提示<|user|>")
