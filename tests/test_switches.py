"""Template switches (enable_thinking, clear_thinking, reasoning_effort): the recipe key renders the training rows
with them, the run records the switches its result answers with, and every script that loads the result uses them."""

import json

import pytest
from conftest import REPO, write_jsonl

from glm_sft import UserError
from glm_sft.arguments import parse_recipe
from glm_sft.reasoning import reasoning_samples
from glm_sft.switches import answering_switches, check_switches, family_switches, reasoning_in
from glm_sft.template import FAMILIES, THINKING_FAMILIES, family_template


def test_each_family_takes_the_switches_its_template_reads():
    assert {family: family_switches(family) for family in FAMILIES} == {
        "glm4": (),
        "chatglm3": (),
        "glm4_0414": (),
        "glmz1": (),
        "glm45": ("enable_thinking",),
        "glm46": ("enable_thinking",),
        "glm47": ("enable_thinking", "clear_thinking"),
        "glm5": ("enable_thinking", "clear_thinking"),
        "glm51": ("enable_thinking", "clear_thinking"),
        "glm52": ("enable_thinking", "clear_thinking", "reasoning_effort"),
    }


@pytest.mark.parametrize(
    "switches, family, message",
    [
        ({"reasoning_effort": "high"}, "glm47", "the glm47 template has no switch 'reasoning_effort'"),
        ({"enable_thinking": False}, "glm4", "the glm4 template has no switch 'enable_thinking' (it reads none)"),
        ({"enable_thinking": "no"}, "glm45", "enable_thinking must be true or false, not 'no'"),
        ({"reasoning_effort": 1}, "glm52", "reasoning_effort must be a string, not 1"),
        ({"add_generation_prompt": True}, "glm52", "no switch 'add_generation_prompt'"),
        (["enable_thinking"], "glm45", "must be a mapping"),
    ],
)
def test_a_switch_the_template_does_not_read_is_refused(switches, family, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_switches(switches, family)


def test_the_recipe_key_comes_from_yaml_or_json_on_the_command_line():
    recipe = REPO / "recipes" / "demo_reasoning_glm5.yaml"
    assert parse_recipe(["--config", str(recipe)]).data.chat_template_kwargs == {"reasoning_effort": "high"}
    overridden = parse_recipe(["--config", str(recipe), "--chat_template_kwargs", '{"reasoning_effort": "low"}'])
    assert overridden.data.chat_template_kwargs == {"reasoning_effort": "low"}
    assert overridden.resolved()["chat_template_kwargs"] == {"reasoning_effort": "low"}  # recipe.yaml repeats it
    with pytest.raises(UserError, match="is not JSON"):
        parse_recipe(["--config", str(recipe), "--chat_template_kwargs", "{reasoning_effort: low"])


def test_the_rows_train_rendered_with_the_recipe_switches(capsys):
    """preview shows what training tokenizes: GLM-5.2's rows open with `Reasoning Effort: High` with the switch, and
    the ids are the tokenizer's ids of the text its template renders with it."""
    from glm_sft.loading import load_tokenizer
    from glm_sft.preview import main as preview
    from glm_sft.tokenization import encode_chat

    recipe = ["--config", str(REPO / "recipes" / "demo_reasoning_glm5.yaml"), "--json", "true", "--n", "1"]
    preview(recipe)
    example = json.loads(capsys.readouterr().out.splitlines()[0])
    assert example["text"].startswith("[gMASK]<sop><|system|>Reasoning Effort: High<|user|>12 加 7 等于多少？")
    tokenizer, _ = load_tokenizer("builtin:tiny-glm52")
    row = json.loads((REPO / "data" / "reasoning_demo.jsonl").read_text(encoding="utf-8").splitlines()[0])
    ids, _ = encode_chat(tokenizer, row["messages"], template_kwargs={"reasoning_effort": "high"})
    assert example["input_ids"] == ids
    preview([*recipe, "--chat_template_kwargs", "{}"])
    assert "Reasoning Effort: Max" in json.loads(capsys.readouterr().out.splitlines()[0])["text"]


def _renders(family: str, switches: dict) -> tuple[str, str]:
    """(a reply without reasoning as it trains, the generation prompt under `switches`)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    question, answer = {"role": "user", "content": "你好"}, {"role": "assistant", "content": "您好！"}
    texts = [
        render_jinja_template(
            [messages], chat_template=family_template(family), add_generation_prompt=prompt, **kwargs
        )[0][0]
        for messages, prompt, kwargs in (([question, answer], False, {}), ([question], True, switches))
    ]
    return texts[0], texts[1]


@pytest.mark.parametrize("family", THINKING_FAMILIES)
def test_a_model_trained_without_reasoning_is_prompted_as_its_replies_trained(family):
    """With the switches the result answers with, the generation prompt is the start of a trained reply; GLM-4.7 and
    GLM-5 (prompt `<|assistant|><think>`, trained `<|assistant|></think>`) answer with enable_thinking=false."""
    switches = answering_switches(family, {}, "none")
    assert switches == ({"enable_thinking": False} if family in ("glm47", "glm5") else {})
    trained, prompt = _renders(family, switches)
    if family != "glmz1":  # GLM-Z1's prompt always opens <think>: its thinking cannot be switched off
        assert trained.startswith(prompt), (trained, prompt)
    for reasoning in ("all", "mixed"):  # data with reasoning: the template's default, thinking on
        assert answering_switches(family, {}, reasoning) == {}
    assert answering_switches(family, {"enable_thinking": True}, "none") == {"enable_thinking": True}  # as given


def test_what_the_trained_replies_hold_of_reasoning():
    thinking = {"role": "assistant", "content": "A", "reasoning_content": "R"}
    plain = {"role": "assistant", "content": "A"}
    user = {"role": "user", "content": "Q"}
    assert reasoning_in([{"messages": [user, thinking]}]) == "all"
    assert reasoning_in([{"messages": [user, plain]}]) == "none"
    assert reasoning_in([{"messages": [user, thinking]}, {"messages": [user, plain]}]) == "mixed"
    assert reasoning_in([{"messages": [user, {**plain, "loss": False}, user, thinking]}]) == "all"  # untrained


def test_clear_thinking_false_keeps_every_turns_reasoning_so_rows_are_not_split():
    user = {"role": "user", "content": "Q"}
    thinking = {"role": "assistant", "content": "A", "reasoning_content": "R"}
    row = {"messages": [user, thinking, user, thinking]}
    assert len(reasoning_samples([row], "glm47")) == 2
    assert reasoning_samples([row], "glm47", switches={"clear_thinking": False}) == [row]
    assert len(reasoning_samples([row], "glm45", switches={"clear_thinking": False})) == 2  # 4.5 has no such switch


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, model, reasoning, switches, prompt_end",
    [
        ("demo_reasoning_glm5.yaml", "tiny-glm52", "all", {"reasoning_effort": "high"}, "<|assistant|><think>"),
        ("demo.yaml", "tiny-glm47-flash", "none", {"enable_thinking": False}, "<|assistant|></think>"),
    ],
)
def test_the_result_answers_with_the_switches_it_trained_with(
    recipe, model, reasoning, switches, prompt_end, tmp_path, capfd, monkeypatch
):
    """Two steps in this process: run.json and the model card record the switches, chat_cli's loading path uses
    them, and --chat_template_kwargs overrides them."""
    import argparse

    import export
    import train
    from glm_sft.inference import load_chat_model, load_from_arguments

    monkeypatch.chdir(REPO)
    output_dir = tmp_path / "out"
    plain = {"messages": [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是小智。"}]}
    reasoning_rows = (REPO / "data" / "reasoning_demo.jsonl").read_text(encoding="utf-8").splitlines()[:8]
    rows = [json.loads(line) for line in reasoning_rows] if reasoning == "all" else [plain] * 8
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    argv = ["--config", f"recipes/{recipe}", "--model_name_or_path", f"builtin:{model}", "--dataset_name", data]
    train.main([*argv, "--max_steps", "2", "--sample_count", "0", "--output_dir", str(output_dir)])
    said = "".join(capfd.readouterr())
    assert ("answers with enable_thinking=false by default" in said) == (reasoning == "none")
    facts = json.loads((output_dir / "run.json").read_text(encoding="utf-8"))
    assert facts["reasoning"] == reasoning and facts["chat_template_kwargs"] == switches
    card = (output_dir / "README.md").read_text(encoding="utf-8")
    assert f'"chat_template_kwargs": {json.dumps(switches)}' in card
    chat = load_chat_model(adapter=str(output_dir))
    assert chat.template_kwargs == switches
    messages = [{"role": "user", "content": "你是谁？"}]
    assert chat.tokenizer.decode(chat.prompt_ids(messages)[0]).endswith(prompt_end)
    args = argparse.Namespace(
        model=None, adapter=str(output_dir), template=None, trust_remote_code=False,
        chat_template_kwargs={"enable_thinking": True},
    )  # fmt: skip
    chat = load_from_arguments(args)
    assert chat.template_kwargs == {**switches, "enable_thinking": True}
    assert chat.tokenizer.decode(chat.prompt_ids(messages)[0]).endswith("<|assistant|><think>")
    # The merged export keeps the record: chat_cli --model answers with the same switches; its card gives them.
    exported = tmp_path / "exported"
    export.main([str(output_dir), "--out_dir", str(exported), "--dtype", "fp32"])
    assert json.loads((exported / "run.json").read_text(encoding="utf-8")) == facts
    assert load_chat_model(model=str(exported)).template_kwargs == switches
    card = (exported / "README.md").read_text(encoding="utf-8")
    assert f'"chat_template_kwargs": {json.dumps(switches)}' in card
    assert "".join(f", {key}={value!r}" for key, value in switches.items()) in card  # the usage example passes them


def test_glmz1_replies_without_reasoning_train_after_the_think_its_prompt_opens():
    """GLM-Z1's prompt always opens `<|assistant|>\\n<think>` (no switch): every reply, with reasoning or without,
    trains as the model writes it after that prompt, each as the final reply of a sample of its own."""
    from glm_sft.inference import encode_prompt
    from glm_sft.loading import load_tokenizer
    from glm_sft.tokenization import encode_conversation

    tokenizer, _ = load_tokenizer("builtin:tiny-glmz1")
    user = [{"role": "user", "content": "你好"}, {"role": "user", "content": "你是谁？"}]
    replies = [{"role": "assistant", "content": "您好！"}, {"role": "assistant", "content": "我是小智。"}]
    row = {"messages": [user[0], replies[0], user[1], replies[1]]}
    samples = reasoning_samples([row], "glmz1")
    assert [sample["messages"] for sample in samples] == [
        [user[0], replies[0]],
        [user[0], {**replies[0], "loss": False}, user[1], replies[1]],
    ]
    for sample, answer in zip(samples, ("您好！", "我是小智。"), strict=True):
        encoded = encode_conversation(tokenizer, sample["messages"])
        trained = [token for token in encoded["labels"] if token != -100]
        assert tokenizer.decode(trained) == f"</think>\n{answer}<|user|>"
        prompt = encode_prompt(tokenizer, sample["messages"][:-1])  # what chat_cli sends before this reply
        assert tokenizer.decode(prompt).endswith("<|assistant|>\n<think>")
        assert encoded["input_ids"] == prompt + trained  # the reply trains right where the prompt ends
