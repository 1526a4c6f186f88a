"""The fine-tuning methods: checks before any weights load, quantization, preparation, and each method's PEFT config.

lora (default), qlora (LoRA on a 4-bit NF4 or 8-bit base; in 4-bit the MoE models' routed experts too, through
glm_sft.quantized_experts), ptuning (P-Tuning v2 prefixes), full, freeze (only the last layers train).
"""

from glm_sft import UserError
from glm_sft.loading import torch_dtype

# ChatGLM's own module names, mapped to the native GLM classes' names.
GLM_MODULE_ALIASES = {
    "query_key_value": ["q_proj", "k_proj", "v_proj"],
    "dense": ["o_proj"],
    "dense_h_to_4h": ["gate_up_proj"],
    "dense_4h_to_h": ["down_proj"],
}


def lora_target_modules(lora_target: str):
    if lora_target.strip() == "all":
        return "all-linear"
    modules = []
    for name in (part.strip() for part in lora_target.split(",") if part.strip()):
        modules.extend(GLM_MODULE_ALIASES.get(name, [name]))
    return modules


FREEZE_EXTRA_MODULES = ("embed_tokens", "lm_head", "norm")


def check_method(model_args, training_args) -> None:
    """Stop before any weights load when the chosen method cannot work in this setup."""
    import importlib.util

    method = model_args.finetuning_type
    if method == "qlora":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("finetuning_type qlora needs bitsandbytes: pip install bitsandbytes==0.50.2")
        if model_args.quantization_bit not in (4, 8):
            raise UserError(f"quantization_bit must be 4 or 8, not {model_args.quantization_bit}")
    if method == "ptuning" and training_args.gradient_checkpointing:
        raise UserError(
            "finetuning_type ptuning cannot run with activation_checkpointing (gradient checkpointing): recomputing a "
            "layer would append its prefix to the attention cache a second time; set --activation_checkpointing false"
        )
    if method == "freeze":
        if model_args.freeze_trainable_layers < 0:
            raise UserError("freeze_trainable_layers must be 0 or more")
        unknown = [name for name in _names(model_args.freeze_extra_modules) if name not in FREEZE_EXTRA_MODULES]
        if unknown:
            raise UserError(
                f"freeze_extra_modules: unknown {', '.join(unknown)}; use {', '.join(FREEZE_EXTRA_MODULES)}"
            )
        if model_args.freeze_trainable_layers == 0 and not _names(model_args.freeze_extra_modules):
            raise UserError("finetuning_type freeze with no trainable layers and no extra modules trains nothing")


def _names(comma_list: str) -> list[str]:
    return [name.strip() for name in comma_list.split(",") if name.strip()]


def quantization_config(model_args):
    """QLoRA's BitsAndBytesConfig: NF4 with double quantization (or 8-bit); None for the other methods."""
    if model_args.finetuning_type != "qlora":
        return None
    from transformers import BitsAndBytesConfig

    if model_args.quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    from transformers.integrations import is_deepspeed_zero3_enabled

    compute_dtype = torch_dtype(model_args.quantization_compute_dtype, "qlora", True)
    # ZeRO-3 shards only floating-point tensors: the 4-bit weights are packed into the compute dtype (PEFT's recipe).
    storage = {"bnb_4bit_quant_storage": compute_dtype} if is_deepspeed_zero3_enabled() else {}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        **storage,
    )


def prepare_model(model, model_args, training_args) -> list[str]:
    """Method-specific preparation before PEFT wraps the model (or instead of it); returns lines for the start-up
    summary on what it did that the user should know."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    notes = []
    if is_deepspeed_zero3_enabled():
        from glm_sft.experts import mark_zero3_leaf_modules

        if blocks := mark_zero3_leaf_modules(model):
            notes.append(f"ZeRO-3: {blocks} MoE blocks are leaf modules (each block's experts gathered at once)")
    # Under ZeRO-3 the weights are sharded placeholders that must keep their dtype: no k-bit preparation (as TRL does).
    if model_args.finetuning_type == "qlora" and not is_deepspeed_zero3_enabled():
        from peft import prepare_model_for_kbit_training

        if model_args.quantization_bit == 4:
            from glm_sft.experts import routed_experts
            from glm_sft.quantized_experts import is_quantized, quantize_experts

            # load_model stores the routed experts (3-D weights, which bitsandbytes leaves alone) in NF4 as they load;
            # any it did not (a model loaded another way) go to NF4 here, before the k-bit preparation would cast
            # them to fp32.
            if at_load := sum(is_quantized(experts) for experts in routed_experts(model)):
                notes.append(f"QLoRA: the routed experts of {at_load} MoE layers went to 4-bit NF4 as they loaded")
            if after := quantize_experts(model):
                notes.append(f"QLoRA: the routed experts of {after} MoE layers went to 4-bit NF4 after the load")

        # Norms and other unquantized weights to fp32, input gradients on, gradient checkpointing as the recipe says.
        prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=training_args.gradient_checkpointing,
            gradient_checkpointing_kwargs=training_args.gradient_checkpointing_kwargs,
        )
        # bitsandbytes' CPU backend repacks 4-bit weights on the first no-grad forward (an eval pass), after which
        # training forwards fail; keep the trainable layout on CPU.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    elif model_args.finetuning_type == "freeze":
        layers = model.model.layers
        count = model_args.freeze_trainable_layers
        if count > len(layers):
            raise UserError(f"freeze_trainable_layers is {count} but the model has {len(layers)} layers")
        extras = {
            "embed_tokens": model.get_input_embeddings(),
            "lm_head": model.get_output_embeddings(),
            "norm": model.model.norm,
        }
        trained = [layers[index] for index in range(len(layers) - count, len(layers))]
        trained += [extras[name] for name in _names(model_args.freeze_extra_modules)]
        model.requires_grad_(False)
        for module in trained:
            module.requires_grad_(True)
    return notes


def build_peft_config(model_args, model=None):
    """The PEFT config of the chosen method, or None when the model's own weights train (full, freeze). With `model`
    a mixture-of-experts model, LoRA takes glm_sft.experts' config: per-expert LoRA on the routed experts and the
    MoE scope of `lora_target`."""
    method = model_args.finetuning_type
    if method in ("lora", "qlora"):
        settings = dict(
            r=model_args.lora_rank,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            use_dora=model_args.use_dora,
            use_rslora=model_args.use_rslora,
        )
        if model is not None:
            from glm_sft.experts import moe_lora_config, routed_experts

            if routed_experts(model):
                return moe_lora_config(model, lora_target_names(model_args.lora_target), **settings)
        from peft import LoraConfig

        target_modules = lora_target_modules(model_args.lora_target)
        return LoraConfig(target_modules=target_modules, task_type="CAUSAL_LM", **settings)
    if method == "ptuning":
        from peft import PrefixTuningConfig

        # P-Tuning v2: trained key/value prefixes at every layer, sized by PEFT from the model's KV heads (GQA).
        extra = {"encoder_hidden_size": model_args.prefix_hidden_size} if model_args.prefix_hidden_size else {}
        return PrefixTuningConfig(
            num_virtual_tokens=model_args.pre_seq_len,
            prefix_projection=model_args.prefix_projection,
            task_type="CAUSAL_LM",
            **extra,
        )
    return None


def lora_target_names(lora_target: str) -> list[str] | None:
    """The module names `lora_target` lists (ChatGLM aliases resolved), None for `all`."""
    modules = lora_target_modules(lora_target)
    return None if modules == "all-linear" else modules


# On the MoE models the LoRA of these is LoRA on weight parameters (glm_sft.experts): the MLP layers, the experts and
# the router (`gate`).
MOE_PARAMETER_TARGETS = ("gate_proj", "up_proj", "down_proj", "gate_up_proj", "gate")


def check_moe_lora(model_args, family: str) -> None:
    """Stop before the weights load when LoRA on a mixture-of-experts model asks for what LoRA on weight parameters
    (PEFT's, and so a plain PEFT load of the adapter) cannot give: DoRA on the MLP layers and experts, dropout on the
    router. Dropout on the experts works (glm_sft.experts)."""
    from glm_sft.template import MOE_FAMILIES

    if family not in MOE_FAMILIES or model_args.finetuning_type not in ("lora", "qlora"):
        return
    names = lora_target_names(model_args.lora_target)
    if model_args.use_dora and (names is None or set(names) & set(MOE_PARAMETER_TARGETS)):
        raise UserError(
            f"use_dora: on a mixture-of-experts model ({family} format) the LoRA of the MLP layers and the experts is "
            "LoRA on weight parameters, for which PEFT has no DoRA; set use_dora: false, or name only attention "
            "modules in lora_target"
        )
    if model_args.lora_dropout and names is not None and "gate" in names:
        raise UserError(
            f"lora_dropout is {model_args.lora_dropout}, but lora_target names the router (gate), whose LoRA (PEFT's, "
            "on its weight parameter) has no dropout; set lora_dropout: 0 or leave gate out of lora_target"
        )


def lora_scope(model) -> str | None:
    """Which modules the run's LoRA adapts, for the start-up summary: each once, in model order, by its path inside a
    decoder layer (`self_attn.q_proj`, `mlp.shared_experts.down_proj`, `mlp.experts.gate_up_proj`)."""
    names = {}
    for name, module in model.named_modules():
        adapters = getattr(module, "lora_A", None)
        if adapters is not None and len(adapters):
            parts = [part for part in name.split(".") if part != "base_layer"]
            layer = max((index for index, part in enumerate(parts[:-1]) if part == "layers"), default=None)
            short = ".".join(parts[layer + 2 :] if layer is not None else parts[-1:])
            parameter = getattr(module, "parameter_name", None)
            names.setdefault(f"{short}.{parameter}" if parameter and parameter != "weight" else short, None)
    return f"LoRA on {', '.join(names)}" if names else None


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; PEFT's count knows that a 4-bit tensor packs two weights per byte, ours adds
    that for the 4-bit routed experts."""
    from glm_sft.quantized_experts import packed_weights_uncounted

    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
        return trainable, total + packed_weights_uncounted(model)
    # Under ZeRO-3 each process holds an empty placeholder per weight; ds_numel is the full size.
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return trainable, total + packed_weights_uncounted(model)
