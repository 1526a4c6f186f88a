"""Training speed that changes nothing the model learns: padding-free batches, varlen attention, fused LM head.

Padding-free (the default): the rows of a batch are laid end to end in one sequence with no padding; position_ids
restart at 0 at each row, so rotary positions are those of the row alone, and attention runs per row, so no token sees
another row. The batch holds the same rows as a padded one and the loss is the same token-weighted mean; only the
wasted work on padding is gone. `packing: true` (TRL's best-fit-decreasing packing to max_length) uses the same
attention.

Attention for such batches: flash-attention 2 (varlen) on a GPU when the flash_attn package is installed, else
`sdpa_varlen` below: PyTorch's scaled_dot_product_attention run causally on each row's span, so each row costs its own
length squared (an SDPA block-diagonal mask over the whole batch would cost the batch length squared).

The LM head: TRL's SFTTrainer computes the loss from hidden states in tiles, never materialising the (tokens x
vocabulary) logits; `fused_lm_head_applied` checks that it is in place on our model. With Triton (a GPU) it scores
only the trained positions; its CPU fallback scores every position with about a dozen passes over each tile, so on
the CPU `lean_lm_head` scores the trained positions only, in one softmax pass, and its backward reuses that softmax.

LoRA (`lean_lora`): PEFT's function with less work per call. Dropout masks come from 32-bit random integers, and
under gradient checkpointing a layer's recomputation takes the mask it drew from the same random state instead of
drawing it again; the scale multiplies the rank-r activations instead of the layer's output.
"""

from functools import cache

from glm_sft import UserError

VARLEN_ATTENTION = "sdpa_varlen"


def _segment_bounds(query, key, attention_mask, kwargs) -> list[int] | None:
    """Row boundaries [0, e1, e2, ..., total] of a padding-free training batch, or None for any other batch.

    The collator of a padding-free batch passes them as `cu_seq_lens_q` (as flash-attention's varlen kernels take
    them); without them they are read from `position_ids`, which restart at 0 at each row. Generation and padded
    batches come with a mask and keep plain SDPA.
    """
    if query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return None
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is not None:
        bounds = bounds.tolist()
    elif attention_mask is None and kwargs.get("position_ids") is not None:
        position_ids = kwargs["position_ids"].reshape(-1)
        if position_ids.numel() != query.shape[2]:
            return None
        bounds = (position_ids == 0).nonzero().flatten().tolist() + [query.shape[2]]
        if bounds[0] != 0:
            return None
    return bounds if bounds is not None and len(bounds) > 2 else None


def sdpa_varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Causal SDPA on each row of a padding-free batch; other batches (padded, generation) get plain SDPA."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = _segment_bounds(query, key, attention_mask, kwargs)
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end <= start:
            continue
        part, _ = sdpa_attention_forward(
            module,
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            None,
            dropout=dropout,
            scaling=scaling,
            is_causal=True,
        )
        outputs.append(part)
    return torch.cat(outputs, dim=1), None


def varlen_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """No mask for a batch without padding and without cache (the rows are told apart by position_ids); SDPA's
    mask otherwise. Saves building a (tokens x tokens) block-diagonal mask for every padding-free batch."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length and q_offset == 0 and kv_offset == 0:
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=attention_mask, **kwargs)


def register_attention() -> None:
    """Make `sdpa_varlen` a transformers attention implementation."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(VARLEN_ATTENTION, sdpa_varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_ATTENTION, varlen_mask)


def flash_attention_usable(model) -> bool:
    """flash-attention 2 needs CUDA, the flash_attn package and half-precision weights."""
    import torch

    if not torch.cuda.is_available():
        return False
    from transformers.utils import is_flash_attn_2_available

    return is_flash_attn_2_available() and model.dtype in (torch.bfloat16, torch.float16)


def supports_padding_free(model) -> str | None:
    """None when the model can take padding-free batches, else why not (in words)."""
    if not getattr(model, "_supports_attention_backend", False) or not type(model).__module__.startswith(
        "transformers."
    ):
        return f"{type(model).__name__} does not use transformers' attention functions"
    if model.config.model_type == "glm_moe_dsa":
        return "GLM-5's DSA indexer picks each token's keys from the attention mask, which padding-free batches lack"
    return None


PTUNING_REASON = "the prefixes are attention keys shared by the whole sequence, so packed rows would see each other"


def check_batching(model_args, training_args) -> None:
    """Before any weights load: padding_free or packing set to true for a method that rules them out is an error."""
    if model_args.finetuning_type != "ptuning":
        return
    for key in ("packing", "padding_free"):
        if getattr(training_args, key):  # true; unset (None) and false pass
            raise UserError(
                f"finetuning_type ptuning cannot be combined with packing or padding_free: {PTUNING_REASON}; set "
                f"--{key} false"
            )


def configure(model, model_args, training_args) -> list[str]:
    """Choose batching and attention for this run, the one place that decides; returns the lines for the log.

    padding_free unset (None) is our default: padding-free where the model and method allow it and a batch holds
    more than one row, else padded. Set to true where it cannot hold, it is an error (as packing is). An unset
    train_sampling_strategy becomes group_by_length for padded batches of several rows (less padding), else random.
    """
    check_batching(model_args, training_args)
    reason = supports_padding_free(model)
    if model_args.finetuning_type == "ptuning":
        reason = "P-Tuning v2 prefixes are a key/value cache that every row of the sequence would share"
    if reason:
        for key in ("packing", "padding_free"):
            if getattr(training_args, key):
                raise UserError(f"{key} cannot be used here: {reason}; set --{key} false")
    # One row per batch holds no padding to remove: padding-free would change nothing (and TRL warns about it).
    one_row = training_args.per_device_train_batch_size == 1 and not training_args.packing
    if training_args.padding_free is None:
        training_args.padding_free = reason is None and not one_row
        if one_row and reason is None:
            reason = "per_device_train_batch_size 1: no padding to remove"
    packed = training_args.padding_free or training_args.packing
    if training_args.train_sampling_strategy is None:
        training_args.train_sampling_strategy = "random" if packed or one_row else "group_by_length"
    if packed:
        if flash_attention_usable(model):
            attention = "flash_attention_2"
        else:
            register_attention()
            attention = VARLEN_ATTENTION
        model.set_attn_implementation(attention)
        layout = "packed to max_length" if training_args.packing else "padding-free"
        lines = [f"batches: {layout}, each row attends only to itself (attention: {attention})"]
    else:
        why = f" ({reason})" if reason else ""
        lines = [f"batches: padded to their longest row{why}; sampling: {training_args.train_sampling_strategy}"]
    if training_args.use_liger_kernel:
        lines.append(check_liger(model))
    checkpointing = "on" if training_args.gradient_checkpointing else "off"
    lines.append(f"gradient checkpointing: {checkpointing}")
    return lines


def check_liger(model) -> str:
    """Liger patches by model type; refuse `use_liger_kernel` where it would only log and change nothing.

    Liger's GLM patches are for Glm4ForCausalLM (model type glm4: GLM-4-0414). GLM-4-9B's -hf checkpoints and our
    ChatGLM3 conversions are GlmForCausalLM (model type glm), for which Liger has none.
    """
    model_type = model.config.model_type
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        raise UserError("use_liger_kernel needs the liger-kernel package (CUDA): pip install liger-kernel") from None
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise UserError(
            f"use_liger_kernel: Liger has no kernels for model type {model_type} ({type(model).__name__}); its GLM "
            "patches are for Glm4ForCausalLM (GLM-4-0414). The loss is already fused by TRL; set --use_liger_kernel "
            "false"
        )
    return f"Liger kernels: {model_type} (RMSNorm, SwiGLU; the loss stays TRL's fused LM head)"


def fused_lm_head_applied(model) -> bool:
    """Whether the model's forward is TRL's fused LM head (loss from hidden states in tiles, no full logits)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    function = getattr(base.forward, "__func__", None)
    code = getattr(function, "__code__", None)
    return code is not None and (code.co_name == "_fused_forward" or getattr(function, "lean", False))


# ------------------------------------------------------------------------------------------------- lean LoRA and loss
#
# Less work per step for the same training: LoRA dropout masks drawn from 32-bit random integers (not Bernoulli
# samples one by one), the LoRA scale applied to the rank-r activations, and on the CPU a log-softmax of the trained
# positions only, with one pass where TRL's tile fallback makes several.

MASK_BITS = 2**32


def dropout_mask(x, p: float):
    """(keep, probability): a boolean mask shaped like x, True where an entry is kept, and the probability of that.

    An entry is kept when a uniform 32-bit integer is at least round(p * 2**32), so the drop probability is p to
    within 2**-33 and `probability` is exact; x * keep / probability has the expectation x. Drawing 32-bit integers
    costs less than `bernoulli_` on the CPU.
    """
    import torch

    drop = round(p * MASK_BITS)
    bits = torch.empty(x.shape, dtype=torch.int32, device=x.device).random_(-(2**31), 2**31)
    return bits >= drop - 2**31, 1 - drop / MASK_BITS


def _remembered_mask(layer, x, p: float):
    """`dropout_mask` for a layer, drawn once per random state on the CPU.

    Gradient checkpointing runs a layer's forward again in the backward, from the random state of the first run, so
    it would draw the same mask again. The layer keeps its last mask with the generator's state before and after the
    draw; a call from the same state with the same shape takes that mask and moves the generator to where the draw
    would have left it. Same masks, same random stream, half the draws. One mask per layer is kept (1 byte an entry).
    """
    import torch

    if x.device.type != "cpu":
        return dropout_mask(x, p)
    state = torch.get_rng_state()
    last = getattr(layer, "_last_dropout_mask", None)
    if last is not None and last[0] == (p, x.shape) and torch.equal(last[1], state):
        torch.set_rng_state(last[2])
        return last[3], last[4]
    keep, probability = dropout_mask(x, p)
    layer._last_dropout_mask = ((p, x.shape), state, torch.get_rng_state(), keep, probability)
    return keep, probability


def _lean_lora_forward(self, x, *args, **kwargs):
    """PEFT's LoRA Linear forward, same function and distribution: the dropout mask from `_remembered_mask`, and
    the scale (lora_alpha / r, over the keep probability) multiplies the rank-r activations, not the layer's output.
    Anything but plain LoRA (merged, disabled, DoRA and other variants, mixed adapter batches) takes PEFT's forward."""
    import torch

    variants = getattr(self, "lora_variant", {})
    if (
        self.disable_adapters
        or self.merged
        or kwargs.get("adapter_names") is not None
        or any(name in variants for name in self.active_adapters)
    ):
        return type(self).__mro__[1].forward(self, x, *args, **kwargs)
    kwargs.pop("adapter_names", None)
    result = self.base_layer(x, *args, **kwargs)
    result_dtype = result.dtype
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        lora_a, lora_b, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        inputs = self._cast_input_dtype(x, lora_a.weight.dtype)
        scale = self.scaling[name]
        if isinstance(dropout, torch.nn.Dropout) and dropout.training and dropout.p > 0:
            keep, probability = _remembered_mask(self, inputs, dropout.p)
            inputs, scale = inputs * keep.to(inputs.dtype), scale / probability
        elif not isinstance(dropout, torch.nn.Dropout | torch.nn.Identity):
            inputs = dropout(inputs)
        result = result + lora_b(lora_a(inputs) * scale)
    return result.to(result_dtype)


@cache
def _lean_linear_class():
    """PEFT's LoRA Linear with the lean forward: one subclass, made once."""
    from peft.tuners.lora.layer import Linear

    return type("LeanLinear", (Linear,), {"forward": _lean_lora_forward})


def lean_lora(model) -> int:
    """Give every plain PEFT LoRA Linear of `model` the lean forward (a subclass of its class, so PEFT, saving and
    merging see the same module); returns how many. Quantized and MoE LoRA layers keep their own forward."""
    from peft.tuners.lora.layer import Linear

    count = 0
    for module in model.modules():
        if type(module) is Linear:
            module.__class__ = _lean_linear_class()
            count += 1
    return count


# Saved softmax of the trained positions up to this many elements (fp32: 256 MiB); beyond it, the backward recomputes
# the logits tile by tile. Tiles hold at most TILE_ELEMENTS logits.
SAVE_ELEMENTS = 2**26
TILE_ELEMENTS = 2**24


def _tile_softmax(hidden, weight, targets):
    """For one tile of positions: (softmax, log-probability of the target, entropy, target is the first argmax)."""
    import torch

    logits = torch.mm(hidden, weight.t()).float()
    top1 = logits.argmax(-1) == targets
    logits.sub_(logits.amax(-1, keepdim=True))
    target = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    probs = logits.exp()
    total = probs.sum(-1)
    weighted = torch.linalg.vecdot(probs, logits)  # sum p * (z - max) before normalising
    log_total = total.log()
    probs.div_(total.unsqueeze(-1))
    return probs, target - log_total, log_total - weighted / total, top1


def _tiles(count: int, vocab: int):
    step = max(1, TILE_ELEMENTS // vocab)
    return [(start, min(start + step, count)) for start in range(0, count, step)]


@cache
def _trained_log_probs_class():
    import torch

    class TrainedLogProbs(torch.autograd.Function):
        """log p(target) of `hidden @ weight.T` for the trained positions only, in tiles, with the entropy and
        whether the target is the argmax (metrics, no gradient). The backward is softmax - one-hot, from the saved
        softmax when it fits in SAVE_ELEMENTS, else from the logits recomputed per tile."""

        @staticmethod
        def forward(ctx, hidden, weight, targets):
            tiles = _tiles(hidden.shape[0], weight.shape[0])
            keep = hidden.shape[0] * weight.shape[0] <= SAVE_ELEMENTS
            saved, parts = [], []
            for start, end in tiles:
                probs, *stats = _tile_softmax(hidden[start:end], weight, targets[start:end])
                parts.append(stats)
                if keep:
                    saved.append(probs)
            if not parts:  # no trained position in the batch
                empty = hidden.new_zeros(0, dtype=torch.float32)
                parts = [(empty, empty, empty.bool())]
            log_probs, entropy, top1 = (torch.cat(column) for column in zip(*parts, strict=True))
            ctx.tiles, ctx.keep = tiles, keep
            ctx.save_for_backward(hidden, weight, targets, *saved)
            ctx.mark_non_differentiable(entropy, top1)
            return log_probs, entropy, top1

        @staticmethod
        def backward(ctx, grad_log_probs, *_):
            hidden, weight, targets, *saved = ctx.saved_tensors
            need_hidden, need_weight = ctx.needs_input_grad[:2]
            grad_hidden = torch.empty_like(hidden) if need_hidden else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
            for index, (start, end) in enumerate(ctx.tiles):
                if ctx.keep:
                    probs = saved[index]
                else:
                    probs = _tile_softmax(hidden[start:end], weight, targets[start:end])[0]
                scale = grad_log_probs[start:end].float().unsqueeze(-1)
                grad = probs.mul_(-scale).scatter_add_(-1, targets[start:end].unsqueeze(-1), scale)  # d/dz
                grad = grad.to(weight.dtype)
                if need_hidden:
                    torch.mm(grad, weight, out=grad_hidden[start:end])
                if need_weight:
                    grad_weight.addmm_(grad.t().float(), hidden[start:end].float())
            return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None

    return TrainedLogProbs


# Config keys of a scaled or softcapped head (TRL's fused head handles them; ours does not).
LOGIT_SCALES = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def trained_log_probs(hidden, weight, targets):
    """(log p(target), entropy, target is the argmax) per row of hidden [N, H] under the head weight [V, H]."""
    return _trained_log_probs_class().apply(hidden, weight, targets)


def lean_lm_head(model) -> bool:
    """On top of TRL's fused LM head: on the CPU, where TRL scores every position with several passes over each
    logits tile, score the trained positions only with `trained_log_probs`. Elsewhere (TRL's Triton kernels), with a
    head bias, logit scaling or softcapping, router losses, a sharded head (ZeRO-3, FSDP) or without the fused head:
    TRL's forward. True when set."""
    import functools
    import types

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not fused_lm_head_applied(model):
        return False
    config = base.config.get_text_config()
    scaled = any(getattr(config, key, None) is not None for key in LOGIT_SCALES)
    head = base.get_output_embeddings()
    if scaled or head is None or getattr(head, "bias", None) is not None:
        return False
    if getattr(config, "output_router_logits", False):
        return False
    trl_forward = base.forward

    @functools.wraps(type(base).forward)
    def _lean_fused_forward(
        self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs
    ):
        head = self.get_output_embeddings()
        sharded = hasattr(head.weight, "ds_id") or type(head.weight).__name__ == "DTensor"  # ZeRO-3, FSDP: TRL gathers
        if not fused_lm_head or sharded or head.weight.device.type != "cpu" or kwargs.get("output_router_logits"):
            return trl_forward(
                *args,
                fused_lm_head=fused_lm_head,
                labels=labels,
                shift_labels=shift_labels,
                num_items_in_batch=num_items_in_batch,
                **kwargs,
            )
        from trl.trainer.utils import FusedCausalLMOutput

        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        mask = labels != -100
        log_probs, entropy, top1 = trained_log_probs(hidden[mask], head.weight, labels[mask])
        # masked_scatter keeps the loss connected to the model when no position is trained.
        log_probs, entropy, top1 = (
            value.new_zeros(mask.shape).masked_scatter(mask, value) for value in (log_probs, entropy, top1)
        )
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy, is_top1=top1, label_mask=mask
        )

    _lean_fused_forward.lean, _lean_fused_forward.fallback = True, trl_forward
    base.forward = types.MethodType(_lean_fused_forward, base)
    return True


def lean_training(model) -> list[str]:
    """The lean LoRA forward and LM head on a trainer's model; the lines for the start-up summary."""
    lines = []
    count = lean_lora(model)
    if count:
        lines.append(f"LoRA: lean forward on {count} layers (dropout masks drawn once per random state)")
    if lean_lm_head(model):
        lines.append("LM head on the CPU: trained positions only, one softmax pass per tile")
    return lines
