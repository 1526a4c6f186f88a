"""export.py: a merged (or re-saved) model directory that plain transformers loads, written whole or not at all."""

import json

import pytest
import torch
from conftest import chat_once, run_main, run_script, train_in_process, trained_demo

import export
from glm_sft.loading import load_model

FAMILIES = {"glm4": "builtin:tiny-glm4", "chatglm3": "builtin:tiny-chatglm3", "glm45": "builtin:tiny-glm45"}
CLASSES = {"glm4": "GlmForCausalLM", "chatglm3": "GlmForCausalLM", "glm45": "Glm4MoeForCausalLM"}  # MoE: merged too
OFFICIAL_PROMPT = {
    "glm4": "[gMASK]<sop><|user|>\n你好<|assistant|>",
    "chatglm3": "[gMASK]sop<|user|>\n你好<|assistant|>",
    "glm45": "[gMASK]<sop><|user|>\n你好<|assistant|>",
}
CONVERSATIONS = [
    [{"role": "user", "content": "你好"}],
    [{"role": "system", "content": "你是一个助手。"}, {"role": "user", "content": "你是谁？"}],
    [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你？"},
        {"role": "user", "content": "介绍一下你自己"},
    ],
]


def train(tmp_path_factory, name, *overrides):
    """A 3-step run of the demo recipe with `overrides`, in this process (export is what runs as a user would)."""
    output_dir = tmp_path_factory.mktemp(name) / "run"
    train_in_process("--config", "recipes/demo.yaml", "--max_steps", "3", "--output_dir", output_dir, *overrides)
    return output_dir


def export_to(source, out_dir, *options):
    export.main([str(source), "--out-dir", str(out_dir), "--dtype", "fp32", *map(str, options)])
    return out_dir


@pytest.fixture(scope="module", params=list(FAMILIES))
def lora_export(request, tmp_path_factory):
    """(family, adapter dir, export dir) for the demo run of each family, exported in fp32 in small shards."""
    family = request.param
    adapter, _ = trained_demo(tmp_path_factory, FAMILIES[family])  # the demo run other tests share (conftest)
    out_dir = export_to(adapter, tmp_path_factory.mktemp("export") / "merged", "--max-shard-size", "1MB")
    return family, adapter, out_dir


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """A full fine-tune of tiny-glm4 that also saved a Trainer checkpoint (with optimizer state)."""
    return train(
        tmp_path_factory,
        "full",
        "--finetuning_type",
        "full",
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        "--logging_steps",
        "1",
    )


def prompt_ids(tokenizer, messages):
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return torch.tensor([ids])


def logits_and_replies(model, tokenizer):
    model.eval()
    logits, replies = [], []
    with torch.no_grad():
        for messages in CONVERSATIONS:
            ids = prompt_ids(tokenizer, messages)
            logits.append(model(ids).logits)
            generated = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, min_new_tokens=6)
            replies.append(generated[0, ids.shape[1] :].tolist())
    return logits, replies


def test_merged_export_gives_the_same_logits_and_replies_as_base_plus_adapter(lora_export):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    family, adapter, out_dir = lora_export
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    base = load_model(FAMILIES[family], dtype=torch.float32)
    base_logits, _ = logits_and_replies(base, tokenizer)
    with_adapter = PeftModel.from_pretrained(base, str(adapter))
    expected_logits, expected_replies = logits_and_replies(with_adapter, tokenizer)
    exported = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    assert type(exported).__name__ == CLASSES[family]
    logits, replies = logits_and_replies(exported, tokenizer)
    assert replies == expected_replies
    for got, want, plain in zip(logits, expected_logits, base_logits, strict=True):
        assert (got - want).abs().max() <= 1e-4
        assert (plain - want).abs().max() > 1e-3  # the adapter changed the model, so the merge is what matched


def test_export_directory_layout(lora_export):
    family, adapter, out_dir = lora_export
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out_dir / shard).is_file() for shard in shards)
    config = json.loads((out_dir / "config.json").read_text())
    assert config["architectures"] == [CLASSES[family]] and "auto_map" not in config
    assert not (out_dir / "adapter_config.json").exists()
    generation = json.loads((out_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == json.loads((adapter / "generation_config.json").read_text())["eos_token_id"]
    assert len(generation["eos_token_id"]) == 3
    card = (out_dir / "README.md").read_text()
    assert f"base model: {FAMILIES[family]}" in card and "method: lora" in card
    assert "data/self_cognition.jsonl" in card and "lora_rank: 16" in card
    history = json.loads((adapter / "trainer_state.json").read_text())["log_history"]
    assert f"final train loss: {[entry['loss'] for entry in history if 'loss' in entry][-1]:.4f}" in card
    assert "AutoModelForCausalLM.from_pretrained" in card and "apply_chat_template" in card


def test_export_loads_with_plain_transformers_in_a_fresh_process(lora_export):
    family, _, out_dir = lora_export
    code = f"""
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(out_dir)!r})
tokenizer = AutoTokenizer.from_pretrained({str(out_dir)!r})
messages = [{{"role": "user", "content": "你好"}}]
text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
print(json.dumps({{"text": text, "class": type(model).__name__, "glm_sft": "glm_sft" in sys.modules}}))
"""
    result = run_script("-c", code, cwd=out_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"text": OFFICIAL_PROMPT[family], "class": CLASSES[family], "glm_sft": False}


def test_chat_cli_answers_from_the_export_as_from_the_adapter(lora_export):
    _, adapter, out_dir = lora_export
    options = ["--prompt", "你是谁？", "--temperature", "0", "--max_new_tokens", "6"]
    assert chat_once("--model", out_dir, *options) == chat_once("--adapter", adapter, *options)


def test_interrupted_export_leaves_nothing_behind(lora_export, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    _, adapter, _ = lora_export
    real_save = PreTrainedModel.save_pretrained

    def save_then_fail(self, folder, **kwargs):
        real_save(self, folder, **kwargs)
        assert any(p.name.endswith(".safetensors") for p in folder.iterdir())  # failing with files half-written
        raise RuntimeError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export_to(adapter, tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_kept_without_force_and_replaced_with_it(lora_export, tmp_path, capsys):
    _, adapter, _ = lora_export
    out_dir = tmp_path / "merged"
    out_dir.mkdir()
    (out_dir / "old.txt").write_text("old")
    with pytest.raises(SystemExit) as stopped:
        export_to(adapter, out_dir)
    assert stopped.value.code == 1 and "not empty; pass --force" in capsys.readouterr().err
    assert [p.name for p in out_dir.iterdir()] == ["old.txt"]
    export_to(adapter, out_dir, "--force")
    assert not (out_dir / "old.txt").exists() and (out_dir / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary or set-aside folder left


@pytest.mark.slow
def test_ptuning_adapter_stops_with_a_clear_message(tmp_path_factory, tmp_path, capfd):
    adapter = train(tmp_path_factory, "ptuning", "--finetuning_type", "ptuning", "--pre_seq_len", "4")
    result = run_main(export.main, adapter, "--out-dir", tmp_path / "merged", capfd=capfd)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "P-Tuning v2" in result.stderr and f"python chat_cli.py --adapter {adapter}" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["missing-dir", "--out-dir", "x"], "missing-dir: no such directory"),
        (["data", "--out-dir", "x"], "not an adapter or model directory"),
        (["recipes", "--out-dir", "x", "--dtype", "int3"], "--dtype 'int3' is unknown"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_1(arguments, message, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as stopped:
        export.main(arguments)
    error = capsys.readouterr().err
    assert stopped.value.code == 1 and message in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("which", ["final", "checkpoint"])
def test_full_result_and_checkpoint_export_without_trainer_files(full_run, which, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = full_run if which == "final" else full_run / "checkpoint-2"
    assert (full_run / "checkpoint-2" / "optimizer.pt").is_file()
    out_dir = export_to(source, tmp_path / "exported")
    names = {p.name for p in out_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md", "tokenizer.json"} <= names
    assert not names & {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}
    # Both the checkpoint and train.py's final directory keep the loss history the model card reports.
    assert "final train loss: " in (out_dir / "README.md").read_text()
    assert "final train loss: not recorded" not in (out_dir / "README.md").read_text()
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    ids = prompt_ids(tokenizer, CONVERSATIONS[2])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)(ids).logits
        base = load_model("builtin:tiny-glm4", dtype=torch.float32)(ids).logits
    assert (got - want).abs().max() <= 1e-4 and (base - want).abs().max() > 1e-3


@pytest.mark.slow
def test_qlora_adapter_is_merged_into_the_full_precision_base(tmp_path_factory, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = train(tmp_path_factory, "qlora", "--finetuning_type", "qlora", "--learning_rate", "3e-3")
    out_dir = export_to(adapter, tmp_path / "merged")
    assert "quantization_config" not in json.loads((out_dir / "config.json").read_text())
    assert "not into 4-bit weights" in (out_dir / "README.md").read_text()
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    ids = prompt_ids(tokenizer, CONVERSATIONS[1])
    with torch.no_grad():
        want = PeftModel.from_pretrained(load_model("builtin:tiny-glm4", dtype=torch.float32), str(adapter))(
            ids
        ).logits
        got = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)(ids).logits
    assert (got - want).abs().max() <= 1e-4
