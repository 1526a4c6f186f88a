"""QLoRA on the mixture-of-experts models: the routed experts stored in 4-bit NF4 with double quantization.

bitsandbytes' QLoRA (BitsAndBytesConfig) quantizes nn.Linear only; transformers v5 keeps an MoE layer's routed experts
as two 3-D parameters (`gate_up_proj`, `down_proj`), which hold most of the weights (about 28B of GLM-4.7-Flash's
31B) and would stay bf16. `quantize_experts` quantizes them per expert with bitsandbytes' functional NF4
(quantize_4bit, blocks of 64, absmax double-quantized in blocks of 256: about 4.13 bits a weight) and frees the
full-precision tensors. Each experts module then holds, per projection, the packed uint8 weights as its (frozen)
parameter of the same name, and the quantization statistics as buffers, so `model.to(device)` moves them all. The
forward (glm_sft.experts) dequantizes one expert at a time, only the experts the tokens are routed to; the gradient
flows through the dequantized weight to the input and to the expert LoRA, never to the weight.

The module keeps its class's behaviour with a forward of glm_sft.experts (a subclass made once per class), so an
experts module that no LoRA targets runs as well. Export merges an adapter trained here into the base loaded again in
full precision (export.py does this for every QLoRA adapter): the 4-bit weights are never saved.
"""

import math

import torch
from torch import nn

from glm_sft.experts import EXPERT_PARAMETERS

BLOCKSIZE = 64  # QLoRA's NF4 block
NF4 = "_nf4_experts"  # the module attribute with, per projection, (shape of one expert's weight, dtype it computes in)


def is_quantized(experts: nn.Module) -> bool:
    return hasattr(experts, NF4)


def quantize_experts(model, device=None) -> int:
    """Quantize the routed experts of `model` in place (NF4, double quantization), one expert at a time, on `device`
    (default: where each weight is); the result stays there. Returns how many experts modules were quantized."""
    from glm_sft.experts import routed_experts

    modules = [module for module in routed_experts(model) if not is_quantized(module)]
    for experts in modules:
        _quantize_module(experts, device)
    return len(modules)


def _quantize_module(experts: nn.Module, device) -> None:
    from bitsandbytes.functional import quantize_4bit

    states = {}
    for name in EXPERT_PARAMETERS:
        weight = experts._parameters[name]
        target = torch.device(device) if device is not None else weight.device
        packed, absmax, absmax2, offsets = [], [], [], []
        for expert in range(weight.shape[0]):
            data, state = quantize_4bit(
                weight[expert].detach().to(target).contiguous(),
                blocksize=BLOCKSIZE,
                compress_statistics=True,
                quant_type="nf4",
            )
            packed.append(data.view(-1))
            absmax.append(state.absmax)
            absmax2.append(state.state2.absmax)
            offsets.append(state.offset.reshape(()))
        states[name] = (tuple(weight.shape[1:]), weight.dtype, state.state2.blocksize)
        del experts._parameters[name]  # the full-precision weight goes (with the model's last reference to it)
        weight = None
        experts.register_parameter(name, nn.Parameter(torch.stack(packed), requires_grad=False))
        experts.register_buffer(f"{name}_absmax", torch.stack(absmax))
        experts.register_buffer(f"{name}_absmax2", torch.stack(absmax2))
        experts.register_buffer(f"{name}_offset", torch.stack(offsets))
        experts.register_buffer("nf4_code", state.code)
        experts.register_buffer("nf4_code2", state.state2.code)
    setattr(experts, NF4, states)
    experts.__class__ = _quantized_class(type(experts))


def expert_weight(experts: nn.Module, name: str, expert: int) -> torch.Tensor:
    """One expert's weight of projection `name`, dequantized (no gradient) in the dtype the weight had."""
    from bitsandbytes.functional import QuantState, dequantize_4bit

    shape, dtype, blocksize2 = getattr(experts, NF4)[name]
    second = QuantState(
        absmax=getattr(experts, f"{name}_absmax2")[expert],
        code=experts.nf4_code2,
        blocksize=blocksize2,
        dtype=torch.float32,
    )
    state = QuantState(
        absmax=getattr(experts, f"{name}_absmax")[expert],
        shape=torch.Size(shape),
        code=experts.nf4_code,
        blocksize=BLOCKSIZE,
        quant_type="nf4",
        dtype=dtype,
        offset=getattr(experts, f"{name}_offset")[expert],
        state2=second,
    )
    with torch.no_grad():
        return dequantize_4bit(getattr(experts, name)[expert].view(-1, 1), state)


def logical_shape(experts: nn.Module, name: str) -> tuple[int, int, int]:
    """The shape the full-precision parameter had (experts x ... x ...)."""
    shape = getattr(experts, NF4)[name][0]
    return (getattr(experts, name).shape[0], *shape)


def packed_weights_uncounted(model) -> int:
    """The weights of the 4-bit experts that a count of parameter elements misses (two weights a byte)."""
    from glm_sft.experts import routed_experts

    return sum(
        math.prod(logical_shape(experts, name)) - getattr(experts, name).numel()
        for experts in routed_experts(model)
        if is_quantized(experts)
        for name in EXPERT_PARAMETERS
    )


def dequantized(experts: nn.Module, name: str) -> torch.Tensor:
    """The whole stack of projection `name` in full precision (for tests and tools; training never forms it)."""
    return torch.stack([expert_weight(experts, name, expert) for expert in range(getattr(experts, name).shape[0])])


_classes = {}


def _quantized_class(cls):
    if cls not in _classes:

        def forward(self, hidden_states, top_k_index, top_k_weights):
            from glm_sft.experts import experts_forward

            no_adapters = {name: [] for name in EXPERT_PARAMETERS}
            return experts_forward(self, hidden_states, top_k_index, top_k_weights, no_adapters)

        _classes[cls] = type(f"NF4{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
    return _classes[cls]
