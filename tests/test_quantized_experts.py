"""QLoRA on the MoE models: the routed experts in 4-bit NF4 (glm_sft.quantized_experts), exact against the same
weights dequantized and put back as plain parameters; the bytes they take; a QLoRA run that trains, saves, loads and
exports."""

import copy
import json
import math

import pytest
import torch
from conftest import train_in_process

from glm_sft.experts import EXPERT_PARAMETERS, moe_lora_config, routed_experts
from glm_sft.loading import load_model
from glm_sft.quantized_experts import dequantized, is_quantized, quantize_experts

MOE_MODELS = ["builtin:tiny-glm45", "builtin:tiny-glm47-flash"]
SETTINGS = dict(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=False, use_rslora=False)


def quantized_and_reference(name):
    """(model with 4-bit experts, the same model with those 4-bit weights dequantized as plain fp32 parameters)."""
    reference = load_model(name, dtype=torch.float32)
    quantized = copy.deepcopy(reference)
    assert quantize_experts(quantized) == len(routed_experts(reference)) > 0
    for plain, packed in zip(routed_experts(reference), routed_experts(quantized), strict=True):
        for parameter in EXPERT_PARAMETERS:
            plain._parameters[parameter] = torch.nn.Parameter(dequantized(packed, parameter), requires_grad=False)
    return quantized, reference


def expert_bytes(model) -> int:
    return sum(
        tensor.numel() * tensor.element_size()
        for experts in routed_experts(model)
        for tensor in [*experts.parameters(), *experts.buffers()]
    )


@pytest.mark.parametrize("name", MOE_MODELS)
def test_four_bit_experts_give_the_logits_of_their_dequantized_weights(name):
    quantized, reference = quantized_and_reference(name)
    ids = torch.randint(0, reference.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        got = quantized(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-5
    for experts in routed_experts(quantized):
        assert is_quantized(experts)
        assert {p.dtype for p in experts.parameters()} == {torch.uint8}  # the fp32 weights are gone
        assert not any(p.requires_grad for p in experts.parameters())


@pytest.mark.parametrize("name", MOE_MODELS)
def test_expert_lora_on_four_bit_experts_has_the_reference_gradients(name):
    from peft import get_peft_model

    quantized, reference = quantized_and_reference(name)
    models = [get_peft_model(model, moe_lora_config(model, None, **SETTINGS)) for model in (reference, quantized)]
    # B = 0 at initialisation would leave A without gradient: the same random factors in both.
    generator = torch.Generator().manual_seed(1)
    factors = {
        key: torch.randn(value.shape, generator=generator) * 0.1
        for key, value in models[0].state_dict().items()
        if "lora_" in key
    }
    assert any(".experts." in key for key in factors)
    ids = torch.randint(0, reference.config.vocab_size, (2, 16), generator=generator)
    results = []
    for model in models:
        assert not model.load_state_dict(factors, strict=False).unexpected_keys
        model.train()
        embeddings = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeddings).logits
        logits.pow(2).mean().backward()
        gradients = {key: p.grad for key, p in model.named_parameters() if p.requires_grad}
        results.append((logits.detach(), embeddings.grad, gradients))
    (want_logits, want_input, want), (got_logits, got_input, got) = results
    assert (got_logits - want_logits).abs().max() <= 1e-5
    assert (got_input - want_input).abs().max() <= 1e-6  # the input's gradient flows through the 4-bit weights
    assert got.keys() == want.keys() and any(".experts." in key for key in got)
    for key in want:
        assert got[key] is not None and (got[key] - want[key]).abs().max() <= 1e-6, key
    for experts in routed_experts(quantized):
        assert all(p.grad is None for p in experts.parameters(recurse=False))


@pytest.mark.parametrize("name", MOE_MODELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_four_bit_experts_take_under_a_third_of_the_bytes(name, dtype):
    model = load_model(name, dtype=dtype)
    before = expert_bytes(model)
    weights = sum(getattr(experts, p).numel() for experts in routed_experts(model) for p in EXPERT_PARAMETERS)
    quantize_experts(model)
    after = expert_bytes(model)
    assert after <= 0.3 * before if dtype == torch.bfloat16 else after <= 0.15 * before
    # 4 bits a weight, one uint8 absmax per 64 weights, one fp32 absmax per 256 of those: about 4.13 bits a weight
    # (the offsets and the two code tables per module come on top).
    assert math.isclose(after * 8 / weights, 4 + 8 / 64 + 32 / (64 * 256), rel_tol=0.03)


def four_bit_config():
    from glm_sft.arguments import ModelArguments
    from glm_sft.methods import quantization_config

    return quantization_config(ModelArguments(finetuning_type="qlora"))


def expert_tensors(model) -> list[dict]:
    return [dict([*experts.named_parameters(), *experts.named_buffers()]) for experts in routed_experts(model)]


def fused_checkpoint(name, folder):
    """`name` saved with each layer's experts as the fused 3-D stacks transformers v5 holds (the hub checkpoints store
    one tensor per expert, which the built-in models keep)."""
    from safetensors.torch import save_file

    model = load_model(name, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    for old in folder.glob("*.safetensors"):
        old.unlink()
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, folder / "model.safetensors")
    return str(folder)


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
@pytest.mark.parametrize("name", MOE_MODELS)
def test_experts_go_to_four_bit_as_they_load_as_they_would_after(name, layout, tmp_path):
    """load_model with the QLoRA config stores the routed experts in NF4 during the load; the codes and statistics
    are the very ones quantizing the loaded bf16 experts gives, from either checkpoint layout."""
    location = name if layout == "per-expert" else fused_checkpoint(name, tmp_path)
    at_load = load_model(location, dtype=torch.bfloat16, quantization=four_bit_config())
    after = load_model(location, dtype=torch.bfloat16)
    assert quantize_experts(after) == 1 and quantize_experts(at_load) == 0  # nothing left to quantize
    assert [type(experts) for experts in routed_experts(at_load)] == [type(m) for m in routed_experts(after)]
    # The parameters in the same order too: PEFT nests one expert wrapper per parameter in it (the adapter's keys).
    assert [list(experts._parameters) for experts in routed_experts(at_load)] == [
        list(experts._parameters) for experts in routed_experts(after)
    ]
    for got, want in zip(expert_tensors(at_load), expert_tensors(after), strict=True):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    assert {p.dtype for experts in routed_experts(at_load) for p in experts.parameters()} == {torch.uint8}


def full_precision_stacks(model, being_quantized) -> list[str]:
    """The expert projections `model` holds in full precision (loaded, not 4-bit), but the one `being_quantized`."""
    return [
        f"{index}.{name}"
        for index, experts in enumerate(routed_experts(model))
        for name in EXPERT_PARAMETERS
        if (experts, name) != being_quantized
        and (stack := experts._parameters.get(name)) is not None
        and stack.is_floating_point()
        and stack.device.type != "meta"
    ]


def test_a_load_never_holds_two_full_precision_expert_stacks(tmp_path, monkeypatch):
    """With three MoE layers: whenever an expert projection is quantized during the load, every other one in the model
    is still unloaded (meta) or already 4-bit. The control, quantizing after a bf16 load, finds the others held."""
    from transformers import AutoModelForCausalLM

    import glm_sft.quantized_experts as module

    config = load_model("builtin:tiny-glm45").config
    config.num_hidden_layers, config.first_k_dense_replace = 4, 1
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp_path)
    loading, held = {}, []
    find, quantize = module._expert_projection, module._quantize_parameter

    def remember(model, param_name):  # the quantizer asks about each weight with the model being loaded
        loading["model"] = model
        return find(model, param_name)

    def watched(experts, name, weight, device):
        held.append(full_precision_stacks(loading["model"], (experts, name)))
        return quantize(experts, name, weight, device)

    monkeypatch.setattr(module, "_expert_projection", remember)
    monkeypatch.setattr(module, "_quantize_parameter", watched)
    model = load_model(str(tmp_path), dtype=torch.bfloat16, quantization=four_bit_config())
    assert held == [[]] * (3 * len(EXPERT_PARAMETERS))
    assert len(routed_experts(model)) == 3 and all(is_quantized(experts) for experts in routed_experts(model))

    held.clear()
    loading["model"] = load_model(str(tmp_path), dtype=torch.bfloat16)
    quantize_experts(loading["model"])
    assert len(held[0]) >= 2 * len(EXPERT_PARAMETERS) and held[-1] == []  # at first the other layers' are all held


def test_a_per_expert_checkpoint_is_read_one_expert_at_a_time(monkeypatch):
    """The hub's layout (one tensor per expert, gate and up apart): each expert's tensors are read from the checkpoint
    just before that expert is quantized, so a load holds one expert's full-precision weights, not a layer's."""
    import glm_sft.quantized_experts as module

    events, read, quantize = [], module._read, module._quantize_parameter

    def reading(pieces, index):
        events.append("r")
        return read(pieces, index)

    def quantizing(experts, name, weights, device):
        def taken():
            for weight in weights:
                events.append("q")
                yield weight

        events.append(f"[{name}]")
        return quantize(experts, name, taken(), device)

    monkeypatch.setattr(module, "_read", reading)
    monkeypatch.setattr(module, "_quantize_parameter", quantizing)
    model = load_model("builtin:tiny-glm45", dtype=torch.bfloat16, quantization=four_bit_config())
    count = model.config.n_routed_experts
    assert sorted("".join(events).split("[")[1:]) == ["down_proj]" + "rq" * count, "gate_up_proj]" + "rrq" * count]


def test_the_experts_quantizer_is_only_in_place_inside_its_block():
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    from glm_sft.quantized_experts import experts_quantized_at_load

    own = AUTO_QUANTIZER_MAPPING["bitsandbytes_4bit"]
    with pytest.raises(RuntimeError), experts_quantized_at_load():
        assert issubclass(AUTO_QUANTIZER_MAPPING["bitsandbytes_4bit"], own)
        assert AUTO_QUANTIZER_MAPPING["bitsandbytes_4bit"] is not own
        raise RuntimeError("a load that fails")
    assert AUTO_QUANTIZER_MAPPING["bitsandbytes_4bit"] is own


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    """(output dir, quantized experts modules) of a 2-step QLoRA run on the tiny GLM-4.5 model, in this process."""
    import glm_sft.quantized_experts as module

    calls = []
    quantize = module.quantize_experts
    output_dir = tmp_path_factory.mktemp("qlora-moe") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            module,
            "quantize_experts",
            lambda model: calls.append((sum(map(is_quantized, routed_experts(model))), quantize(model))) or 0,
        )
        train_in_process(
            "--config", "recipes/demo.yaml", "--model_name_or_path", "builtin:tiny-glm45",
            "--finetuning_type", "qlora", "--max_steps", "2", "--logging_steps", "1", "--learning_rate", "3e-3",
            "--output_dir", output_dir, "--report_to", "none",
        )  # fmt: skip
    return output_dir, calls


def test_qlora_run_on_four_bit_experts_trains_saves_and_loads(qlora_run):
    from peft import PeftModel

    output_dir, calls = qlora_run
    assert calls == [(1, 0)]  # the tiny model's one MoE layer went to 4-bit as it loaded, none was left after
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    saved = json.loads((output_dir / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "builtin:tiny-glm45"
    assert "experts.gate_up_proj" in saved["target_parameters"]
    base = load_model("builtin:tiny-glm45", dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, str(output_dir))(input_ids=ids).logits
    assert torch.isfinite(adapted).all() and (adapted - before).abs().max() > 0


def test_qlora_moe_adapter_exports_to_plain_experts(qlora_run, tmp_path):
    """export.py merges a QLoRA adapter into the base loaded again in full precision: trained on 4-bit experts, it
    gives plain 3-D expert weights that transformers loads, equal to base + adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import export

    output_dir = qlora_run[0]
    for dtype in ("fp32", "bf16"):
        export.main([str(output_dir), "--out-dir", str(tmp_path / dtype), "--dtype", dtype])
        assert "quantization_config" not in json.loads((tmp_path / dtype / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert [(experts.gate_up_proj.dim(), experts.gate_up_proj.dtype) for experts in routed_experts(plain)] == [
        (3, torch.bfloat16)
    ]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.float32)
    assert not any(is_quantized(experts) for experts in routed_experts(merged))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        want = PeftModel.from_pretrained(load_model("builtin:tiny-glm45", dtype=torch.float32), str(output_dir))
        want = want(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-4
