"""glm_sft.kernels: module replacement on the four GLM classes; on a GPU, Liger's kernels against the unpatched model.

On the CPU the kernels are not put in place (the run says why); the replacement itself is checked there with stand-ins
for Liger's two functions that compute the same math, so names, parameters and outputs are checked without CUDA.
"""

import copy
import sys
import types

import pytest
import torch

from glm_sft import kernels

TINY = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_models() -> dict:
    """One tiny model of each GLM class the kernels cover, random weights from a fixed seed."""
    from transformers import (
        Glm4Config,
        Glm4ForCausalLM,
        Glm4MoeConfig,
        Glm4MoeForCausalLM,
        Glm4MoeLiteConfig,
        Glm4MoeLiteForCausalLM,
        GlmConfig,
        GlmForCausalLM,
    )

    moe = dict(moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1)
    configs = {
        GlmForCausalLM: GlmConfig(**TINY),
        Glm4ForCausalLM: Glm4Config(**TINY),
        Glm4MoeForCausalLM: Glm4MoeConfig(**TINY, **moe, first_k_dense_replace=1),
        Glm4MoeLiteForCausalLM: Glm4MoeLiteConfig(
            **{key: value for key, value in TINY.items() if key != "head_dim"},
            **moe,
            kv_lora_rank=16,
            q_lora_rank=32,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            mlp_layer_types=["dense", "sparse"],
        ),
    }
    models = {}
    for model_class, config in configs.items():
        torch.manual_seed(0)
        models[model_class.__name__] = model_class(config)
    return models


def test_cpu_run_says_the_kernels_are_not_in_place():
    model = tiny_models()["GlmForCausalLM"]
    before = [type(module).__name__ for module in model.modules()]
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the GPU test below checks the kernels")
    assert kernels.apply_kernels(model, enabled=True) == (
        "kernels: not in place: no CUDA device (Liger's Triton kernels need one)"
    )
    assert kernels.apply_kernels(model, enabled=False).startswith("kernels: not in place (off;")
    assert [type(module).__name__ for module in model.modules()] == before
    assert kernels.kernels_on_model(model) == []


def test_other_models_are_refused_by_name():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**TINY))
    assert "LlamaForCausalLM is not one of the GLM classes" in kernels.apply_kernels(model, enabled=True)


class _SiLUMul(torch.autograd.Function):
    """Stand-in for Liger's LigerSiLUMulFunction: silu(a) * b."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return torch.nn.functional.silu(a) * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        sigmoid = torch.sigmoid(a)
        return grad * b * sigmoid * (1 + a * (1 - sigmoid)), grad * torch.nn.functional.silu(a)


class _RMSNorm(torch.nn.Module):
    """Stand-in for Liger's LigerRMSNorm with Llama casting."""

    def __init__(self, hidden_size, eps=1e-6, casting_mode="llama", in_place=False):
        super().__init__()
        self.weight, self.variance_epsilon = torch.nn.Parameter(torch.ones(hidden_size)), eps
        assert casting_mode == "llama" and not in_place

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        hidden_states = hidden_states.float()
        hidden_states = hidden_states * torch.rsqrt(
            hidden_states.pow(2).mean(-1, keepdim=True) + self.variance_epsilon
        )
        return self.weight * hidden_states.to(dtype)


@pytest.fixture
def stand_in_liger(monkeypatch):
    ops = types.ModuleType("liger_kernel.ops")
    ops.LigerSiLUMulFunction = _SiLUMul
    rms_norm = types.ModuleType("liger_kernel.transformers.rms_norm")
    rms_norm.LigerRMSNorm = _RMSNorm
    for name, module in {
        "liger_kernel": types.ModuleType("liger_kernel"),
        "liger_kernel.ops": ops,
        "liger_kernel.transformers": types.ModuleType("liger_kernel.transformers"),
        "liger_kernel.transformers.rms_norm": rms_norm,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch, "compile", lambda function, **kwargs: function)  # no inductor build in a fast test
    for model_type in kernels.ROTARY_MODEL_TYPES:  # the rotary replacement is undone after the test
        module = __import__(kernels.MODELING_MODULES[model_type], fromlist=["apply_rotary_pos_emb"])
        monkeypatch.setattr(module, "apply_rotary_pos_emb", module.apply_rotary_pos_emb)


def test_replacement_keeps_names_parameters_and_outputs(stand_in_liger):
    for name, model in tiny_models().items():
        reference = copy.deepcopy(model)
        names = sorted(name for name, _ in model.named_parameters())
        counts = kernels.replace_modules(model)
        assert counts["rms_norm"] >= 2 * TINY["num_hidden_layers"] + 1, (name, counts)  # per layer, and the final
        assert counts["swiglu"] >= 1, (name, counts)
        assert sorted(name for name, _ in model.named_parameters()) == names  # checkpoints and LoRA targets unchanged
        expected = ["rms_norm", "swiglu"] + (
            ["rotary"] if model.config.model_type in kernels.ROTARY_MODEL_TYPES else []
        )
        assert kernels.kernels_on_model(model) == expected
        ids = torch.randint(0, TINY["vocab_size"], (2, 24))
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's Triton kernels need CUDA; this machine has none")
def test_kernels_match_the_unpatched_model_on_gpu():
    pytest.importorskip("liger_kernel", reason="pip install liger-kernel to check the kernels")
    for name, model in tiny_models().items():
        model = model.to("cuda", torch.bfloat16)
        reference = copy.deepcopy(model)
        line = kernels.apply_kernels(model, enabled=True)
        assert line.startswith("kernels: RMSNorm (Liger)") and "checked on the model" in line, (name, line)
        ids = torch.randint(0, TINY["vocab_size"], (2, 64), device="cuda")
        outputs = [candidate(input_ids=ids, labels=ids) for candidate in (model, reference)]
        torch.testing.assert_close(outputs[0].logits, outputs[1].logits, rtol=2e-2, atol=2e-2)
        for output in outputs:
            output.loss.backward()
        for (parameter, patched), (_, unpatched) in zip(
            model.named_parameters(), reference.named_parameters(), strict=True
        ):
            if patched.grad is None and unpatched.grad is None:
                continue
            torch.testing.assert_close(patched.grad, unpatched.grad, rtol=5e-2, atol=5e-2, msg=f"{name} {parameter}")


def test_the_run_log_says_whether_the_kernels_are_in_place(tmp_path):
    from glm_sft.arguments import parse_recipe
    from glm_sft.run import build_run

    argv = ["--config", "recipes/demo.yaml", "--output_dir", str(tmp_path / "o"), "--report_to", "none"]
    summary = build_run(parse_recipe([*argv, "--kernels", "true", "--sample_count", "0"])).summary()
    line = next(line for line in summary.splitlines() if line.startswith("kernels:"))
    if not torch.cuda.is_available():
        assert line == "kernels: not in place: no CUDA device (Liger's Triton kernels need one)"
    else:
        assert "checked on the model" in line or "not in place" in line
