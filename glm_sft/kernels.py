"""GLM kernels on a GPU, by module replacement: Liger's Triton RMSNorm and SwiGLU, a compiled rotary embedding.

For GlmForCausalLM (GLM-4-9B -hf, converted ChatGLM3), Glm4ForCausalLM (GLM-4-0414, Z1), Glm4MoeForCausalLM (GLM-4.5 /
4.6 / 4.7) and Glm4MoeLiteForCausalLM (GLM-4.7-Flash):

- RMSNorm: every `*RMSNorm` module of those models becomes Liger's `LigerRMSNorm` (Llama casting, which is what GLM's
  norms compute: normalise in float32, scale in the input dtype), sharing the same weight Parameter.
- SwiGLU: the dense MLPs become a module with the same projections (same names, so LoRA targets them as before) whose
  activation is Liger's fused `silu(gate) * up`: on GLM's fused `gate_up_proj` the two halves of its output; on the
  MoE models' dense and shared-expert MLPs, `gate_proj` and `up_proj`. The routed experts (3-D weights) stay.
- Rotary: the modeling module's `apply_rotary_pos_emb` (GLM's partial, interleaved rotary included) becomes the same
  function compiled by torch.compile (one fused kernel for q and k instead of a dozen elementwise ones).
- The fused linear cross-entropy: TRL's fused LM head is already in place (Triton tiles on a GPU, trained positions
  only); `speed.fused_lm_head_applied` checks it, so Liger's is not stacked on top.

Nothing is replaced without CUDA or without the liger-kernel package (`pip install liger-kernel`, it brings Triton):
`apply_kernels` then says why in the line the run logs. Every replacement keeps the model's parameters, so checkpoints,
adapters and exports are unchanged; tests/test_kernels.py compares logits and gradients with the unpatched model.
"""

import importlib

import torch
from torch import nn

MODEL_CLASSES = ("GlmForCausalLM", "Glm4ForCausalLM", "Glm4MoeForCausalLM", "Glm4MoeLiteForCausalLM")
NORM_CLASSES = ("GlmRMSNorm", "Glm4RMSNorm", "Glm4MoeRMSNorm", "Glm4MoeLiteRMSNorm")
FUSED_MLP_CLASSES = ("GlmMLP", "Glm4MLP")  # gate_up_proj: one Linear to 2 x intermediate
SPLIT_MLP_CLASSES = ("Glm4MoeMLP", "Glm4MoeLiteMLP")  # gate_proj, up_proj
MODELING_MODULES = {
    "glm": "transformers.models.glm.modeling_glm",
    "glm4": "transformers.models.glm4.modeling_glm4",
    "glm4_moe": "transformers.models.glm4_moe.modeling_glm4_moe",
    "glm4_moe_lite": "transformers.models.glm4_moe_lite.modeling_glm4_moe_lite",
}
ROTARY_MODEL_TYPES = ("glm", "glm4", "glm4_moe")  # glm4_moe_lite's MLA attention rotates in its own function
KERNEL_NAMES = ("rms_norm", "swiglu", "rotary")


def unavailable_reason(model) -> str | None:
    """Why the kernels cannot go on this model here, or None when they can."""
    if type(model).__name__ not in MODEL_CLASSES:
        return f"{type(model).__name__} is not one of the GLM classes ({', '.join(MODEL_CLASSES)})"
    if not torch.cuda.is_available():
        return "no CUDA device (Liger's Triton kernels need one)"
    if model.device.type != "cuda":
        return f"the model is on {model.device.type}, not on the GPU"
    try:
        importlib.import_module("liger_kernel.ops")
    except ImportError as error:
        return f"liger-kernel is not importable ({error}); pip install liger-kernel"
    if getattr(model.config, "hidden_act", "silu") not in ("silu", "swish"):
        return f"hidden_act {model.config.hidden_act} is not SiLU"
    return None


class FusedGateUpSwiGLU(nn.Module):
    """GLM's MLP (`gate_up_proj` -> halves gate, up -> `down_proj(silu(gate) * up)`) with Liger's fused activation."""

    glm_kernel = "swiglu"

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_up_proj, self.down_proj = mlp.gate_up_proj, mlp.down_proj

    def forward(self, hidden_states):
        from liger_kernel.ops import LigerSiLUMulFunction

        gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
        return self.down_proj(LigerSiLUMulFunction.apply(gate, up))


class SplitSwiGLU(nn.Module):
    """The MoE models' dense MLP (`down_proj(silu(gate_proj(x)) * up_proj(x))`) with Liger's fused activation."""

    glm_kernel = "swiglu"

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, hidden_states):
        from liger_kernel.ops import LigerSiLUMulFunction

        gate, up = self.gate_proj(hidden_states), self.up_proj(hidden_states)
        return self.down_proj(LigerSiLUMulFunction.apply(gate, up))


def liger_rms_norm(norm: nn.Module) -> nn.Module:
    """Liger's RMSNorm with the weight and epsilon of `norm` (the same Parameter, not a copy)."""
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    replacement = LigerRMSNorm(norm.weight.shape[0], eps=eps, casting_mode="llama", in_place=False)
    replacement.weight = norm.weight
    replacement.glm_kernel = "rms_norm"
    return replacement


def compiled_rotary(model_type: str) -> bool:
    """Replace the modeling module's apply_rotary_pos_emb by its compiled self (once per process)."""
    module = importlib.import_module(MODELING_MODULES[model_type])
    function = module.apply_rotary_pos_emb
    if getattr(function, "glm_kernel", None) == "rotary":
        return True
    compiled = torch.compile(function, dynamic=True, fullgraph=True)

    def apply_rotary_pos_emb(*args, **kwargs):
        return compiled(*args, **kwargs)

    apply_rotary_pos_emb.glm_kernel = "rotary"
    apply_rotary_pos_emb.original = function
    module.apply_rotary_pos_emb = apply_rotary_pos_emb
    return True


def replace_modules(model) -> dict[str, int]:
    """The module replacements on `model` (before PEFT wraps it); how many modules of each kind were replaced."""
    counts = dict.fromkeys(KERNEL_NAMES, 0)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            kind = type(child).__name__
            if kind in NORM_CLASSES:
                setattr(parent, name, liger_rms_norm(child))
                counts["rms_norm"] += 1
            elif kind in FUSED_MLP_CLASSES:
                setattr(parent, name, FusedGateUpSwiGLU(child))
                counts["swiglu"] += 1
            elif kind in SPLIT_MLP_CLASSES:
                setattr(parent, name, SplitSwiGLU(child))
                counts["swiglu"] += 1
    if model.config.model_type in ROTARY_MODEL_TYPES and compiled_rotary(model.config.model_type):
        counts["rotary"] = 1
    return counts


def kernels_on_model(model) -> list[str]:
    """The kernels found in place on the model (PEFT-wrapped or not), checked module by module."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    found = {getattr(module, "glm_kernel", None) for module in base.modules()}
    model_type = getattr(base.config, "model_type", None)
    if model_type in ROTARY_MODEL_TYPES:
        module = importlib.import_module(MODELING_MODULES[model_type])
        if getattr(module.apply_rotary_pos_emb, "glm_kernel", None) == "rotary":
            found.add("rotary")
    return [name for name in KERNEL_NAMES if name in found]


def apply_kernels(model, enabled: bool) -> str:
    """Put the kernels on `model` when enabled and possible; the line the run's start-up summary shows."""
    if not enabled:
        return "kernels: not in place (off; --kernels true on a GPU with liger-kernel installed)"
    reason = unavailable_reason(model)
    if reason:
        return f"kernels: not in place: {reason}"
    counts = replace_modules(model)
    found = kernels_on_model(model)
    if not found:
        return "kernels: not in place: no module of the model matched"
    detail = {"rms_norm": "RMSNorm (Liger)", "swiglu": "SwiGLU (Liger)", "rotary": "rotary (torch.compile)"}
    shown = ", ".join(f"{detail[name]} x{counts[name]}" if name != "rotary" else detail[name] for name in found)
    return f"kernels: {shown}; checked on the model"
