"""chat_cli's context handling."""

import chat_cli

SYSTEM = {"role": "system", "content": "系统提示"}


def rounds(count):
    messages = []
    for index in range(count):
        messages += [
            {"role": "user", "content": f"问题{index} " * 10},
            {"role": "assistant", "content": f"回答{index} " * 10},
        ]
    return messages


def test_long_history_drops_the_oldest_rounds_and_keeps_the_system_prompt(glm4_tokenizer):
    messages = [SYSTEM, *rounds(6), {"role": "user", "content": "最后的问题"}]
    full = glm4_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    budget = len(full) // 2
    ids, kept = chat_cli.fit_history(glm4_tokenizer, messages, budget)
    assert len(ids) <= budget
    assert kept[0] == SYSTEM and kept[-1] == messages[-1]
    assert kept[1:] == messages[len(messages) - len(kept) + 1 :]  # a suffix: the newest rounds
    assert kept[1]["role"] == "user"  # whole rounds dropped, never half of one
    expected = glm4_tokenizer.apply_chat_template(kept, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == expected


def test_history_that_fits_is_untouched(glm4_tokenizer):
    messages = [SYSTEM, *rounds(2), {"role": "user", "content": "最后的问题"}]
    ids, kept = chat_cli.fit_history(glm4_tokenizer, messages, 10_000)
    assert kept == messages
