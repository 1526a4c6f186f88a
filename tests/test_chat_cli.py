"""Fitting a conversation into the model's context (glm_sft.inference, shared by chat_cli, evaluate and samples), and
chat_cli's display of a thinking family's reasoning and its --enable_thinking switch."""

import io

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


# ---- a thinking family's reasoning, and --enable_thinking ----


class ThinkingChat:
    """A stand-in for a thinking family's ChatModel: streams fixed reasoning and answer parts, records the settings."""

    family, thinks = "glm45", True

    def __init__(self, parts=(("reasoning", "3 加 4"), ("reasoning", " 是 7。"), ("answer", "等于 7。"))):
        self.parts, self.settings, self.template_kwargs = list(parts), [], {}

    def stream_parts(self, messages, **settings):
        self.settings.append(settings)
        yield from self.parts


class Terminal(io.StringIO):
    def isatty(self):
        return True


def chat_args(*argv):
    import chat_cli

    return chat_cli.parse_args(["--model", "builtin:tiny-glm45", *argv])


def test_enable_thinking_takes_true_or_false_and_defaults_to_the_template_s(capsys):
    assert chat_args().enable_thinking is None
    assert chat_args("--enable_thinking", "false").enable_thinking is False
    assert chat_args("--enable-thinking", "True").enable_thinking is True
    with pytest.raises(SystemExit):
        chat_args("--enable_thinking", "maybe")
    assert "expected true or false, not 'maybe'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("stream", "shown"),
    [
        (Terminal(), "\033[2m3 加 4 是 7。\033[0m\n等于 7。"),  # dimmed on a terminal
        (io.StringIO(), "thinking:\n3 加 4 是 7。\n\nanswer:\n等于 7。"),  # under headings in a pipe or a file
    ],
)
def test_reasoning_is_shown_apart_from_the_answer_and_kept_in_the_history(stream, shown):
    import chat_cli

    messages = [{"role": "user", "content": "3+4?"}]
    reply = chat_cli.answer(ThinkingChat(), messages, chat_args(), None, stream=stream)
    assert stream.getvalue() == shown
    assert reply == "等于 7。"
    assert messages[-1] == {"role": "assistant", "content": "等于 7。", "reasoning_content": "3 加 4 是 7。"}


def test_one_shot_output_puts_the_reasoning_and_the_answer_under_headings():
    import chat_cli

    reply = chat_cli.answer(ThinkingChat(), [{"role": "user", "content": "3+4?"}], chat_args(), None)
    assert reply == "thinking:\n3 加 4 是 7。\n\nanswer:\n等于 7。"
    only_answer = ThinkingChat([("answer", "等于 7。")])
    assert chat_cli.answer(only_answer, [{"role": "user", "content": "3+4?"}], chat_args(), None) == "等于 7。"


def test_a_reply_cut_in_its_reasoning_leaves_the_terminal_undimmed():
    import chat_cli

    terminal = Terminal()
    chat_cli.answer(ThinkingChat([("reasoning", "想到一半")]), [], chat_args(), None, stream=terminal)
    assert terminal.getvalue() == "\033[2m想到一半\033[0m"


def test_enable_thinking_reaches_every_prompt(monkeypatch, capsys):
    import chat_cli

    chat = ThinkingChat()
    monkeypatch.setattr(chat_cli, "load_from_arguments", lambda args: chat)
    chat_cli.main(["--model", "builtin:tiny-glm45", "--enable_thinking", "false", "--prompt", "3+4?"])
    assert chat.template_kwargs == {"enable_thinking": False}
    assert capsys.readouterr().out.startswith("thinking:\n")


def test_enable_thinking_true_is_an_error_for_a_family_that_does_not_think(capsys):
    import chat_cli

    with pytest.raises(SystemExit) as exit_info:
        chat_cli.main(["--model", "builtin:tiny-glm4", "--enable_thinking", "true", "--prompt", "你好"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == "error: --enable_thinking true: glm4 models have no thinking mode"


def test_model_template_switches_reach_the_rendered_prompt(glm4_tokenizer, monkeypatch):
    """ChatModel.template_kwargs (and a call's own) go into every prompt it renders, as apply_chat_template's."""
    import glm_sft.inference as inference
    from glm_sft.inference import ChatModel

    seen = []

    def encode_chat(tokenizer, messages, **kwargs):
        seen.append(kwargs["template_kwargs"])
        return [1], [0]

    monkeypatch.setattr(inference, "encode_chat", encode_chat)
    model = type("Model", (), {"config": type("Config", (), {"max_position_embeddings": 64})()})()
    chat = ChatModel(model, glm4_tokenizer, "glm45", [0], template_kwargs={"enable_thinking": False})
    chat.prompt_ids([{"role": "user", "content": "hi"}])
    chat.prompt_ids([{"role": "user", "content": "hi"}], template_kwargs={"enable_thinking": True, "x": 1})
    assert seen == [{"enable_thinking": False}, {"enable_thinking": True, "x": 1}]


def test_batched_generation_gives_a_thinking_family_s_answers_without_the_reasoning(glm4_tokenizer):
    """evaluate and samples score the answer: for a thinking family the <think> block is split off."""
    written = glm4_tokenizer.encode("\n<think>先算 3+4。</think>\n等于 7。", add_special_tokens=False)

    class ThinkingModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.config = type("Config", (), {"max_position_embeddings": 256})()

        def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
            reply = torch.tensor([[*written, kwargs["eos_token_id"][0]]] * input_ids.shape[0])
            return torch.cat([input_ids, reply], dim=1)

    prompts = [{"messages": [{"role": "user", "content": "3+4?"}]}]
    stop = [glm4_tokenizer.convert_tokens_to_ids("<|user|>")]
    settings = dict(stop_ids=stop, max_new_tokens=8, batch_size=1)
    assert generate_replies(ThinkingModel(), glm4_tokenizer, prompts, family="glm45", **settings) == ["等于 7。"]
    assert generate_replies(ThinkingModel(), glm4_tokenizer, prompts, **settings) == [
        "<think>先算 3+4。</think>\n等于 7。"
    ]
