"""LoRA on the MoE GLM models (glm_sft.experts): per-expert LoRA equals PEFT's ParamWrapper, saves a standard PEFT
adapter that plain PEFT loads and merges, dropout on the experts, and what `lora_target` covers."""

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners import lora
from safetensors.torch import load_file

from glm_sft import UserError
from glm_sft import experts as expert_lora
from glm_sft.loading import load_model
from glm_sft.methods import build_peft_config, check_moe_lora, count_parameters, lora_scope

MOE_MODELS = ["builtin:tiny-glm45", "builtin:tiny-glm47-flash", "builtin:tiny-glm5"]


def lora_args(**overrides):
    settings = dict(
        finetuning_type="lora",
        lora_rank=4,
        lora_alpha=8,
        lora_dropout=0.0,
        lora_target="all",
        use_dora=False,
        use_rslora=False,
    )
    return SimpleNamespace(**{**settings, **overrides})


def ours(name, **overrides):
    """The tiny model in fp32 with glm_sft's LoRA config (its expert layers)."""
    base = load_model(name, dtype=torch.float32)
    return get_peft_model(base, build_peft_config(lora_args(**overrides), base))


def plain_peft(name, config):
    """The tiny model with the same LoRA settings in PEFT's own LoraConfig: PEFT's ParamWrapper on the experts."""
    settings = {field.name: getattr(config, field.name) for field in dataclasses.fields(LoraConfig)}
    return get_peft_model(load_model(name, dtype=torch.float32), LoraConfig(**{**settings, "lora_dropout": 0.0}))


def lora_parameters(model) -> dict:
    return {name: parameter for name, parameter in model.named_parameters() if "lora_" in name}


def randomize_lora(model, seed=0) -> None:
    """Nonzero B (PEFT starts it at zero, which would hide every LoRA term), A as PEFT initialised it."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in lora_parameters(model).items():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def copy_lora(source, target) -> None:
    targets = lora_parameters(target)
    with torch.no_grad():
        for name, parameter in lora_parameters(source).items():
            targets[name].copy_(parameter)


def token_ids(seed=1, shape=(2, 24)):
    return torch.randint(0, 200, shape, generator=torch.Generator().manual_seed(seed))


def expert_wrappers(model) -> list:
    return [module for module in model.modules() if isinstance(module, lora.ParamWrapper) and module.num_experts > 1]


def logits_and_grads(model, ids):
    model.zero_grad()
    logits = model(input_ids=ids).logits
    logits.pow(2).mean().backward()
    return logits.detach(), {name: parameter.grad.clone() for name, parameter in lora_parameters(model).items()}


def assert_same_logits_and_grads(model, reference, ids, tolerance=1e-5):
    logits, grads = logits_and_grads(model, ids)
    expected_logits, expected_grads = logits_and_grads(reference, ids)
    # fp32: 1e-5 of the logits' scale (they reach about 7 here, where summing the experts in another order moves the
    # last bits by about 1e-5); the gradients are small, so 1e-5 holds for them as it is.
    assert (logits - expected_logits).abs().max() < tolerance * max(1.0, expected_logits.abs().max().item())
    assert grads.keys() == expected_grads.keys() and len(grads) > 20
    for name, grad in grads.items():
        assert (grad - expected_grads[name]).abs().max() < tolerance, name
        assert grad.abs().sum() > 0, name  # every LoRA factor gets a gradient (B nonzero)


# --- per-expert LoRA against PEFT's ParamWrapper ---


@pytest.mark.parametrize("name", MOE_MODELS)
def test_expert_lora_equals_peft_param_wrapper_without_forming_the_stack(name, monkeypatch):
    model = ours(name)
    reference = plain_peft(name, model.peft_config["default"])
    assert {type(module) for module in expert_wrappers(model)} == {expert_lora.ParamWrapper}
    assert {type(module) for module in expert_wrappers(reference)} == {lora.ParamWrapper}
    # The same adapter layout: every key and shape of PEFT's own.
    assert {key: value.shape for key, value in model.state_dict().items() if "lora_" in key} == {
        key: value.shape for key, value in reference.state_dict().items() if "lora_" in key
    }
    randomize_lora(model)
    copy_lora(model, reference)
    ids = token_ids()
    with model.disable_adapter(), torch.no_grad():
        base_logits = model(input_ids=ids).logits
    # W + B·A of the expert stack is never formed: PEFT's paths to it stop ours.
    for method in ("get_delta_weight", "get_delta_factors", "_activate_lora"):
        monkeypatch.setattr(expert_lora.ParamWrapper, method, lambda *a, **k: pytest.fail("the stack was formed"))
    assert_same_logits_and_grads(model, reference, ids)
    assert (model(input_ids=ids).logits - base_logits).abs().max() > 0.05  # the LoRA terms count


@pytest.mark.parametrize("rank", [4, 2])  # rank 2: down_proj's LoRA rows are 8 bytes, below grouped_mm's alignment
def test_grouped_mm_form_equals_peft_param_wrapper(rank, monkeypatch):
    """The grouped_mm form (what an accelerator runs), here on CPU, where torch has grouped_mm, against PEFT's."""
    name = "builtin:tiny-glm45"
    model = ours(name, lora_rank=rank, lora_alpha=2 * rank)
    reference = plain_peft(name, model.peft_config["default"])
    randomize_lora(model, seed=3)
    copy_lora(model, reference)
    grouped = []

    def grouped_on_cpu(experts, *args):
        grouped.append(experts)
        return expert_lora.grouped_experts_forward(experts, *args)

    monkeypatch.setattr(expert_lora, "eager_experts_forward", grouped_on_cpu)
    assert_same_logits_and_grads(model, reference, token_ids(seed=4))
    assert grouped


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (grouped_mm kernels)")
def test_expert_lora_on_cuda_runs_grouped_mm_and_equals_peft_param_wrapper(monkeypatch):
    name = "builtin:tiny-glm47-flash"
    model = ours(name, lora_rank=8, lora_alpha=16).cuda()
    reference = plain_peft(name, model.peft_config["default"]).cuda()
    assert model.base_model.model.config._experts_implementation == "grouped_mm"
    randomize_lora(model)
    copy_lora(model, reference)
    eager = []
    monkeypatch.setattr(expert_lora, "eager_experts_forward", lambda *args: eager.append(1))
    assert_same_logits_and_grads(model, reference, token_ids().cuda(), tolerance=1e-4)
    assert not eager


# --- the adapter files: plain PEFT loads and merges them ---


@pytest.mark.parametrize("name", MOE_MODELS[:2])
def test_adapter_trained_with_expert_lora_loads_and_merges_in_plain_peft(name, tmp_path):
    model = ours(name, lora_dropout=0.1)
    ids = token_ids(seed=5)
    optimizer = torch.optim.AdamW([parameter for parameter in model.parameters() if parameter.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["lora_dropout"] == 0.0 and model.peft_config["default"].lora_dropout == 0.1  # in training only
    # PEFT's own wrapper, same settings, saves the same keys and shapes.
    plain_peft(name, model.peft_config["default"]).save_pretrained(tmp_path / "peft")
    saved, peft_saved = (load_file(tmp_path / kind / "adapter_model.safetensors") for kind in ("ours", "peft"))
    assert {key: tensor.shape for key, tensor in saved.items()} == {key: t.shape for key, t in peft_saved.items()}
    assert any(".experts.base_layer.lora_A" in key for key in saved)

    loaded = PeftModel.from_pretrained(load_model(name, dtype=torch.float32), tmp_path / "ours")
    assert expert_wrappers(loaded) and all(type(module) is lora.ParamWrapper for module in expert_wrappers(loaded))
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - trained).abs().max() < 1e-5
        merged = loaded.merge_and_unload()
        assert not any("lora_" in key for key in merged.state_dict())
        assert (merged(input_ids=ids).logits - trained).abs().max() < 1e-4
        assert (model.merge_and_unload()(input_ids=ids).logits - trained).abs().max() < 1e-4


def test_merged_and_disabled_expert_lora_in_place():
    name = "builtin:tiny-glm45"
    model = ours(name)
    randomize_lora(model)
    ids = token_ids()
    with torch.no_grad():
        base = load_model(name, dtype=torch.float32)(input_ids=ids).logits
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            assert (model(input_ids=ids).logits - base).abs().max() < 1e-5
        model.merge_adapter()
        assert all(module.merged for module in expert_wrappers(model))
        assert (model(input_ids=ids).logits - adapted).abs().max() < 1e-4  # merged: the LoRA terms are not added twice
        model.unmerge_adapter()
        assert (model(input_ids=ids).logits - adapted).abs().max() < 1e-4


# --- dropout on the experts ---


def test_expert_dropout_acts_in_training_only():
    name = "builtin:tiny-glm45"
    model = ours(name, lora_dropout=0.3)
    without = ours(name)
    randomize_lora(model)
    with torch.no_grad():  # only the routed experts' LoRA is nonzero: any dropout effect is theirs
        for key, parameter in lora_parameters(model).items():
            if "lora_B" in key and ".experts." not in key:
                parameter.zero_()
    copy_lora(model, without)
    assert all(isinstance(module.lora_dropout["default"], torch.nn.Dropout) for module in expert_wrappers(model))
    ids = token_ids()
    model.eval()
    with torch.no_grad():
        evaluated = model(input_ids=ids).logits
        assert torch.equal(evaluated, without.eval()(input_ids=ids).logits)
        model.train()
        runs = []
        for seed in (0, 0, 1):
            torch.manual_seed(seed)
            runs.append(model(input_ids=ids).logits)
    assert torch.equal(runs[0], runs[1])
    assert (runs[0] - evaluated).abs().max() > 1e-3 and (runs[0] - runs[2]).abs().max() > 1e-3


# --- scope ---

ATTENTION = {
    "builtin:tiny-glm45": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "builtin:tiny-glm47-flash": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
}
ATTENTION["builtin:tiny-glm5"] = ATTENTION["builtin:tiny-glm47-flash"]  # the DSA indexer (no gradients) is left out
MLP = ["gate_proj", "up_proj", "down_proj"]


def adapted_modules(model) -> set[str]:
    """Each adapted module's path inside the model, with the expert parameter for the experts."""
    names = set()
    for path, module in model.base_model.model.named_modules():
        if getattr(module, "lora_A", None):
            parameter = getattr(module, "parameter_name", None)
            path = path.replace(".base_layer", "")
            names.add(f"{path}.{parameter}" if parameter and parameter != "weight" else path)
    return names


@pytest.mark.parametrize("name", MOE_MODELS)
def test_lora_all_on_moe_is_attention_dense_mlp_shared_and_routed_experts(name):
    model = ours(name)
    layer0, layer1 = "model.layers.0.", "model.layers.1."
    expected = {layer + "self_attn." + module for layer in (layer0, layer1) for module in ATTENTION[name]}
    expected |= {layer0 + "mlp." + module for module in MLP}  # the dense MLP (first_k_dense_replace)
    expected |= {layer1 + "mlp.shared_experts." + module for module in MLP}
    expected |= {layer1 + "mlp.experts.gate_up_proj", layer1 + "mlp.experts.down_proj"}
    assert adapted_modules(model) == expected  # no router (gate), no indexer
    assert lora_scope(model) == "LoRA on " + ", ".join(
        [*("self_attn." + module for module in ATTENTION[name])]
        + ["mlp." + module for module in MLP]
        + ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
        + ["mlp.shared_experts." + module for module in MLP]
    )
    trainable, _ = count_parameters(model)
    assert trainable == sum(parameter.numel() for parameter in lora_parameters(model).values())
    experts = model.base_model.model.model.layers[1].mlp.experts
    assert experts.lora_A["default"].weight.shape == (8 * 4, 128)  # down_proj: 8 experts x rank 4, intermediate 128
    assert experts.base_layer.lora_A["default"].weight.shape == (8 * 8, 256)  # gate_up_proj: rank 2 x 4 (gate, up)


def test_lora_target_names_on_moe():
    name = "builtin:tiny-glm45"
    layer1 = "model.layers.1.mlp."
    assert adapted_modules(ours(name, lora_target="q_proj,v_proj")) == {
        f"model.layers.{index}.self_attn.{module}" for index in (0, 1) for module in ("q_proj", "v_proj")
    }
    assert adapted_modules(ours(name, lora_target="down_proj")) == {
        "model.layers.0.mlp.down_proj",
        layer1 + "shared_experts.down_proj",
        layer1 + "experts.down_proj",
    }
    router = ours(name, lora_target="o_proj,gate")  # the router trains only when named
    assert layer1 + "gate" in adapted_modules(router) and "mlp.gate" in lora_scope(router)
    with pytest.raises(UserError, match="lora_target: w_proj not found in this model"):
        ours(name, lora_target="q_proj,w_proj")
    with pytest.raises(UserError, match="wk belong to the sparse-attention indexer"):
        ours("builtin:tiny-glm5", lora_target="q_a_proj,wk")


def test_dense_models_keep_peft_all_linear():
    base = load_model("builtin:tiny-glm4", dtype=torch.float32)
    config = build_peft_config(lora_args(lora_dropout=0.1), base)
    assert type(config) is LoraConfig and config.target_modules == "all-linear" and config.lora_dropout == 0.1


def test_moe_lora_checks_before_loading():
    check_moe_lora(lora_args(lora_dropout=0.1), "glm45")  # dropout on the experts works
    with pytest.raises(UserError, match="PEFT has no DoRA; set use_dora: false"):
        check_moe_lora(lora_args(use_dora=True), "glm47")
    check_moe_lora(lora_args(use_dora=True, lora_target="q_proj,v_proj"), "glm45")
    check_moe_lora(lora_args(use_dora=True), "glm4")  # a dense model: PEFT's DoRA everywhere
    with pytest.raises(UserError, match="names the router"):
        check_moe_lora(lora_args(lora_dropout=0.1, lora_target="q_proj,gate"), "glm5")
    check_moe_lora(lora_args(lora_target="q_proj,gate"), "glm5")


# --- the sorted, recomputing experts function against autograd's record of the eager loop ---


class TinyExperts(torch.nn.Module):
    """transformers' gated experts layout, both orientations, with biases: what SortedExperts reads."""

    def __init__(self, transposed, bias, experts=4, hidden=8, intermediate=6):
        super().__init__()
        generator = torch.Generator().manual_seed(7)
        self.num_experts, self.is_transposed, self.has_bias = experts, transposed, bias
        shapes = {"gate_up_proj": (2 * intermediate, hidden), "down_proj": (hidden, intermediate)}
        for name, (out_features, in_features) in shapes.items():
            shape = (experts, in_features, out_features) if transposed else (experts, out_features, in_features)
            weight = torch.randn(shape, generator=generator, dtype=torch.float64)
            self.register_parameter(name, torch.nn.Parameter(weight, requires_grad=False))
            bias_values = torch.randn(experts, out_features, generator=generator, dtype=torch.float64)
            self.register_parameter(f"{name}_bias", torch.nn.Parameter(bias_values, requires_grad=False))

    def _apply_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_sorted_experts_function_equals_the_eager_loop_with_every_gradient(transposed, bias):
    experts = TinyExperts(transposed, bias)
    generator = torch.Generator().manual_seed(8)
    rows, top_k, hidden = 10, 2, 8
    sizes = {"gate_up_proj": (8, 12), "down_proj": (6, 8)}  # (in, out)

    def factors(rank):
        adapters = {}
        for name, (in_features, out_features) in sizes.items():
            a = torch.randn(4, rank, in_features, generator=generator, dtype=torch.float64, requires_grad=True)
            b = torch.randn(4, out_features, rank, generator=generator, dtype=torch.float64, requires_grad=True)
            adapters[name] = [(a, b, 0.5, torch.nn.Identity())]
        return adapters

    adapters = factors(3)
    for name, extra in factors(2).items():  # a second active adapter on each projection
        adapters[name] += extra
    hidden_states = torch.randn(rows, hidden, generator=generator, dtype=torch.float64, requires_grad=True)
    top_k_index = torch.randint(0, 5, (rows, top_k), generator=generator)  # 4: a placeholder (expert parallelism)
    top_k_index[0] = torch.tensor([1, 1])  # an expert hit twice by one token is allowed too
    top_k_weights = torch.rand(rows, top_k, generator=generator, dtype=torch.float64, requires_grad=True)
    leaves = [hidden_states, top_k_weights] + [t for name in sizes for a, b, _, _ in adapters[name] for t in (a, b)]
    upstream = torch.randn(rows, hidden, generator=generator, dtype=torch.float64)

    results = []
    for forward in (expert_lora.eager_experts_forward, expert_lora._autograd_experts_forward):
        outputs = forward(experts, hidden_states, top_k_index, top_k_weights, adapters)
        results.append((outputs.detach(), torch.autograd.grad((outputs * upstream).sum(), leaves)))
    (got, got_grads), (want, want_grads) = results
    assert torch.allclose(got, want, atol=1e-10) and want.abs().max() > 0
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        assert torch.allclose(got_grad, want_grad, atol=1e-10) and want_grad.abs().max() > 0


def test_sorted_experts_run_without_dropout_and_the_eager_loop_with_it(monkeypatch):
    model = ours("builtin:tiny-glm45", lora_dropout=0.2)
    ran = []
    original = expert_lora.SortedExperts.apply
    monkeypatch.setattr(expert_lora.SortedExperts, "apply", lambda *args: ran.append(1) or original(*args))
    ids = token_ids()
    model.train()
    model(input_ids=ids).logits.sum().backward()
    assert not ran  # dropout in training: autograd records the eager loop
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert ran
