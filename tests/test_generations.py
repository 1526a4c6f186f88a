"""The newer GLM generations end to end: the family from the checkpoint (model type + shipped template, the probe
check), the output directory shipping the checkpoint's own template, reasoning data and its split, MoE LoRA."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO, build_run, glm_moe_dsa_tokenizer_dir, write_jsonl

from glm_sft import UserError
from glm_sft.builtin import builtin_path
from glm_sft.loading import load_tokenizer
from glm_sft.reasoning import reasoning_samples
from glm_sft.template import IGNORE_INDEX, MODEL_TYPE_FAMILIES, THINKING_FAMILIES, template_difference
from glm_sft.tokenization import encode_conversation

BUILTIN_FAMILIES = {
    "builtin:tiny-glm4": ("glm4", "GlmForCausalLM"),
    "builtin:tiny-chatglm3": ("chatglm3", "GlmForCausalLM"),
    "builtin:tiny-glm4-0414": ("glm4_0414", "Glm4ForCausalLM"),
    "builtin:tiny-glmz1": ("glmz1", "Glm4ForCausalLM"),
    "builtin:tiny-glm45": ("glm45", "Glm4MoeForCausalLM"),
    "builtin:tiny-glm47-flash": ("glm47", "Glm4MoeLiteForCausalLM"),
    "builtin:tiny-glm5": ("glm5", "GlmMoeDsaForCausalLM"),
    "builtin:tiny-glm52": ("glm52", "GlmMoeDsaForCausalLM"),
}


@pytest.mark.parametrize("name", list(BUILTIN_FAMILIES))
def test_each_builtin_model_is_its_generation_and_gets_its_family(name):
    family, architecture = BUILTIN_FAMILIES[name]
    config = json.loads((builtin_path(name) / "config.json").read_text())
    assert config["architectures"] == [architecture]
    tokenizer, detected = load_tokenizer(name)
    assert detected == family
    assert tokenizer.shipped_chat_template, "every built-in tokenizer ships a template, as the chat checkpoints do"


def copy_of(name: str, tmp_path: Path, edit=None) -> Path:
    """A directory copy of a built-in model, its shipped template optionally edited by `edit(text) -> text`."""
    target = tmp_path / name.split(":")[-1]
    shutil.copytree(builtin_path(name), target)
    if edit is not None:
        template_file = target / "chat_template.jinja"
        template_file.write_text(edit(template_file.read_text(encoding="utf-8")), encoding="utf-8")
    return target


def test_an_edited_template_stops_with_the_first_differing_characters(tmp_path):
    edited = copy_of("builtin:tiny-glm4-0414", tmp_path, lambda text: text + "{{- ' edited' -}}")
    with pytest.raises(UserError) as error:
        load_tokenizer(str(edited))
    message = str(error.value)
    assert "(a glm4 checkpoint) is none of the released formats; nearest is glm4_0414" in message
    assert "at character" in message and "shipped template gives" in message
    assert "set template: glm4_0414" in message


def test_naming_the_template_trains_in_our_format_with_a_warning(tmp_path, capsys):
    edited = copy_of("builtin:tiny-glm45", tmp_path, lambda text: text + "{{- ' edited' -}}")
    tokenizer, family = load_tokenizer(str(edited), template="glm45")
    assert family == "glm45"
    assert "warning: training in the glm45 format" in capsys.readouterr().err
    with pytest.raises(UserError, match="does not fit"):
        load_tokenizer(str(edited), template="glm4_0414")  # a Glm4Moe checkpoint is not a GLM-4-0414 one


def test_a_glm4_0414_directory_trains_in_its_format_and_ships_its_own_template(tmp_path):
    model = copy_of("builtin:tiny-glm4-0414", tmp_path)
    out = tmp_path / "out"
    run = build_run(
        ["--config", "recipes/demo.yaml", "--model_name_or_path", str(model), "--output_dir", str(out)]
        + ["--max_steps", "2", "--report_to", "none", "--sample_count", "0"]
    )
    assert run.family == "glm4_0414"
    assert "(glm4_0414 format)" in run.summary()
    run.train()
    run.save()
    shipped = (model / "chat_template.jinja").read_text(encoding="utf-8")
    assert (out / "chat_template.jinja").read_text(encoding="utf-8") == shipped
    assert load_tokenizer(str(out))[1] == "glm4_0414"


def test_a_base_checkpoint_without_template_gets_its_generations_format(tmp_path):
    model = copy_of("builtin:tiny-glm45", tmp_path)
    (model / "chat_template.jinja").unlink()
    config_file = model / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    config_file.write_text(json.dumps(config))
    tokenizer, family = load_tokenizer(str(model))
    assert family == "glm45" and not tokenizer.shipped_chat_template


def test_the_probe_check_tells_the_generations_apart():
    shipped = (REPO / "glm_sft" / "templates" / "released" / "glm45.jinja").read_text(encoding="utf-8")
    assert template_difference(shipped, "glm45") is None
    assert template_difference(shipped, "glmz1") is not None


# --- reasoning data ---

MULTI_TURN = [
    {"role": "user", "content": "3+4?"},
    {"role": "assistant", "reasoning_content": "three plus four is seven", "content": "7"},
    {"role": "user", "content": "and times 2?"},
    {"role": "assistant", "reasoning_content": "seven times two is fourteen", "content": "14"},
]


def test_reasoning_dropped_from_history_becomes_its_own_sample():
    row = {"messages": MULTI_TURN, "source": "data.jsonl:1"}
    first, full = reasoning_samples([row], "glm45")
    assert first["messages"] == MULTI_TURN[:2]  # the first round, its reasoning kept and trained
    assert full["messages"][1]["loss"] is False  # trained in its own sample, not again without its reasoning
    assert "loss" not in full["messages"][3]
    assert [sample["source"] for sample in (first, full)] == ["data.jsonl:1"] * 2
    # GLM-Z1 keeps reasoning only in the final reply: the same split here.
    assert len(reasoning_samples([row], "glmz1")) == 2
    # A row without earlier reasoning stays one sample.
    plain = {"messages": MULTI_TURN[:1] + [{"role": "assistant", "content": "7"}] + MULTI_TURN[2:]}
    assert reasoning_samples([plain], "glm45") == [plain]


def test_reasoning_for_a_family_without_thinking_names_the_rows():
    rows = [{"messages": MULTI_TURN, "source": "data/r.jsonl:4"}]
    with pytest.raises(UserError, match=r"data/r.jsonl:4: assistant messages with reasoning .* glm4 format has no"):
        reasoning_samples(rows, "glm4")
    with pytest.raises(UserError, match="glm4 format has no thinking"):  # training only the last turn changes nothing
        reasoning_samples(rows, "glm4", last_turn_only=True)
    assert reasoning_samples(rows, "glm45", last_turn_only=True) == rows  # the final reply keeps its reasoning


def test_every_trained_token_of_a_split_row_is_what_the_model_writes_with_that_history():
    """Each sample's trained text equals the reply as the template renders it when that reply is the last turn."""
    tokenizer, family = load_tokenizer("builtin:tiny-glm45")
    samples = reasoning_samples([{"messages": MULTI_TURN}], family)
    trained = []
    for sample in samples:
        encoded = encode_conversation(tokenizer, sample["messages"])
        trained.append(tokenizer.decode([token for token in encoded["labels"] if token != IGNORE_INDEX]))
    assert trained == [
        "\n<think>three plus four is seven</think>\n7<|user|>",
        "\n<think>seven times two is fourteen</think>\n14<|user|>",
    ]


def test_reasoning_rows_read_from_both_spellings(tmp_path):
    from glm_sft.data import read_conversations

    path = tmp_path / "r.jsonl"
    write_jsonl(
        path,
        [
            {
                "messages": [
                    {"role": "user", "content": "1+1?"},
                    {"role": "assistant", "content": "<think>\nadd\n</think>\n\n2"},
                ]
            },
            {
                "messages": [
                    {"role": "user", "content": "1+2?"},
                    {"role": "assistant", "reasoning_content": "add", "content": "3"},
                ]
            },
        ],
    )
    rows, _ = read_conversations(str(path))
    assert [row["messages"][1] for row in rows] == [
        {"role": "assistant", "content": "2", "reasoning_content": "add"},
        {"role": "assistant", "content": "3", "reasoning_content": "add"},
    ]
    write_jsonl(
        path,
        [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a <think>x</think> b"}]}],
    )
    with pytest.raises(UserError, match=r"r.jsonl:1: message 2 \(assistant\) has a <think> block that is not"):
        read_conversations(str(path))


@pytest.mark.parametrize("family", THINKING_FAMILIES)
def test_thinking_families_train_the_reasoning_and_the_answer(family, tmp_path):
    name = {"glmz1": "builtin:tiny-glmz1", "glm47": "builtin:tiny-glm47-flash"}.get(family, "builtin:tiny-glm45")
    if family in MODEL_TYPE_FAMILIES["glm_moe_dsa"]:
        name = str(glm_moe_dsa_tokenizer_dir(tmp_path / family, family))
    tokenizer, detected = load_tokenizer(name, template=family)
    assert detected == family
    encoded = encode_conversation(tokenizer, MULTI_TURN[:2])
    text = tokenizer.decode([token for token in encoded["labels"] if token != IGNORE_INDEX])
    assert "three plus four is seven" in text and text.endswith("7<|user|>")


# --- mixture of experts ---


def test_moe_lora_covers_attention_mlps_and_experts_and_takes_dropout(tmp_path):
    argv = ["--config", "recipes/demo.yaml", "--model_name_or_path", "builtin:tiny-glm45", "--lora_dropout", "0.1"]
    argv += ["--output_dir", str(tmp_path / "out"), "--report_to", "none", "--max_steps", "1"]
    summary = build_run(argv).summary()
    scope = next(line for line in summary.splitlines() if line.startswith("LoRA on ")).removeprefix("LoRA on ")
    assert scope.split(", ") == [
        *(f"self_attn.{name}" for name in ("q_proj", "k_proj", "v_proj", "o_proj")),
        *(f"mlp.{name}" for name in ("gate_proj", "up_proj", "down_proj")),  # the dense layer
        "mlp.experts.down_proj",
        "mlp.experts.gate_up_proj",
        *(f"mlp.shared_experts.{name}" for name in ("gate_proj", "up_proj", "down_proj")),
    ]  # no router (mlp.gate) unless lora_target names it
    with pytest.raises(UserError, match="names the router"):
        build_run([*argv[:-6], "--lora_target", "q_proj,gate", "--output_dir", str(tmp_path / "out2")])


# --- tool calls round trip, acceptance runs ---

WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "查询天气",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
        },
    }
]


@pytest.mark.parametrize("family", ["glm45", "glm46", "glm47"])
def test_an_xml_tool_row_round_trips_through_parse_reply(family):
    """What the template trains for a call (the generated span, end token cut) reads back as the same calls."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from glm_sft.replies import parse_reply, tool_call
    from glm_sft.template import family_template

    calls = [("get_weather", {"city": "北京", "days": 2}), ("get_weather", {"city": "上海", "days": 1})]
    messages = [
        {"role": "user", "content": "北京和上海的天气？"},
        {
            "role": "assistant",
            "content": "我来查一下。",
            "tool_calls": [tool_call(name, args) for name, args in calls],
        },
    ]
    rendered, spans = render_jinja_template(
        [messages], tools=WEATHER_TOOLS, chat_template=family_template(family), return_assistant_tokens_mask=True,
        close_final_turn=True,
    )  # fmt: skip
    start, end = spans[0][-1]
    generated = rendered[0][start:end]
    assert generated.endswith("<|observation|>")
    reply = parse_reply(generated[: -len("<|observation|>")], family, tools=WEATHER_TOOLS)
    assert reply.calls == [{"name": name, "arguments": args} for name, args in calls]
    assert reply.content == "我来查一下。"


@pytest.mark.slow
def test_the_glm5_demo_answers_from_the_data_and_its_merged_export_replies_alike_in_plain_transformers(
    tmp_path_factory,
):
    """builtin:tiny-glm5 (GlmMoeDsaForCausalLM: latent attention, the DSA indexer, experts) trains on the demo recipe
    in GLM-5's format; the merged export loads in plain transformers and writes what chat_cli writes."""
    import torch
    from conftest import chat_once, trained_demo
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import export

    output_dir, result = trained_demo(tmp_path_factory, "builtin:tiny-glm5")
    assert "(glm5 format)" in result.stderr + result.stdout
    assert "q_a_proj" in result.stdout + result.stderr  # the LoRA targets: latent attention among them
    # Trained without reasoning: chat_cli answers with enable_thinking=false by itself (run.json), as it trained.
    reply = chat_once("--adapter", output_dir, "--prompt", "你是谁？", "--temperature", "0")
    assert "小智" in reply and "thinking:" not in reply
    merged = tmp_path_factory.mktemp("glm5-export") / "merged"
    export.main([str(output_dir), "--out_dir", str(merged), "--dtype", "fp32"])
    model = AutoModelForCausalLM.from_pretrained(merged)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert type(model).__name__ == "GlmMoeDsaForCausalLM"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "你是谁？"}],
        add_generation_prompt=True,
        enable_thinking=False,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=64, do_sample=False)
    written = tokenizer.decode(output[0][prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert written.strip() == reply.strip()


@pytest.mark.slow
def test_the_reasoning_demo_thinks_then_answers_and_chat_shows_them_apart(tmp_path):
    """The tiny GLM-4.5 model (MoE) learns the reasoning demo and answers from the data (the other MoE generations'
    demo: the GLM-5 test above)."""
    from conftest import chat_once, train_in_process

    output_dir = tmp_path / "reasoning"
    result = train_in_process("--config", "recipes/demo_reasoning.yaml", "--output_dir", output_dir)
    assert "(glm45 format)" in result.stderr + result.stdout
    shown = chat_once("--adapter", output_dir, "--prompt", "12 加 7 等于多少？", "--temperature", "0")
    thinking, _, answer = shown.partition("answer:")
    assert thinking.startswith("thinking:") and "个位" in thinking, shown
    assert "19" in answer and "个位" not in answer, shown


@pytest.mark.parametrize(
    "name", [name for name in BUILTIN_FAMILIES if BUILTIN_FAMILIES[name][0] not in ("glm4", "chatglm3")]
)
def test_labels_are_exactly_the_templates_generated_spans_token_by_token(name):
    """Every family's tokens: the trained ids are the ids of the template's generation spans and nothing else, and
    the ids of the whole row are the tokenizer's ids of the rendered text."""
    from transformers.utils.chat_template_utils import render_jinja_template

    tokenizer, family = load_tokenizer(name)
    messages = (
        MULTI_TURN
        if family in THINKING_FAMILIES
        else [{k: v for k, v in m.items() if k != "reasoning_content"} for m in MULTI_TURN]
    )
    encoded = encode_conversation(tokenizer, messages)
    rendered, spans = render_jinja_template(
        [messages], chat_template=tokenizer.chat_template, return_assistant_tokens_mask=True, close_final_turn=True
    )
    text = rendered[0]
    assert encoded["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    trained = [(token, label) for token, label in zip(encoded["input_ids"], encoded["labels"], strict=True)]
    assert all(label in (IGNORE_INDEX, token) for token, label in trained)
    runs, current = [], []
    for token, label in trained:  # the trained runs, in order
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs, current = [*runs, current], []
    runs += [current] if current else []
    assert [tokenizer.decode(run) for run in runs] == [text[start:end] for start, end in spans[0]]
