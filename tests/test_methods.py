"""Each fine-tuning method lowers the loss on the demo data and changes only the parameters it should."""

import json

import pytest
import torch
from conftest import assert_serves_the_trained_weights, chat_once, run_main, train_in_process
from safetensors.torch import load_file
from test_train import logged_losses, trainable_and_total

from glm_sft.builtin import builtin_path

METHOD_OVERRIDES = {
    "lora": [],
    "qlora": ["--learning_rate", "3e-3"],
    "ptuning": ["--pre_seq_len", "16", "--learning_rate", "3e-2"],
    "full": ["--learning_rate", "1e-3"],
    "freeze": ["--freeze_trainable_layers", "1", "--learning_rate", "1e-3"],
}


@pytest.fixture(scope="module")
def base_weights():
    return load_file(builtin_path("builtin:tiny-glm4") / "model.safetensors")


@pytest.fixture(scope="module", params=list(METHOD_OVERRIDES))
def method_run(request, tmp_path_factory):
    method = request.param
    output_dir = tmp_path_factory.mktemp(method) / "out"
    result = train_in_process(
        "--config",
        "recipes/demo.yaml",
        "--finetuning_type",
        method,
        "--max_steps",
        "40",
        "--logging_steps",
        "5",
        "--output_dir",
        output_dir,
        *METHOD_OVERRIDES[method],
    )
    return method, output_dir, result


def test_method_lowers_the_loss(method_run):
    _, _, result = method_run
    losses = logged_losses(result.stdout + result.stderr)
    assert len(losses) == 8
    assert losses[-1] < losses[0] - 0.5  # nats per token, well beyond noise


def test_method_changes_only_its_parameters(method_run, base_weights):
    method, output_dir, result = method_run
    trainable, total = trainable_and_total(result.stdout)
    if method in ("lora", "qlora", "ptuning"):
        adapter = load_file(output_dir / "adapter_model.safetensors")
        assert not (output_dir / "model.safetensors").exists()  # the base is not saved: it did not change
        assert sum(tensor.numel() for tensor in adapter.values()) == trainable < total / 10
        if method == "ptuning":
            # P-Tuning v2 on grouped-query attention: one key and one value prefix per layer, 2 KV heads of 64 dims.
            ((name, prefixes),) = adapter.items()
            assert name == "prompt_embeddings" and prefixes.shape == (16, 2 * 2 * 2 * 64)
            assert prefixes.abs().sum() > 0
        else:
            assert all("lora_A" in name or "lora_B" in name for name in adapter)
            assert all(tensor.abs().sum() > 0 for name, tensor in adapter.items() if "lora_B" in name)  # moved off 0
        return
    trained = load_file(output_dir / "model.safetensors")
    assert trained.keys() == base_weights.keys()
    changed = {name for name in trained if not torch.equal(trained[name], base_weights[name])}
    if method == "full":
        assert trainable == total
        assert not (output_dir / "adapter_config.json").exists()
        config = json.loads((output_dir / "config.json").read_text())
        assert config["architectures"] == ["GlmForCausalLM"]  # a plain transformers model, chat_cli --model loads it
        matrices = {name for name in trained if trained[name].dim() == 2 and "embed_tokens" not in name}
        assert matrices <= changed  # every projection and the head moved (unused embedding rows need not)
    else:  # freeze with freeze_trainable_layers 1: only the last of the two layers
        assert changed and all(name.startswith("model.layers.1.") for name in changed)
        assert trainable == sum(t.numel() for name, t in base_weights.items() if name.startswith("model.layers.1."))


def test_result_of_every_method_loads_in_chat_cli(method_run):
    method, output_dir, _ = method_run
    flag = "--model" if method in ("full", "freeze") else "--adapter"
    reply = assert_serves_the_trained_weights(flag, output_dir, "builtin:tiny-glm4")
    assert (
        chat_once(flag, output_dir, "--prompt", "你是谁？", "--temperature", "0", "--max_new_tokens", "6")
        == f"{reply}\n"
    )


def test_dora_and_rslora_switches_reach_peft():
    from types import SimpleNamespace

    from peft import get_peft_model

    from glm_sft.loading import load_model
    from glm_sft.methods import build_peft_config

    args = SimpleNamespace(
        finetuning_type="lora",
        lora_rank=4,
        lora_alpha=8,
        lora_dropout=0.0,
        lora_target="query_key_value",
        use_dora=True,
        use_rslora=True,
    )
    config = build_peft_config(args)
    assert config.use_dora and config.use_rslora and sorted(config.target_modules) == ["k_proj", "q_proj", "v_proj"]
    model = get_peft_model(load_model("builtin:tiny-glm4"), config)
    names = [name for name, _ in model.named_parameters()]
    assert any("lora_magnitude_vector" in name for name in names)
    assert not any("o_proj.lora" in name or "mlp" in name and "lora" in name for name in names)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--finetuning_type", "ptuning", "--packing", "true"], "cannot be combined with packing"),
        (["--finetuning_type", "ptuning", "--activation_checkpointing", "true"], "activation_checkpointing"),
        (["--finetuning_type", "qlora", "--quantization_bit", "3"], "quantization_bit must be 4 or 8"),
        (["--finetuning_type", "freeze", "--freeze_extra_modules", "head"], "freeze_extra_modules: unknown head"),
        (["--finetuning_type", "prompt"], "finetuning_type 'prompt' is unknown"),
    ],
)
def test_a_method_that_cannot_work_stops_before_loading_weights(tmp_path, overrides, message, capfd):
    import train

    argv = ["--config", "recipes/demo.yaml", "--output_dir", tmp_path / "out", *overrides]
    result = run_main(train.main, *argv, capfd=capfd)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
    assert "rows read" not in result.stderr  # stopped before even reading the data


def test_an_adapter_on_a_different_base_or_a_whole_model_as_adapter_is_refused(method_run, capfd):
    import chat_cli

    method, output_dir, _ = method_run
    argv = ["--adapter", output_dir, "--model", "builtin:tiny-chatglm3", "--prompt", "hi"]
    result = run_main(chat_cli.main, *argv, capfd=capfd)
    expected = "not an adapter directory" if method in ("full", "freeze") else "a different model"
    assert result.returncode == 1 and expected in result.stderr and "Traceback" not in result.stderr


def test_qlora_without_bitsandbytes_says_how_to_install(monkeypatch):
    import importlib.util
    from types import SimpleNamespace

    from glm_sft import UserError
    from glm_sft.methods import check_method

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a)
    )
    model_args = SimpleNamespace(finetuning_type="qlora", quantization_bit=4)
    training_args = SimpleNamespace(gradient_checkpointing=True)
    with pytest.raises(UserError, match="pip install bitsandbytes"):
        check_method(model_args, training_args)
