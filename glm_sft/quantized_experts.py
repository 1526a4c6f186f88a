"""QLoRA on the mixture-of-experts models: the routed experts stored in 4-bit NF4 with double quantization.

bitsandbytes' QLoRA (BitsAndBytesConfig) quantizes nn.Linear only; transformers v5 keeps an MoE layer's routed experts
as two 3-D parameters (`gate_up_proj`, `down_proj`), which hold most of the weights (about 28B of GLM-4.7-Flash's
31B) and would stay bf16. `quantize_experts` quantizes them per expert with bitsandbytes' functional NF4
(quantize_4bit, blocks of 64, absmax double-quantized in blocks of 256: about 4.13 bits a weight) and frees the
full-precision tensors. Each experts module then holds, per projection, the packed uint8 weights as its (frozen)
parameter of the same name, and the quantization statistics as buffers, so `model.to(device)` moves them all. The
forward (glm_sft.experts) dequantizes one expert at a time, only the experts the tokens are routed to; the gradient
flows through the dequantized weight to the input and to the expert LoRA, never to the weight.

A QLoRA load (glm_sft.loading.load_model with the 4-bit config) quantizes the experts as they load
(`experts_quantized_at_load`): from a checkpoint with one tensor per expert, as the hub's are, each expert is read just
before it is quantized, so the load never holds more than one expert in full precision beside the 4-bit weights (one
layer's stack, from a checkpoint that stores the stacks). `quantize_experts` does the same for a model already loaded.

The module keeps its class's behaviour with a forward of glm_sft.experts (a subclass made once per class), so an
experts module that no LoRA targets runs as well. Export merges an adapter trained here into the base loaded again in
full precision (export.py does this for every QLoRA adapter): the 4-bit weights are never saved.
"""

import contextlib
import functools
import math

import torch
from torch import nn

from glm_sft.experts import EXPERT_PARAMETERS

BLOCKSIZE = 64  # QLoRA's NF4 block
NF4 = "_nf4_experts"  # the module attribute with, per projection, (shape of one expert's weight, dtype it computes in)
PENDING = "_nf4_pending"  # the same while some projections are still to be stored (during a load)


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
    for name in EXPERT_PARAMETERS:
        weight = experts._parameters[name]
        experts._parameters[name] = None  # the full-precision weight goes (with the model's last reference to it)
        _quantize_parameter(experts, name, (weight[expert] for expert in range(weight.shape[0])), device)
        weight = None


def _quantize_parameter(experts: nn.Module, name: str, weights, device) -> nn.Parameter:
    """Store projection `name` of `experts` as NF4 from `weights`, its experts' full-precision weights in order (an
    iterable, so a caller can produce each one only when it is needed), quantized one at a time on `device` (None:
    where each weight is): the packed codes become the (frozen) parameter `name`, the statistics buffers. Once every
    projection is stored, the module is marked quantized and takes the per-expert forward. Returns the parameter."""
    from bitsandbytes.functional import quantize_4bit

    packed, absmax, absmax2, offsets = [], [], [], []
    for weight in weights:
        shape, dtype = tuple(weight.shape), weight.dtype
        data, state = quantize_4bit(
            weight.detach().to(device).contiguous(),
            blocksize=BLOCKSIZE,
            compress_statistics=True,
            quant_type="nf4",
        )
        weight = None
        packed.append(data.view(-1))
        absmax.append(state.absmax)
        absmax2.append(state.state2.absmax)
        offsets.append(state.offset.reshape(()))
    parameter = nn.Parameter(torch.stack(packed), requires_grad=False)
    # In the place the weight had among the module's parameters: PEFT nests one wrapper per targeted parameter in
    # that order, which fixes the adapter's keys.
    experts._parameters[name] = parameter
    experts.register_buffer(f"{name}_absmax", torch.stack(absmax))
    experts.register_buffer(f"{name}_absmax2", torch.stack(absmax2))
    experts.register_buffer(f"{name}_offset", torch.stack(offsets))
    experts.register_buffer("nf4_code", state.code)
    experts.register_buffer("nf4_code2", state.state2.code)
    states = experts.__dict__.setdefault(PENDING, {})
    states[name] = (shape, dtype, state.state2.blocksize)
    if all(projection in states for projection in EXPERT_PARAMETERS):
        setattr(experts, NF4, experts.__dict__.pop(PENDING))
        experts.__class__ = _quantized_class(type(experts))
    return parameter


@contextlib.contextmanager
def experts_quantized_at_load():
    """While open, a from_pretrained with bitsandbytes' 4-bit config also stores the routed experts in NF4 as they
    load (`_experts_quantizer`), so the model's full-precision experts are never held: one expert's at a time (one
    layer's projection from a checkpoint that stores the stacks). Outside it, transformers' own 4-bit quantizer is
    back."""
    from transformers.quantizers import auto

    own = auto.AUTO_QUANTIZER_MAPPING["bitsandbytes_4bit"]
    auto.AUTO_QUANTIZER_MAPPING["bitsandbytes_4bit"] = _experts_quantizer(own)
    try:
        yield
    finally:
        auto.AUTO_QUANTIZER_MAPPING["bitsandbytes_4bit"] = own


@functools.cache
def _experts_quantizer(base):
    """transformers' bitsandbytes 4-bit quantizer that also stores the 3-D routed-expert parameters in NF4 as they
    load; the nn.Linear layers go to bitsandbytes as before.

    The hub checkpoints store one tensor per expert, which transformers would read for a whole layer and stack (and,
    for gate_up_proj, concatenate) into the layer's bf16 experts: those merges become `ExpertsToNF4`, which reads
    each expert's tensors only when it quantizes that expert. A checkpoint that stores the stacks whole loads each
    stack, which is then quantized expert by expert. Either way on the device the layer is placed on."""
    from transformers.core_model_loading import Concatenate, ConversionOps, MergeModulelist, WeightConverter

    class ExpertsToNF4(ConversionOps):
        """One layer's expert projection from its per-expert checkpoint tensors: expert by expert, read (gate and up
        joined along their output rows, as the stack's Concatenate(dim=1) joins them) and quantized."""

        def convert(self, input_dict, source_patterns, target_patterns, full_layer_name=None, model=None, **kwargs):
            pieces = [input_dict.pop(pattern) for pattern in source_patterns if pattern in input_dict]
            experts, projection = _expert_projection(model, full_layer_name)

            def weights():
                for expert in range(len(pieces[0])):
                    parts = [_read(piece, expert) for piece in pieces]
                    yield parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

            return {target_patterns[0]: _quantize_parameter(experts, projection, weights(), None)}

    class LazyExpertsConverter(WeightConverter):
        """A per-expert merge whose tensors are handed over still unread (to ExpertsToNF4)."""

        def materialize_tensors(self):
            return {key: list(self.collected_tensors.pop(key)) for key in list(self.collected_tensors)}

    class ExpertsOrLinearQuantize:
        def __init__(self, quantizer):
            self.linear = base.get_quantize_ops(quantizer)

        def convert(self, input_dict, model=None, **kwargs):
            result = {}
            for name, value in input_dict.items():
                value = value[0] if isinstance(value, list) else value
                experts, projection = _expert_projection(model, name)
                if experts is None:
                    result.update(self.linear.convert({name: value}, model=model, **kwargs))
                elif getattr(experts, projection) is value:  # stored already, by ExpertsToNF4
                    result[name] = value
                else:
                    result[name] = _quantize_parameter(experts, projection, iter(value), None)
            return result

    def per_expert_merge(converter) -> bool:
        """A merge of per-expert tensors into one expert projection, as transformers' MoE mappings write it."""
        operations = [(type(op), getattr(op, "dim", None)) for op in converter.operations]
        targets = converter._original_target_patterns
        return (
            len(targets) == 1
            and targets[0].rpartition(".")[2] in EXPERT_PARAMETERS
            and operations in ([(MergeModulelist, 0)], [(MergeModulelist, 0), (Concatenate, 1)])
        )

    class ExpertsNF4Quantizer(base):
        def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
            return _expert_projection(model, param_name)[0] is not None or super().param_needs_quantization(
                model, param_name, **kwargs
            )

        def get_quantize_ops(self):
            return ExpertsOrLinearQuantize(self)

        def update_weight_conversions(self, weight_conversions, model):
            converted = []
            for converter in super().update_weight_conversions(weight_conversions, model):
                if type(converter) is WeightConverter and per_expert_merge(converter):
                    lazy = LazyExpertsConverter(
                        source_patterns=converter._original_source_patterns,
                        target_patterns=converter._original_target_patterns,
                        operations=[ExpertsToNF4()],
                        # No detour through the CPU for this merge: one expert is read at a time, and the loader
                        # would move only the packed parameter to the device afterwards, not its statistics.
                        force_cpu=False,
                    )
                    lazy.scope_prefix, lazy.base_model_prefix = converter.scope_prefix, converter.base_model_prefix
                    converter = lazy
                converted.append(converter)
            return converted

    return ExpertsNF4Quantizer


def _read(pieces: list, index: int) -> torch.Tensor:
    """Entry `index` of a converter's collected tensors, read now if it was left unread (a Future of the loader's
    threads, or the call that reads it); the list lets it go."""
    from concurrent.futures import Future

    piece, pieces[index] = pieces[index], None
    if isinstance(piece, Future):
        return piece.result()
    return piece() if callable(piece) else piece


def _expert_projection(model, param_name: str):
    """(the routed-experts module, the projection) when `param_name` is one of their weights, else (None, None)."""
    module_name, _, projection = param_name.rpartition(".")
    if projection not in EXPERT_PARAMETERS:
        return None, None
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None, None
    stored = module._parameters.get(projection)
    if is_quantized(module) or projection in module.__dict__.get(PENDING, {}):
        return module, projection
    if isinstance(stored, nn.Parameter) and stored.dim() == 3:
        return module, projection
    return None, None


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
