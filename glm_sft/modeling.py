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
        raise UserError(
            f"{name}: a ChatGLM checkpoint in THUDM's remote-code layout; it must first be converted to the native "
            "GLM classes (convert_chatglm3.py, planned), since its own code no longer runs on current transformers"
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
        # A frozen base can live in bf16; fully trained weights stay fp32 masters under bf16 mixed precision.
        return torch.bfloat16 if bf16 and finetuning_type != "full" else torch.float32
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


def load_model(model_name_or_path: str, *, dtype=None, trust_remote_code: bool = False):
    """The causal LM, with its name kept as the user wrote it (so adapters record `builtin:...` or the hub id)."""
    from transformers import AutoModelForCausalLM

    location = resolve_model_path(model_name_or_path)
    model = _from_pretrained(
        AutoModelForCausalLM, model_name_or_path, location, dtype=dtype, trust_remote_code=trust_remote_code
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


def build_peft_config(model_args):
    """The PEFT config of the chosen method, or None for full fine-tuning."""
    if model_args.finetuning_type == "full":
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=model_args.lora_rank,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=lora_target_modules(model_args.lora_target),
        task_type="CAUSAL_LM",
    )


def generation_config_for(tokenizer, family: str):
    """Greedy-by-default generation settings whose stop ids are the family's end-of-turn tokens."""
    from transformers import GenerationConfig

    return GenerationConfig(
        eos_token_id=stop_token_ids(tokenizer, family), pad_token_id=tokenizer.pad_token_id, max_new_tokens=512
    )


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
