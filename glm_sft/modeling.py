"""Load tokenizer and model (local directory, hub id or built-in), and build the PEFT config of each method."""

import json
import os
from pathlib import Path

from glm_sft import UserError
from glm_sft.builtin import builtin_path, is_builtin
from glm_sft.template import attach_template, detect_family, stop_token_ids

# ChatGLM's own module names, mapped to the native GLM classes' names.
GLM_MODULE_ALIASES = {
    "query_key_value": ["q_proj", "k_proj", "v_proj"],
    "dense": ["o_proj"],
    "dense_h_to_4h": ["gate_up_proj"],
    "dense_4h_to_h": ["down_proj"],
}


def download_hint(name: str) -> str:
    local = f"models/{name.split('/')[-1]}"
    return (
        f"download it with `hf download {name} --local-dir {local}` (or `modelscope download --model {name} "
        f"--local_dir {local}`) and set model_name_or_path: {local}"
    )


def resolve_model_path(name: str, needs: str = "config.json") -> str:
    """A loadable location for `name`: the built-in model's cache directory, a local directory, or the hub id.

    `needs` is the file a local directory must hold (config.json for a model, tokenizer_config.json for a tokenizer).
    """
    if is_builtin(name):
        return str(builtin_path(name))
    path = Path(name).expanduser()
    if not path.exists():
        looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1 or Path(name.split("/")[0]).is_dir()
        if looks_local:
            raise UserError(f"{name}: no such model directory")
        return name  # a hub id: from_pretrained finds it in the local cache or downloads it
    if not (path / needs).is_file():
        kind = "model" if needs == "config.json" else "tokenizer"
        raise UserError(f"{name}: not a {kind} directory (no {needs} in it)")
    config_file = path / "config.json"
    if config_file.is_file() and json.loads(config_file.read_text(encoding="utf-8")).get("model_type") == "chatglm":
        converted = f"{path}-hf"
        raise UserError(
            f"{name}: a ChatGLM3 checkpoint in THUDM's remote-code layout, whose code no longer runs on current "
            f"transformers; convert it to the native GLM classes once with `python convert_chatglm3.py {path} --out "
            f"{converted}`, then use --model_name_or_path {converted}"
        )
    return str(path)


def _from_pretrained(loader, name: str, location: str, **kwargs):
    """Call loader.from_pretrained, turning 'not found / not reachable' into one message with the download command."""
    try:
        return loader.from_pretrained(location, **kwargs)
    except OSError:
        if location != name or Path(location).exists():
            raise
        offline = " (offline mode: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise UserError(
            f"model {name} is not a local directory and could not be fetched from the hub{offline}; "
            f"{download_hint(name)}"
        ) from None


def load_tokenizer(model_name_or_path: str, template: str = "auto", trust_remote_code: bool = False):
    """The tokenizer with its family's chat template attached; returns (tokenizer, family)."""
    from transformers import AutoTokenizer

    location = resolve_model_path(model_name_or_path, needs="tokenizer_config.json")
    tokenizer = _from_pretrained(AutoTokenizer, model_name_or_path, location, trust_remote_code=trust_remote_code)
    family = detect_family(tokenizer, template)
    attach_template(tokenizer, family)
    return tokenizer, family


def torch_dtype(name: str, finetuning_type: str, bf16: bool | None):
    import torch

    if name == "auto":
        # A frozen base can live in bf16; trained weights stay fp32 masters under bf16 mixed precision.
        return torch.bfloat16 if bf16 and finetuning_type in ("lora", "qlora", "ptuning") else torch.float32
    dtypes = {
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "float32": torch.float32,
        "fp32": torch.float32,
    }
    if name not in dtypes:
        raise UserError(f"dtype {name!r} is unknown; use auto, bfloat16, float16 or float32")
    return dtypes[name]


def load_model(model_name_or_path: str, *, dtype=None, trust_remote_code: bool = False, quantization=None):
    """The causal LM, with its name kept as the user wrote it (so adapters record `builtin:...` or the hub id)."""
    from transformers import AutoModelForCausalLM

    location = resolve_model_path(model_name_or_path)
    extra = {"quantization_config": quantization} if quantization is not None else {}
    model = _from_pretrained(
        AutoModelForCausalLM, model_name_or_path, location, dtype=dtype, trust_remote_code=trust_remote_code, **extra
    )
    model.config._name_or_path = model.name_or_path = model_name_or_path
    return model


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
    if method == "ptuning" and (training_args.packing or training_args.padding_free):
        raise UserError(
            "finetuning_type ptuning cannot be combined with packing or padding_free: the prefixes are attention "
            "keys shared by the whole sequence, so packed rows would see each other; set --packing false"
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


def quiet_transformers() -> None:
    """Keep load-time chatter (info logs, progress bars, deprecation warnings) out of interactive scripts."""
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def read_run_recipe(folder) -> dict:
    """The recipe.yaml train.py saved with a result: in the folder, or in the run's output_dir for a checkpoint-N."""
    import yaml

    folder = Path(folder)
    for candidate in (folder, folder.parent):
        if (candidate / "recipe.yaml").is_file():
            return yaml.safe_load((candidate / "recipe.yaml").read_text(encoding="utf-8")) or {}
    return {}


def load_adapter_model(adapter_dir, base: str, recorded_base: str | None, *, dtype=None, trust_remote_code=False):
    """`base` with the adapter in `adapter_dir` applied, after checking it is the architecture the adapter knows."""
    from peft import PeftModel

    check_adapter_base(str(adapter_dir), recorded_base, base)
    model = load_model(base, dtype=dtype, trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(model, str(adapter_dir))


ARCHITECTURE_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)


def check_adapter_base(adapter_dir: str, recorded_base: str | None, given_base: str) -> None:
    """Stop before loading weights when the base given for an adapter is not the architecture it was trained on."""
    if not recorded_base or recorded_base == given_base:
        return
    from transformers import AutoConfig

    try:
        recorded = AutoConfig.from_pretrained(resolve_model_path(recorded_base))
    except (OSError, ValueError, UserError):
        return  # the recorded base is not available here, so there is nothing to compare with
    given = AutoConfig.from_pretrained(resolve_model_path(given_base))
    for key in ARCHITECTURE_KEYS:
        if getattr(recorded, key, None) != getattr(given, key, None):
            raise UserError(
                f"{adapter_dir} was trained on {recorded_base}, but the base given is {given_base}, a different model "
                f"({key} {getattr(recorded, key, None)} vs {getattr(given, key, None)}); leave out --model to use the "
                "adapter's own base"
            )


def generation_config_for(tokenizer, family: str):
    """Greedy-by-default generation settings whose stop ids are the family's end-of-turn tokens."""
    from transformers import GenerationConfig

    return GenerationConfig(
        eos_token_id=stop_token_ids(tokenizer, family), pad_token_id=tokenizer.pad_token_id, max_new_tokens=512
    )


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; PEFT's count knows that a 4-bit tensor packs two weights per byte."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    # Under ZeRO-3 each process holds an empty placeholder per weight; ds_numel is the full size.
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return trainable, total
