"""Load what a run or a chat needs: tokenizer (with its family's template), model, adapter on its base, run recipe.

Names are a local directory, a hub id (found in the local cache or downloaded) or a built-in model (`builtin:...`).
"""

import contextlib
import json
import os
import pickle
import re
import sys
from pathlib import Path

from glm_sft import UserError
from glm_sft.builtin import builtin_path, is_builtin
from glm_sft.template import attach_template, detect_family, shipped_template_warning

# Where the recipes put downloaded and converted weights (their header comments say how they get there).
MODELS_FOLDER = "models"
# ModelScope publishes THUDM's and zai-org's GLM checkpoints under ZhipuAI.
MODELSCOPE_OWNERS = {"THUDM": "ZhipuAI", "zai-org": "ZhipuAI"}
HUB_PROBE_SECONDS = 3.0


def download_hint(name: str, local: str | None = None) -> str:
    """How to get hub model `name` into the local directory `local` (default: models/ + its name)."""
    local = local or f"{MODELS_FOLDER}/{name.split('/')[-1]}"
    owner, _, rest = name.partition("/")
    modelscope = f"{MODELSCOPE_OWNERS.get(owner, owner)}/{rest}"
    return (
        f"download it with `hf download {name} --local-dir {local}` (or `modelscope download --model {modelscope} "
        f"--local_dir {local}`)"
    )


def missing_directory_hint(name: str) -> str:
    """What to do about a local model directory that is not there: for the recipes' models/ folders, how to get it."""
    path = Path(name)
    if path.parent.name != MODELS_FOLDER:
        return f"{name}: no such model directory"
    if path.name.startswith("chatglm3") and path.name.endswith("-hf"):
        original = path.name.removesuffix("-hf")
        source = str(path.with_name(original))
        return (
            f"{name}: no such model directory; it is THUDM/{original} converted to transformers' native GLM classes: "
            f"{download_hint(f'THUDM/{original}', source)}, then convert it once with `python convert_chatglm3.py "
            f"{source} --out {name}`"
        )
    return f"{name}: no such model directory; if it is THUDM/{path.name}, {download_hint(f'THUDM/{path.name}', name)}"


def resolve_model_path(name: str, needs: str = "config.json") -> str:
    """A loadable location for `name`: the built-in model's cache directory, a local directory, or the hub id.

    `needs` is the file a local directory must hold (config.json for a model, tokenizer_config.json for a tokenizer).
    """
    if is_builtin(name):
        return str(builtin_path(name))
    path = Path(name).expanduser()
    if not path.exists():
        first = name.split("/")[0]
        looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1 or first == MODELS_FOLDER
        if looks_local or Path(first).is_dir():
            raise UserError(missing_directory_hint(name))
        check_hub_reachable(name, needs)
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


def check_hub_reachable(name: str, needs: str) -> None:
    """A hub model that is not in the local cache needs the hub: without a network say so at once, rather than after
    the hub client's retries (about 46 s)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, needs), str) or constants.HF_HUB_OFFLINE:
        return  # cached, or offline mode: from_pretrained answers at once either way
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=HUB_PROBE_SECONDS).close()
    except OSError:
        raise UserError(
            f"model {name} is not a local directory, not in the hub cache, and {host} cannot be reached; "
            f"{download_hint(name)} and set model_name_or_path to that directory"
        ) from None


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
            f"{download_hint(name)} and set model_name_or_path to that directory"
        ) from None


def load_tokenizer(model_name_or_path: str, template: str = "auto", trust_remote_code: bool = False):
    """The tokenizer with its family's chat template attached; returns (tokenizer, family).

    The family comes from the template its tokenizer ships and the checkpoint's model type (template.detect_family);
    a `template` the user names wins, with a warning when the shipped template renders otherwise."""
    from transformers import AutoTokenizer

    location = resolve_model_path(model_name_or_path, needs="tokenizer_config.json")
    tokenizer = _from_pretrained(AutoTokenizer, model_name_or_path, location, trust_remote_code=trust_remote_code)
    family = detect_family(tokenizer, template, model_type=checkpoint_model_type(location))
    if warning := shipped_template_warning(tokenizer, family, explicit=template != "auto"):
        print(warning, file=sys.stderr)
    attach_template(tokenizer, family)
    return tokenizer, family


def checkpoint_model_type(location: str) -> str | None:
    """The model type in the checkpoint's config.json (an adapter's: its base's), or None where it is not at hand."""
    path = Path(location)
    if not path.is_dir():  # a hub id: its config.json in the local cache, if there
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(location, "config.json")
        except Exception:
            return None
        path = Path(cached).parent if isinstance(cached, str) else None
        if path is None:
            return None
    for name in ("config.json", "adapter_config.json"):
        if (path / name).is_file():
            try:
                config = json.loads((path / name).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            if name == "config.json":
                return config.get("model_type")
            base = config.get("base_model_name_or_path")
            if not base:
                return None
            try:
                return checkpoint_model_type(builtin_path(base) if is_builtin(base) else base)
            except UserError:
                return None
    return None


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
    settings = dict(dtype=dtype, trust_remote_code=trust_remote_code, **extra)
    try:
        with _experts_to_four_bit(quantization):
            model = _from_pretrained(AutoModelForCausalLM, model_name_or_path, location, **settings)
    except pickle.UnpicklingError as error:  # a pytorch_model.bin torch refused to unpickle (weights_only)
        raise UserError(unsafe_pickle_message(location, "pytorch_model.bin", error)) from None
    model.config._name_or_path = model.name_or_path = model_name_or_path
    return model


def _experts_to_four_bit(quantization):
    """With a 4-bit QLoRA config, the routed experts of an MoE model go to NF4 as they load
    (glm_sft.quantized_experts), so the model's full-precision experts are never held at once. Not under ZeRO-3,
    where the weights load as sharded placeholders in the compute dtype."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if getattr(quantization, "load_in_4bit", False) and not is_deepspeed_zero3_enabled():
        from glm_sft.quantized_experts import experts_quantized_at_load

        return experts_quantized_at_load()
    return contextlib.nullcontext()


def quiet_transformers() -> None:
    """Keep load-time chatter (info logs, progress bars, deprecation warnings) out of interactive scripts."""
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def read_run_recipe(folder) -> dict:
    """The recipe.yaml train.py saved with a result: in the folder, or in the run's output_dir for a checkpoint-N.

    A final save into the folder that a killed run left half-done is finished first (outputs.finish_cut_off_save).
    The file is read as plain YAML: a tag that would build a Python object is refused, in one line, not loaded."""
    from glm_sft.outputs import finish_cut_off_save

    folder = Path(folder)
    finish_cut_off_save(folder, reading=True)
    for candidate in (folder, folder.parent):
        if (candidate / "recipe.yaml").is_file():
            if candidate != folder:
                finish_cut_off_save(candidate, reading=True)
            return read_recipe_file(candidate / "recipe.yaml")
    return {}


def read_recipe_file(path: Path) -> dict:
    """A saved recipe.yaml as a dict; a UserError naming the file when it is not plain YAML or not a mapping."""
    import yaml

    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.constructor.ConstructorError as error:
        found = re.search(r"tag '([^']+)'", error.problem or "")
        tag = f" ({found[1].replace('tag:yaml.org,2002:', '!!')})" if found else ""
        where = f" at line {error.problem_mark.line + 1}" if error.problem_mark else ""
        raise UserError(
            f"{path}: holds a YAML tag that would build a Python object{tag}{where}; not loaded, for safety (a recipe "
            "train.py writes is plain YAML: remove the tag or the file)"
        ) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{where} ({getattr(error, 'problem', None) or error})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot be read ({getattr(error, 'strerror', None) or error})") from None
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise UserError(f"{path}: not a recipe (a YAML mapping of keys), but a {type(recipe).__name__}")
    return recipe


def load_adapter_model(adapter_dir, base: str, recorded_base: str | None, *, dtype=None, trust_remote_code=False):
    """`base` with the adapter in `adapter_dir` applied, after checking it is the architecture the adapter knows.

    Adapter weights in a pickle file (adapter_model.bin) load as plain tensors only (weights_only): a file that holds
    anything else is refused in one line, never unpickled."""

    from peft import PeftModel

    from glm_sft.outputs import finish_cut_off_save

    finish_cut_off_save(adapter_dir, reading=True)
    check_adapter_base(str(adapter_dir), recorded_base, base)
    model = load_model(base, dtype=dtype, trust_remote_code=trust_remote_code)
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir))
    except pickle.UnpicklingError as error:
        raise UserError(unsafe_pickle_message(adapter_dir, "adapter_model.bin", error)) from None


def unsafe_pickle_message(folder, name: str, error: Exception) -> str:
    """The one line for a pickled weights file that torch refused to load as plain tensors (weights_only)."""
    path = Path(folder) / name
    found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(error))
    what = f" ({found[1]})" if found else ""
    return (
        f"{path if path.is_file() else folder}: holds pickled Python objects besides tensors{what}; not loaded, for "
        "safety (unpickling can run any code); use weights saved as safetensors"
    )


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
