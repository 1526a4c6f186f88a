"""GLM-4-0414 and GLM-Z1 tool calling in their native form, both released forms of GLM-4-0414's template, and family
detection that never swaps a format silently (a model type we do not list, an edited template, no template)."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO, build_run
from transformers.utils.chat_template_utils import render_jinja_template

from glm_sft import UserError
from glm_sft.builtin import builtin_path
from glm_sft.loading import load_tokenizer
from glm_sft.reasoning import reasoning_samples
from glm_sft.replies import parse_reply
from glm_sft.template import IGNORE_INDEX, native_messages
from glm_sft.tokenization import encode_conversation

RELEASED = REPO / "glm_sft" / "templates" / "released"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "查询天气",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


# Two calls in one assistant message (with text before them), their results in call order, then the answer.
TOOL_ROW = [
    {"role": "system", "content": "简洁回答。"},
    {"role": "user", "content": "北京和上海天气？"},
    {
        "role": "assistant",
        "content": "我来查一下。",
        "tool_calls": [call("get_weather", {"city": "北京"}), call("get_weather", '{"city": "上海"}')],
    },
    {"role": "tool", "content": "晴"},
    {"role": "tool", "content": "小雨"},
    {"role": "assistant", "content": "北京晴，上海小雨。"},
]


def copy_of(name: str, target: Path) -> Path:
    shutil.copytree(builtin_path(name), target)
    return target


def ship_tokenizer_config_form(model: Path) -> Path:
    """The checkpoint as it would ship with only tokenizer_config.json's "chat_template" (no chat_template.jinja)."""
    (model / "chat_template.jinja").unlink()
    config_file = model / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["chat_template"] = (RELEASED / "glm4_0414.tokenizer_config.jinja").read_text(encoding="utf-8")
    config_file.write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return model


def test_canonical_tool_rows_become_native_call_and_observation_turns():
    assert native_messages(TOOL_ROW, "glm4_0414") == [
        TOOL_ROW[0],
        TOOL_ROW[1],
        {"role": "assistant", "content": "我来查一下。"},
        {"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'},
        {"role": "observation", "content": "晴"},
        {"role": "assistant", "metadata": "get_weather", "content": '{"city": "上海"}'},
        {"role": "observation", "content": "小雨"},
        TOOL_ROW[5],
    ]
    assert native_messages(TOOL_ROW, "glm47") is TOOL_ROW  # the XML families read tool_calls themselves


@pytest.mark.parametrize(
    ("name", "released"), [("builtin:tiny-glm4-0414", "glm4_0414"), ("builtin:tiny-glmz1", "glmz1")]
)
def test_tool_rows_train_the_calls_and_the_observation_that_ends_each(name, released):
    """The row's ids are the tokenizer's ids of the released text (rendered the transformers way, on the native
    form) and its end token; the trained tokens are exactly each reply and call and the role token ending it. GLM-Z1's
    final reply trains as the model writes it after its prompt `<|assistant|>\n<think>`: `</think>\n{answer}`."""
    tokenizer, family = load_tokenizer(name)
    encoded = encode_conversation(tokenizer, TOOL_ROW, tools=[WEATHER])
    text = render_jinja_template(
        [native_messages(TOOL_ROW, family)],
        tools=[WEATHER],
        chat_template=(RELEASED / f"{released}.jinja").read_text(encoding="utf-8"),
        **tokenizer.special_tokens_map,
    )[0][0]
    assert '<|assistant|>get_weather\n{"city": "北京"}<|observation|>\n晴<|assistant|>get_weather\n' in text
    answer = "\n北京晴，上海小雨。"
    opening = "\n<think>" if family == "glmz1" else ""  # what the generation prompt writes, untrained
    written = ("</think>" if family == "glmz1" else "") + answer
    assert text.endswith(f"<|assistant|>{answer}")
    text = text[: -len(answer)] + opening + written + "<|user|>"
    assert encoded["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    trained, run = [], []
    for token, label in zip(encoded["input_ids"], encoded["labels"], strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            trained.append(tokenizer.decode(run))
            run = []
    trained.append(tokenizer.decode(run))
    assert trained == [  # the text turn's end is the <|assistant|> of the first call, so the two run on
        '\n我来查一下。<|assistant|>get_weather\n{"city": "北京"}<|observation|>',
        'get_weather\n{"city": "上海"}<|observation|>',
        written + "<|user|>",
    ]


def test_glmz1_drops_a_call_turn_s_reasoning_as_its_template_does_and_does_not_split_on_it():
    row = [dict(message) for message in TOOL_ROW]
    row[2]["reasoning_content"] = "两个城市，两次调用。"
    row[5]["reasoning_content"] = "结果都有了。"
    samples = reasoning_samples([{"messages": row}], "glmz1")
    assert [sample["messages"] for sample in samples] == [row]
    tokenizer, _ = load_tokenizer("builtin:tiny-glmz1")
    trained = encode_conversation(tokenizer, row, tools=[WEATHER])
    text = tokenizer.decode([token for token in trained["labels"] if token != IGNORE_INDEX])
    assert "两次调用" not in text and text.endswith("结果都有了。</think>\n北京晴，上海小雨。<|user|>")
    with pytest.raises(UserError, match="glm4_0414 format has no thinking"):  # no thinking at all: refused
        reasoning_samples([{"messages": row, "source": "t.jsonl:1"}], "glm4_0414")


@pytest.mark.parametrize("form", ["chat_template.jinja", "tokenizer_config.json"])
def test_a_glm4_0414_checkpoint_shipping_either_released_form_trains_in_it_without_a_template_key(tmp_path, form):
    model = copy_of("builtin:tiny-glm4-0414", tmp_path / "model")
    if form == "tokenizer_config.json":
        ship_tokenizer_config_form(model)
    tokenizer, family = load_tokenizer(str(model))
    assert family == "glm4_0414"
    encoded = encode_conversation(tokenizer, TOOL_ROW, tools=[WEATHER])
    shipped = tokenizer.shipped_chat_template
    text = render_jinja_template(
        [native_messages(TOOL_ROW, family)], tools=[WEATHER], chat_template=shipped, **tokenizer.special_tokens_map
    )[0][0]
    assert encoded["input_ids"] == tokenizer(text + "<|user|>", add_special_tokens=False)["input_ids"]
    space = " " if form == "tokenizer_config.json" else ""  # the tokenizer_config form writes one after metadata
    assert f'<|assistant|>get_weather{space}\n{{"city": "北京"}}' in text
    trained = tokenizer.decode([token for token in encoded["labels"] if token != IGNORE_INDEX])
    assert f'get_weather{space}\n{{"city": "上海"}}<|observation|>' in trained
    # and a reply in that form reads back as the call
    assert parse_reply(f'get_weather{space}\n{{"city": "北京"}}', family).calls == [
        {"name": "get_weather", "arguments": {"city": "北京"}}
    ]


def test_a_glm4_0414_run_on_tool_rows_trains_and_ships_the_released_template(tmp_path):
    model = copy_of("builtin:tiny-glm4-0414", tmp_path / "model")
    out = tmp_path / "out"
    run = build_run(
        ["--config", "recipes/demo_tools.yaml", "--model_name_or_path", str(model), "--output_dir", str(out)]
        + ["--max_steps", "1", "--report_to", "none", "--sample_count", "0", "--max_samples", "4"]
    )
    assert run.family == "glm4_0414"
    row = run.trainer.train_dataset[0]
    trained = run.trainer.processing_class.decode([token for token in row["labels"] if token != IGNORE_INDEX])
    assert trained.startswith('get_weather\n{"city": "北京"}<|observation|>')
    run.train()
    run.save()
    assert (out / "chat_template.jinja").read_bytes() == (RELEASED / "glm4_0414.jinja").read_bytes()


def test_a_native_call_reply_round_trips_and_serve_returns_it_as_tool_calls(monkeypatch):
    import dataclasses

    from fastapi.testclient import TestClient

    import serve
    from glm_sft.inference import load_chat_model

    chat = load_chat_model("builtin:tiny-glm4-0414")
    reply = 'get_weather\n{"city": "北京"}'
    assert parse_reply(reply, "glm4_0414").calls == [{"name": "get_weather", "arguments": {"city": "北京"}}]
    prompts = []
    chat = dataclasses.replace(chat)

    def raw_reply(messages, *, tools=None, usage=None, **settings):
        prompts.append(chat.tokenizer.decode(chat.prompt_ids(messages, tools=tools)[0]))
        usage.update(prompt_tokens=1, completion_tokens=9, finish_reason="stop")
        return reply

    monkeypatch.setattr(chat, "raw_reply", raw_reply)
    with TestClient(serve.create_app(chat)) as client:
        body = {"messages": [{"role": "user", "content": "北京天气？"}], "tools": [WEATHER]}
        choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        called = choice["message"]["tool_calls"][0]
        assert (called["function"]["name"], json.loads(called["function"]["arguments"])) == (
            "get_weather",
            {"city": "北京"},
        )
        # the call and its result, sent back in the OpenAI form, reach the model as native turns
        history = body["messages"] + [
            {"role": "assistant", "content": None, "tool_calls": [dict(called)]},
            {"role": "tool", "tool_call_id": called["id"], "content": "晴"},
        ]
        client.post("/v1/chat/completions", json={**body, "messages": history})
    assert prompts[-1].endswith('<|assistant|>get_weather\n{"city": "北京"}<|observation|>\n晴<|assistant|>')


# --- detection ---


def tokenizer_dir(tmp_path: Path, name: str, model_type: str | None, template: str | None = "keep") -> Path:
    """A copy of a built-in checkpoint's tokenizer whose config.json says `model_type` (None: no config.json), its
    chat_template.jinja replaced by `template` (None: none shipped)."""
    target = tmp_path / f"{name.split(':')[-1]}-{model_type}"
    source = builtin_path(name)
    target.mkdir()
    for file in source.iterdir():
        if file.name.startswith("tokenizer") or file.name == "chat_template.jinja":
            shutil.copy(file, target / file.name)
    if model_type is not None:
        (target / "config.json").write_text(json.dumps({"model_type": model_type}))
    if template is None:
        (target / "chat_template.jinja").unlink()
    elif template != "keep":
        (target / "chat_template.jinja").write_text(template, encoding="utf-8")
    return target


def test_an_unknown_model_type_shipping_glm47_s_text_trains_as_glm47(tmp_path):
    """A checkpoint of a model type glm-sft does not list (here a tiny Llama) with GLM-4.7-Flash's tokenizer and
    released template: detected by its template, trained in that format."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    model = tokenizer_dir(tmp_path, "builtin:tiny-glm47-flash", None)
    tokenizer, family = load_tokenizer(str(model))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(model)
    out = tmp_path / "out"
    run = build_run(
        ["--config", "recipes/demo.yaml", "--model_name_or_path", str(model), "--output_dir", str(out)]
        + ["--max_steps", "1", "--report_to", "none", "--sample_count", "0", "--max_samples", "4"]
    )
    assert run.family == "glm47" and "(glm47 format)" in run.summary()
    labels = run.trainer.train_dataset[0]["labels"]
    trained = run.trainer.processing_class.decode([token for token in labels if token != IGNORE_INDEX])
    assert trained.endswith("<|user|>") and "\n" not in trained[:1]  # GLM-4.7: no newline after <|assistant|>


def test_an_unknown_model_type_with_an_edited_template_stops_naming_the_nearest_family(tmp_path):
    edited = (RELEASED / "glm47.jinja").read_text(encoding="utf-8") + "{{- ' edited' -}}"
    model = tokenizer_dir(tmp_path, "builtin:tiny-glm47-flash", "some_future_glm", edited)
    with pytest.raises(UserError) as error:
        load_tokenizer(str(model))
    message = str(error.value)
    assert "(a some_future_glm checkpoint) is none of the released formats; nearest is glm47: probe" in message
    assert "set template: glm47" in message


def test_an_unknown_model_type_without_a_template_stops_with_the_override(tmp_path):
    model = tokenizer_dir(tmp_path, "builtin:tiny-glm47-flash", "some_future_glm", None)
    with pytest.raises(UserError) as error:
        load_tokenizer(str(model))
    message = str(error.value)
    assert "a some_future_glm checkpoint, a model type glm-sft does not know" in message
    assert "it could be glm45, glm46, glm47" in message and "set template:" in message
    assert load_tokenizer(str(model), template="glm47")[1] == "glm47"


def test_a_known_base_checkpoint_without_a_template_still_gets_its_generation_s_format(tmp_path):
    model = tokenizer_dir(tmp_path, "builtin:tiny-glm4-0414", "glm4", None)
    assert load_tokenizer(str(model))[1] == "glm4_0414"


def test_glm_5_3_flash_stops_saying_its_template_was_not_found(tmp_path):
    model = tokenizer_dir(tmp_path, "builtin:tiny-glm47-flash", "glm5_next")
    with pytest.raises(UserError, match="GLM-5.3-Flash .* its released chat template has not been found"):
        load_tokenizer(str(model))


def test_the_older_generations_are_told_apart_by_their_tokens_and_a_different_template_is_told(tmp_path, capsys):
    """glm-4-9b-chat and ChatGLM3 checkpoints: their own template files are not stored, so one that renders otherwise
    than ours does not stop them; the run says so."""
    model = tokenizer_dir(tmp_path, "builtin:tiny-glm4", "glm", "{{ 'an edited template' }}")
    assert load_tokenizer(str(model))[1] == "glm4"
    assert "warning: training in the glm4 format (from the tokenizer's tokens), although the template shipped" in (
        capsys.readouterr().err
    )
    assert load_tokenizer("builtin:tiny-glm4")[1] == "glm4" and not capsys.readouterr().err


def test_the_tokenizer_config_variant_renders_its_released_text_on_every_probe():
    """Our tokenizer_config variant against that released form, rendered the transformers way: every probe, with
    and without the generation prompt; the stored bytes are the copy SOURCES.md names."""
    import hashlib

    from glm_sft.template import family_template, probe_conversations

    data = (RELEASED / "glm4_0414.tokenizer_config.jinja").read_bytes()
    assert hashlib.sha256(data).hexdigest() == "854b703e44ca06bdb196cc471c728d15dbab61e744fe6cdce980086b61646ed1"
    ours = family_template("glm4_0414", "tokenizer_config")
    calls = 0
    for probe in probe_conversations():
        if "families" in probe and "glm4_0414" not in probe["families"]:
            continue
        messages = native_messages(probe["messages"], "glm4_0414")
        calls += sum(bool(message.get("metadata")) for message in messages)
        for prompt in (False, True):
            texts = [
                render_jinja_template(
                    [messages], tools=probe.get("tools"), chat_template=template, add_generation_prompt=prompt
                )[0][0]
                for template in (data.decode("utf-8"), ours)
            ]
            assert texts[0] == texts[1], probe["name"]
    assert calls >= 4  # the probes hold calls, where the two forms differ
    assert ours != family_template("glm4_0414")


def test_a_result_given_as_a_list_of_outputs_is_read_as_each_template_reads_it(tmp_path):
    """GLM-5.2's form of a tool result, a list of {"output": text} items: kept as a list for the XML families, whose
    templates write one <tool_response> per item; JSON text for the others, as other non-text results are."""
    from conftest import write_jsonl

    from glm_sft.data import read_conversations

    row = {
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": "北京天气？"},
            {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "北京"})]},
            {"role": "tool", "content": [{"output": "晴"}, {"output": "北风二级"}]},
            {"role": "assistant", "content": "晴，北风二级。"},
        ],
    }
    rows, _ = read_conversations(write_jsonl(tmp_path / "rows.jsonl", [row]))
    assert rows[0]["messages"][2]["content"] == [{"output": "晴"}, {"output": "北风二级"}]
    tokenizer, _ = load_tokenizer("builtin:tiny-glm47-flash")
    ids = encode_conversation(tokenizer, rows[0]["messages"], tools=rows[0]["tools"])["input_ids"]
    assert (
        "<|observation|><tool_response>晴</tool_response><tool_response>北风二级</tool_response>"
        in tokenizer.decode(ids)
    )
    tokenizer, _ = load_tokenizer("builtin:tiny-glm4-0414")
    ids = encode_conversation(tokenizer, rows[0]["messages"], tools=rows[0]["tools"])["input_ids"]
    assert '<|observation|>\n[{"output": "晴"}, {"output": "北风二级"}]<|assistant|>' in tokenizer.decode(ids)
    # GLM-5.1's text keeps only text items of a list: the outputs would vanish, so it gets the JSON text too
    glm51 = tokenizer_dir(tmp_path, "builtin:tiny-glm47-flash", "glm_moe_dsa", (RELEASED / "glm51.jinja").read_text())
    tokenizer, family = load_tokenizer(str(glm51))
    assert family == "glm51"
    ids = encode_conversation(tokenizer, rows[0]["messages"], tools=rows[0]["tools"])["input_ids"]
    assert '<tool_response>[{"output": "晴"}, {"output": "北风二级"}]</tool_response>' in tokenizer.decode(ids)
    bad = dict(
        row, messages=[*row["messages"][:2], {"role": "tool", "content": [{"output": "<|user|>"}]}, row["messages"][3]]
    )
    with pytest.raises(UserError, match=r"rows.jsonl:1: message 3 \(tool\) contains the control token <\|user\|>"):
        read_conversations(write_jsonl(tmp_path / "rows.jsonl", [bad]))
