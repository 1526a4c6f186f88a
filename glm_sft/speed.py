"""Training speed that changes nothing the model learns: padding-free batches, varlen attention, fused LM head.

Padding-free (the default): the rows of a batch are laid end to end in one sequence with no padding; position_ids
restart at 0 at each row, so rotary positions are those of the row alone, and attention runs per row, so no token sees
another row. The batch holds the same rows as a padded one and the loss is the same token-weighted mean; only the
wasted work on padding is gone. `packing: true` (TRL's best-fit-decreasing packing to max_length) uses the same
attention.

Attention for such batches: flash-attention 2 (varlen) on a GPU when the flash_attn package is installed, else
`sdpa_varlen` below: PyTorch's scaled_dot_product_attention run causally on each row's span, so each row costs its own
length squared (an SDPA block-diagonal mask over the whole batch would cost the batch length squared).

The LM head: TRL's SFTTrainer computes the loss from hidden states in tiles, only at trained positions, never
materialising the (tokens x vocabulary) logits; `fused_lm_head_applied` checks that it is in place on our model.
"""

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
    code = getattr(getattr(base.forward, "__func__", None), "__code__", None)
    return code is not None and code.co_name == "_fused_forward"
