"""The fine-tuning methods: checks before any weights load, quantization, preparation, and each method's PEFT config.

lora (default), qlora (LoRA on a 4-bit NF4 or 8-bit base), ptuning (P-Tuning v2 prefixes), full, freeze (only the
last layers train).
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


def prepare_model(model, model_args, training_args) -> None:
    """Method-specific preparation before PEFT wraps the model (or instead of it)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    # Under ZeRO-3 the weights are sharded placeholders that must keep their dtype: no k-bit preparation (as TRL does).
    if model_args.finetuning_type == "qlora" and not is_deepspeed_zero3_enabled():
        from peft import prepare_model_for_kbit_training

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


def build_peft_config(model_args):
    """The PEFT config of the chosen method, or None when the model's own weights train (full, freeze)."""
    method = model_args.finetuning_type
    if method in ("lora", "qlora"):
        from peft import LoraConfig

        return LoraConfig(
            r=model_args.lora_rank,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=lora_target_modules(model_args.lora_target),
            use_dora=model_args.use_dora,
            use_rslora=model_args.use_rslora,
            task_type="CAUSAL_LM",
        )
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


def check_moe_lora(model_args, family: str) -> None:
    """Stop before the weights load when LoRA on a mixture-of-experts model asks for dropout PEFT cannot give: on them
    PEFT (0.21, for transformers v5 models) turns `all` into LoRA on the attention, the routed experts' 3-D weights
    and the router, and its LoRA on 3-D weights has no dropout."""
    from glm_sft.template import MOE_FAMILIES

    if family in MOE_FAMILIES and model_args.finetuning_type in ("lora", "qlora") and model_args.lora_dropout:
        raise UserError(
            f"lora_dropout is {model_args.lora_dropout}, but on a mixture-of-experts model ({family} format) PEFT's "
            "LoRA on the experts' weights has no dropout; set lora_dropout: 0"
        )


def lora_scope(model) -> str | None:
    """Which modules the run's LoRA adapts (their short names, once each), for the start-up summary."""
    names = set()
    for name, module in model.named_modules():
        adapters = getattr(module, "lora_A", None)
        if adapters is not None and len(adapters):
            short = ".".join(part for part in name.split(".")[-2:] if part != "base_layer")
            parameter = getattr(module, "parameter_name", None)
            names.add(f"{short}.{parameter}" if parameter else name.rsplit(".", 1)[-1])
    return f"LoRA on {', '.join(sorted(names))}" if names else None


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; PEFT's count knows that a 4-bit tensor packs two weights per byte."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    # Under ZeRO-3 each process holds an empty placeholder per weight; ds_numel is the full size.
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return trainable, total
