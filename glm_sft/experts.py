"""LoRA on the mixture-of-experts GLM models: the routed experts computed per expert, and what `lora_target` covers.

transformers v5 keeps an MoE layer's routed experts as two 3-D parameters, `mlp.experts.gate_up_proj` and
`mlp.experts.down_proj`. PEFT (0.21) adapts those with `lora.ParamWrapper`, which forms W + B·A for the whole expert
stack in every forward and backward and has no dropout. Ours, `glm_sft.experts.ParamWrapper`, is a subclass (the
same sub-modules, so the same adapter keys and shapes, the same merge and unload) whose forward computes, for each
expert e on the tokens routed to it, y = x·W_e + s·(dropout(x)·A_e)·B_e; the stack's W + B·A is never formed. It
reaches PEFT through LoraConfig's custom-module registration, so what it saves is a standard PEFT adapter: plain PEFT
loads it (into its own ParamWrapper) and merges it.

`moe_lora_config` also sets the scope: `lora_target: all` is the attention, the dense MLP layers, the shared experts
and the routed experts; the router (`gate`) trains only when named.
"""

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners import lora
from torch import nn

from glm_sft import UserError

EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")
GATE_UP = EXPERT_PARAMETERS[0]
ROUTER = "gate"  # the router's name in the MoE block; its weight is a 2-D parameter of a custom module
# PEFT's own choice for the fused experts (utils/transformers_weight_conversion.py): gate and up keep rank r and
# lora_alpha each, so the fused gate_up_proj gets twice both.
GATE_UP_PATTERN = r".*\.gate_up_proj"


def routed_experts(model) -> list[nn.Module]:
    """The routed-experts modules (3-D gate_up_proj and down_proj) of a transformers v5 MoE model; [] if dense. Under
    ZeRO-3 a parameter's own shape is a placeholder's: its full shape is ds_shape."""
    from glm_sft.quantized_experts import is_quantized

    def three_d(parameter) -> bool:
        return isinstance(parameter, nn.Parameter) and len(getattr(parameter, "ds_shape", parameter.shape)) == 3

    return [
        module
        for module in model.modules()
        if is_quantized(module) or all(three_d(module._parameters.get(name)) for name in EXPERT_PARAMETERS)
    ]


def moe_blocks(model) -> list[nn.Module]:
    """The MoE blocks (a decoder layer's `mlp` on the MoE layers): the modules that hold routed experts."""
    experts = {id(module) for module in routed_experts(model)}
    return [module for module in model.modules() if any(id(child) in experts for child in module.children())]


def mark_zero3_leaf_modules(model) -> int:
    """Under DeepSpeed ZeRO-3, make every MoE block a leaf module: its parameters (router, routed and shared experts)
    are gathered once when the block runs, not expert by expert as each is touched. Returns how many blocks."""
    from deepspeed.utils import set_z3_leaf_modules

    blocks = moe_blocks(model)
    if blocks:
        set_z3_leaf_modules(model, list(dict.fromkeys(type(block) for block in blocks)))
    return len(blocks)


@dataclass
class MoeLoraConfig(LoraConfig):
    """A LoraConfig whose saved adapter_config.json plain PEFT loads: PEFT refuses LoRA on parameters (the experts)
    when the config asks for dropout, and dropout only acts in training, so the file says lora_dropout 0."""

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        dropout, self.lora_dropout = self.lora_dropout, 0.0
        try:
            super().save_pretrained(save_directory, **kwargs)
        finally:
            self.lora_dropout = dropout


def moe_lora_config(model, target_names: list[str] | None, **settings) -> MoeLoraConfig:
    """The LoRA config for an MoE model. `target_names`: module names (aliases resolved), None for `all`.
    `settings`: r, lora_alpha, lora_dropout, use_dora, use_rslora.

    PEFT's conversion for transformers v5 MoE models (run at every get_peft_model and every load) turns the names
    gate_proj, up_proj and down_proj into the experts' parameters and drops the dense and shared-expert MLP modules of
    those names, so they are named here as parameters (`gate_proj.weight`), which it leaves alone; `_linear_lora`
    gives them PEFT's ordinary module LoRA in training."""
    linear_names = linear_names_of(model)
    names = set(linear_names) if target_names is None else set(target_names)
    routed = set(EXPERT_PARAMETERS) if target_names is None else set()
    if target_names is not None:
        untrainable = names & (set(linear_names_of(model, include_indexer=True)) - set(linear_names))
        if untrainable:
            raise UserError(
                f"lora_target: {', '.join(sorted(untrainable))} belong to the sparse-attention indexer, which runs "
                "without gradients: LoRA there never trains; leave them out"
            )
        if {"gate_proj", "up_proj"} <= names or "gate_up_proj" in names:
            routed.add("gate_up_proj")
        if "down_proj" in names:
            routed.add("down_proj")
        unknown = names - set(linear_names) - set(EXPERT_PARAMETERS) - {ROUTER}
        if unknown:
            known = f"{', '.join(linear_names)}, {', '.join(EXPERT_PARAMETERS)} (routed experts), {ROUTER} (router)"
            raise UserError(f"lora_target: {', '.join(sorted(unknown))} not found in this model; its modules: {known}")
    remapped = _names_peft_remaps(model, linear_names)
    target_modules = sorted(name for name in names & set(linear_names) if name not in remapped)
    target_parameters = [f"experts.{name}" for name in EXPERT_PARAMETERS if name in routed]
    target_parameters += [f"{name}.weight" for name in sorted(names & remapped)]
    target_parameters += [f"{ROUTER}.weight"] if ROUTER in names else []
    r, alpha = settings["r"], settings["lora_alpha"]
    patterns = "gate_up_proj" in routed
    config = MoeLoraConfig(
        target_modules=target_modules,
        target_parameters=target_parameters,
        rank_pattern={GATE_UP_PATTERN: 2 * r} if patterns else {},
        alpha_pattern={GATE_UP_PATTERN: 2 * alpha} if patterns else {},
        task_type="CAUSAL_LM",
        **settings,
    )
    # PEFT calls each mapped value like a LoRA layer class; ours are functions that return None to leave a target to
    # PEFT's own dispatch.
    config._register_custom_module(
        {**{type(module): _expert_lora for module in routed_experts(model)}, nn.Linear: _linear_lora}
    )
    return config


def linear_names_of(model, include_indexer: bool = False) -> list[str]:
    """The names of the decoder's Linear modules, in model order, without the LM head and (unless asked) GLM-5's
    sparse-attention indexer, whose forward runs under no_grad."""
    head = model.get_output_embeddings()
    names = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head:
            if include_indexer or "indexer" not in path.split("."):
                names.setdefault(path.rsplit(".", 1)[-1], None)
    return list(names)


def _names_peft_remaps(model, names) -> set[str]:
    """The module names that PEFT's transformers v5 conversion turns into expert parameters (on the GLM MoE models
    gate_proj, up_proj and down_proj), asked of PEFT itself."""
    from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers

    probe = LoraConfig(target_modules=list(names))
    convert_peft_config_for_transformers(probe, model=model, conversions=None)
    return set(names) - set(probe.target_modules)


def _without(config, **changes):
    plain = copy.copy(config)
    for key, value in changes.items():
        setattr(plain, key, value)
    return plain


def _linear_lora(target, adapter_name, config, parameter_name=None, **kwargs):
    """A Linear's weight named in target_parameters gets PEFT's module LoRA (x·A·B, dropout); plain PEFT, without
    this mapping, loads the same keys and shapes into a ParamWrapper (W + B·A, the same function)."""
    if parameter_name != "weight":
        return None  # a module target: PEFT's dispatch
    return lora.LoraModel._create_new_module(_without(config, _custom_modules=None), adapter_name, target, **kwargs)


def _expert_lora(target, adapter_name, config, parameter_name=None, **kwargs):
    if parameter_name not in EXPERT_PARAMETERS:
        return None
    return ParamWrapper(target, adapter_name, parameter_name=parameter_name, config=config, **kwargs)


class ParamWrapper(lora.ParamWrapper):
    """PEFT's LoRA on one expert parameter (gate_up_proj or down_proj), with dropout, computed per expert. PEFT nests
    one wrapper per parameter on the experts module; the outermost runs the experts with every wrapper's LoRA. (The
    class keeps PEFT's name: PEFT tells parameter wrappers apart by class name when it nests them.)"""

    def __init__(self, base_layer, adapter_name, parameter_name, config, **kwargs):
        experts = base_layer.get_base_layer() if isinstance(base_layer, lora.ParamWrapper) else base_layer
        gated = getattr(experts, "has_gate", False) and not getattr(experts, "has_post_expert_norm", True)
        if not gated:
            raise ValueError(f"{type(experts).__name__}: expert LoRA needs transformers' gated experts, no post norm")
        super().__init__(base_layer, adapter_name, parameter_name, _without(config, lora_dropout=0.0), **kwargs)
        self._set_dropout(adapter_name, config.lora_dropout)

    def _get_in_out_features(self, module):
        from glm_sft.quantized_experts import is_quantized, logical_shape

        experts = self.get_base_layer()
        if not is_quantized(experts):
            return super()._get_in_out_features(module)
        # 4-bit experts (glm_sft.quantized_experts): the parameter is the packed storage; the shape is the weight's.
        self.num_experts, in_features, out_features = logical_shape(experts, self.parameter_name)
        self._param_ndim = 3
        return in_features, out_features

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
        super().update_layer(adapter_name, r, lora_alpha, _without(config, lora_dropout=0.0), **kwargs)
        self._set_dropout(adapter_name, config.lora_dropout)

    def _set_dropout(self, adapter_name: str, p: float) -> None:
        self.lora_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()

    def forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        self._check_forward_args(hidden_states, *args, **kwargs)
        if self.disable_adapters:
            return super().forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        adapters = {name: [] for name in EXPERT_PARAMETERS}
        wrapper = self
        while isinstance(wrapper, lora.ParamWrapper):  # PEFT's own wrappers too: their LoRA has the same layout
            for name in wrapper.active_adapters:
                if name in wrapper.lora_A and name not in wrapper.merged_adapters:
                    adapters[wrapper.parameter_name].append(_factors(wrapper, name))
            wrapper = wrapper.base_layer
        return experts_forward(wrapper, hidden_states, top_k_index, top_k_weights, adapters)


def _factors(wrapper: lora.ParamWrapper, adapter_name: str):
    """(A as experts x rank x in, B as experts x out x rank, scaling, dropout) in ParamWrapper's layout: A's rows are
    expert-major, B's columns rank-major (see ParamWrapper.get_delta_weight)."""
    experts = wrapper.num_experts
    weight_a = wrapper.lora_A[adapter_name].weight
    weight_b = wrapper.lora_B[adapter_name].weight
    lora_a = weight_a.view(experts, -1, weight_a.shape[-1])
    lora_b = weight_b.view(weight_b.shape[0], -1, experts).permute(2, 0, 1).contiguous()
    return lora_a, lora_b, wrapper.scaling[adapter_name], wrapper.lora_dropout[adapter_name]


def experts_forward(experts, hidden_states, top_k_index, top_k_weights, adapters) -> torch.Tensor:
    """The experts module's forward with LoRA: `adapters` maps each of its parameter names to a list of factors.
    grouped_mm where the model asks for it and the input is on an accelerator; the per-expert loop on CPU and for 4-bit
    experts (glm_sft.quantized_experts)."""
    from glm_sft.quantized_experts import is_quantized

    implementation = getattr(experts.config, "_experts_implementation", None)
    # 4-bit experts take the per-expert loop everywhere: each expert is dequantized only when tokens reach it.
    quantized = is_quantized(experts)
    if hidden_states.device.type != "cpu" and implementation not in (None, "eager") and not quantized:
        return grouped_experts_forward(experts, hidden_states, top_k_index, top_k_weights, adapters)
    return eager_experts_forward(experts, hidden_states, top_k_index, top_k_weights, adapters)


def eager_experts_forward(experts, hidden_states, top_k_index, top_k_weights, adapters) -> torch.Tensor:
    """The per-expert loop, with y = x·W_e + s·(dropout(x)·A_e)·B_e in each projection. Without dropout in play and
    with the base weights frozen, `SortedExperts` runs it (rows sorted by expert once, activations recomputed in the
    backward); otherwise autograd records transformers' eager loop."""
    dropping = any(
        isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0
        for factors in adapters.values()
        for *_, dropout in factors
    )
    frozen = not any(getattr(experts, name).requires_grad for name in EXPERT_PARAMETERS)
    if not dropping and frozen:
        factors = [tensor for name in EXPERT_PARAMETERS for a, b, _, _ in adapters[name] for tensor in (a, b)]
        return SortedExperts.apply(experts, adapters, hidden_states, top_k_index, top_k_weights, *factors)
    return _autograd_experts_forward(experts, hidden_states, top_k_index, top_k_weights, adapters)


def _autograd_experts_forward(experts, hidden_states, top_k_index, top_k_weights, adapters) -> torch.Tensor:
    """transformers' eager experts loop with the LoRA terms, every step recorded by autograd (dropout, trained
    base weights)."""
    final_hidden_states = torch.zeros_like(hidden_states)
    count = experts.num_experts
    with torch.no_grad():
        expert_mask = F.one_hot(top_k_index, num_classes=count + 1).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
    for expert in expert_hit:
        if expert == count:  # expert parallelism's placeholder for experts held elsewhere
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert])
        projected = _expert_linear(experts, "gate_up_proj", expert, hidden_states[token_idx], adapters)
        projected = _expert_linear(experts, "down_proj", expert, experts._apply_gate(projected), adapters)
        projected = projected * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, projected.to(final_hidden_states.dtype))
    return final_hidden_states


class SortedExperts(torch.autograd.Function):
    """The routed experts with LoRA, rows sorted by expert once per layer, each expert's rows a contiguous slice. The
    forward keeps nothing per expert but x·A_e of the gate_up projection (rank columns per row); the backward
    recomputes each expert's gate_up output from the layer input, so no expert activations stay alive between the
    two passes. The routing weights' gradient is <dL/dy_e, y_e>, formed from the down projection's input gradient,
    so y_e is not recomputed. Frozen base weights, no dropout (eager_experts_forward decides)."""

    @staticmethod
    def forward(ctx, experts, adapters, hidden_states, top_k_index, top_k_weights, *factors):
        top_k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=experts.num_experts + 1)[: experts.num_experts].tolist()
        order = order[: sum(counts)]  # rows for expert parallelism's placeholder (ids past the last) sort last
        tokens = order // top_k
        weights = top_k_weights.reshape(-1)[order].unsqueeze(-1)
        low_ranks = [hidden_states.new_empty(len(order), a.shape[1], dtype=a.dtype) for a, *_ in adapters[GATE_UP]]
        final = torch.zeros_like(hidden_states)
        for expert, rows in _slices(counts):
            index = tokens[rows]
            projected = _project(experts, "gate_up_proj", expert, hidden_states[index], adapters, low_ranks, rows)
            projected = _project(experts, "down_proj", expert, experts._apply_gate(projected), adapters)
            final.index_add_(0, index, (projected * weights[rows].to(projected.dtype)).to(final.dtype))
        ctx.experts, ctx.adapters, ctx.counts, ctx.shape = experts, adapters, counts, top_k_index.shape
        ctx.save_for_backward(hidden_states, top_k_weights, order, *low_ranks)
        return final

    @staticmethod
    def backward(ctx, grad_final):
        experts, adapters, counts = ctx.experts, ctx.adapters, ctx.counts
        hidden_states, top_k_weights, order, *low_ranks = ctx.saved_tensors
        tokens = order // ctx.shape[-1]
        weights = top_k_weights.reshape(-1)[order].unsqueeze(-1)
        grad_hidden = torch.zeros_like(hidden_states) if ctx.needs_input_grad[2] else None
        grad_weights = torch.zeros_like(weights) if ctx.needs_input_grad[4] else None
        grads = {name: [torch.zeros_like(t) for a, b, _, _ in adapters[name] for t in (a, b)] for name in adapters}
        for expert, rows in _slices(counts):
            index = tokens[rows]
            inputs = hidden_states[index]
            with torch.no_grad():
                projected = _project(experts, "gate_up_proj", expert, inputs, adapters, low_ranks, rows, saved=True)
            with torch.enable_grad():
                pre = projected.requires_grad_()
                gated = experts._apply_gate(pre)
            grad_outputs = grad_final[index].to(gated.dtype)
            scale = weights[rows].to(gated.dtype)
            # dL/d(gated) before the routing weight: y_e is linear in gated, so its row dot with gated is dL/dweight
            grad_gated = _project_backward(
                experts, "down_proj", expert, grad_outputs, gated.detach(), None, scale, adapters, grads
            )
            if grad_weights is not None:
                dots = (grad_gated * gated.detach()).sum(-1, keepdim=True)
                if experts.has_bias:  # y_e = gated·W_e + bias_e: the bias's share of <dL/dy_e, y_e>
                    dots += grad_outputs @ experts.down_proj_bias[expert].to(grad_outputs.dtype).unsqueeze(-1)
                grad_weights[rows] = dots.to(grad_weights.dtype)
            (grad_pre,) = torch.autograd.grad(gated, pre, grad_gated * scale)
            grad_inputs = _project_backward(
                experts, "gate_up_proj", expert, grad_pre, inputs, (low_ranks, rows), None, adapters, grads
            )
            if grad_hidden is not None:
                grad_hidden.index_add_(0, index, grad_inputs.to(grad_hidden.dtype))
        if grad_weights is not None:
            grad_weights = torch.zeros_like(top_k_weights).reshape(-1).index_copy_(0, order, grad_weights.view(-1))
            grad_weights = grad_weights.view(ctx.shape)
        return None, None, grad_hidden, None, grad_weights, *grads["gate_up_proj"], *grads["down_proj"]


def _slices(counts):
    """(expert, its rows' slice) for each expert with rows, rows sorted by expert."""
    start = 0
    for expert, count in enumerate(counts):
        if count:
            yield expert, slice(start, start + count)
            start += count


def _weight(experts, name: str, expert: int, dtype):
    """Expert `expert`'s weight of projection `name`: the parameter's slice, or dequantized to `dtype` if 4-bit."""
    from glm_sft.quantized_experts import expert_weight, is_quantized

    if is_quantized(experts):
        return expert_weight(experts, name, expert).to(dtype)
    return getattr(experts, name)[expert]


def _project(experts, name, expert, inputs, adapters, low_ranks=None, rows=None, saved=False):
    """One expert's projection `name`: x·W_e (+ bias) + s·(x·A_e)·B_e for each adapter. With `low_ranks`, x·A_e goes
    to (or, `saved`, comes from) low_ranks[adapter][rows]."""
    weight = _weight(experts, name, expert, inputs.dtype)
    outputs = inputs @ weight if experts.is_transposed else inputs @ weight.t()
    if experts.has_bias:
        outputs += getattr(experts, f"{name}_bias")[expert]
    for index, (lora_a, lora_b, scaling, _) in enumerate(adapters[name]):
        if saved:
            low_rank = low_ranks[index][rows]
        else:
            low_rank = inputs.to(lora_a.dtype) @ lora_a[expert].t()
            if low_ranks is not None:
                low_ranks[index][rows] = low_rank
        if lora_b.dtype == outputs.dtype:
            outputs.addmm_(low_rank, lora_b[expert].t(), alpha=scaling)
        else:
            outputs += (low_rank @ lora_b[expert].t() * scaling).to(outputs.dtype)
    return outputs


def _project_backward(experts, name, expert, grad_outputs, inputs, low_ranks, row_scale, adapters, grads):
    """For dL/d(outputs) = row_scale * grad_outputs (row_scale None: 1) of `_project`: adds each adapter's A_e and B_e
    gradients to grads[name] and returns the input's gradient without row_scale (SortedExperts.backward applies it)."""
    weight = _weight(experts, name, expert, grad_outputs.dtype)
    grad_inputs = grad_outputs @ weight.t() if experts.is_transposed else grad_outputs @ weight
    scaled = grad_outputs if row_scale is None else grad_outputs * row_scale
    for index, (lora_a, lora_b, scaling, _) in enumerate(adapters[name]):
        grad_low = grad_outputs.to(lora_b.dtype) @ lora_b[expert]  # rows x rank
        grad_inputs += (grad_low @ lora_a[expert] * scaling).to(grad_inputs.dtype)
        x = inputs.to(lora_a.dtype)
        low_rank = x @ lora_a[expert].t() if low_ranks is None else low_ranks[0][index][low_ranks[1]]
        if row_scale is not None:
            grad_low = grad_low * row_scale.to(grad_low.dtype)
        grads[name][2 * index][expert] = grad_low.t() @ x * scaling
        grads[name][2 * index + 1][expert] = scaled.to(lora_b.dtype).t() @ low_rank * scaling
    return grad_inputs


def _expert_linear(experts, name: str, expert: int, inputs, adapters):
    weight = _weight(experts, name, expert, inputs.dtype)
    outputs = inputs @ weight if experts.is_transposed else F.linear(inputs, weight)
    if experts.has_bias:
        outputs = outputs + getattr(experts, f"{name}_bias")[expert]
    for lora_a, lora_b, scaling, dropout in adapters[name]:
        low_rank = F.linear(dropout(inputs).to(lora_a.dtype), lora_a[expert])
        outputs = outputs + (F.linear(low_rank, lora_b[expert]) * scaling).to(outputs.dtype)
    return outputs


def grouped_experts_forward(experts, hidden_states, top_k_index, top_k_weights, adapters) -> torch.Tensor:
    """transformers' grouped_mm experts forward (rows sorted by expert, one grouped matmul per projection), with two
    more grouped matmuls per LoRA: (dropout(x)·A_e)·B_e."""
    top_k = top_k_index.size(-1)
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    inputs = hidden_states[perm // top_k]
    routing_weights = top_k_weights.reshape(-1)[perm]
    # histc, as transformers counts: bincount has no deterministic CUDA kernel, histc no integer one on CPU
    counts = expert_ids.float() if expert_ids.device.type in ("cpu", "mps") else expert_ids.int()
    counts = torch.histc(counts, bins=experts.num_experts, min=0, max=experts.num_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    projected = _grouped_expert_linear(experts, "gate_up_proj", inputs, expert_ids, offsets, adapters)
    projected = experts._apply_gate(projected)
    projected = _grouped_expert_linear(experts, "down_proj", projected, expert_ids, offsets, adapters)
    projected = projected * routing_weights.unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.size(0), device=perm.device)
    return projected[inverse].view(hidden_states.size(0), top_k, -1).sum(dim=1).to(hidden_states.dtype)


def _grouped_expert_linear(experts, name: str, inputs, expert_ids, offsets, adapters):
    from transformers.integrations.moe import _grouped_linear

    bias = getattr(experts, f"{name}_bias")[expert_ids] if experts.has_bias else None
    outputs = _grouped_linear(inputs, getattr(experts, name), offsets, bias=bias, is_transposed=experts.is_transposed)
    for lora_a, lora_b, scaling, dropout in adapters[name]:
        low_rank = _grouped_mm(dropout(inputs).to(lora_a.dtype), lora_a.transpose(-2, -1), offsets)
        outputs = outputs + (_grouped_mm(low_rank, lora_b.transpose(-2, -1), offsets) * scaling).to(outputs.dtype)
    return outputs


def _grouped_mm(inputs, weight, offsets):
    """Rows of `inputs` (sorted by expert) times their expert's matrix in `weight` (experts x in x out): torch's
    grouped_mm through transformers' dispatcher; its per-expert loop where a rank leaves rows under the kernel's
    16-byte alignment."""
    from transformers.integrations.moe import _grouped_mm as grouped_mm

    if any(size * weight.element_size() % 16 for size in weight.shape[1:]):
        return torch.ops.transformers.grouped_mm_fallback(inputs.to(weight.dtype), weight, offs=offsets)
    return grouped_mm(inputs, weight, offsets)
