"""Recipe keys beside TRL's SFTConfig, and the one parser train.py and preview share."""

import sys
from dataclasses import dataclass, field

import yaml

from glm_sft import UserError

FINETUNING_TYPES = ("lora", "qlora", "ptuning", "full", "freeze")
# The files that make an output_dir hold a finished model.
FINISHED_MARKERS = ("adapter_config.json", "model.safetensors", "model.safetensors.index.json")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="builtin:tiny-glm4",
        metadata={
            "help": "Local directory, hub id (THUDM/glm-4-9b-chat-hf) or builtin:tiny-glm4 / builtin:tiny-chatglm3."
        },
    )
    template: str = field(
        default="auto", metadata={"help": "Chat format: auto (from the tokenizer), glm4 or chatglm3."}
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Weights dtype: auto (bfloat16 for adapters when bf16 is on, else float32), bfloat16, "
            "float16, float32."
        },
    )
    finetuning_type: str = field(
        default="lora",
        metadata={
            "help": "lora (low-rank adapters), qlora (LoRA on a 4/8-bit base), ptuning (P-Tuning v2 prefixes), "
            "full (all weights) or freeze (only the last layers)."
        },
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA input."})
    lora_target: str = field(
        default="all",
        metadata={
            "help": "Comma-separated module names to adapt, or all (every linear layer but the output head). "
            "ChatGLM names (query_key_value, dense, dense_h_to_4h, dense_4h_to_h) are accepted."
        },
    )
    use_dora: bool = field(default=False, metadata={"help": "LoRA/QLoRA: weight-decomposed LoRA (DoRA)."})
    use_rslora: bool = field(default=False, metadata={"help": "LoRA/QLoRA: rank-stabilised scaling alpha / sqrt(r)."})
    quantization_bit: int = field(default=4, metadata={"help": "QLoRA: 4 (NF4, double quantization) or 8."})
    quantization_compute_dtype: str = field(
        default="bfloat16", metadata={"help": "QLoRA: dtype the 4-bit matmuls compute in (bfloat16, float16)."}
    )
    pre_seq_len: int = field(default=128, metadata={"help": "P-Tuning v2: virtual tokens prepended at every layer."})
    prefix_projection: bool = field(
        default=False, metadata={"help": "P-Tuning v2: produce the prefixes through a two-layer MLP."}
    )
    prefix_hidden_size: int | None = field(
        default=None, metadata={"help": "P-Tuning v2: hidden size of that MLP (default: the model's)."}
    )
    freeze_trainable_layers: int = field(
        default=2, metadata={"help": "freeze: how many of the last decoder layers train (the rest stay frozen)."}
    )
    freeze_extra_modules: str = field(
        default="",
        metadata={"help": "freeze: also train these, comma-separated: embed_tokens, lm_head, norm (the final one)."},
    )


@dataclass
class DataArguments:
    dataset_name: str = field(
        default=None,
        metadata={"help": "Training data: a .json/.jsonl/.csv/.parquet file, a folder, a comma list, or a hub id."},
    )
    eval_dataset_name: str | None = field(default=None, metadata={"help": "Evaluation data (same forms)."})
    val_size: float = field(
        default=0.0,
        metadata={
            "help": "Hold out this fraction (0-1) or this many rows (>= 1) of the training data for evaluation."
        },
    )
    dataset_format: str = field(
        default="auto", metadata={"help": "auto, messages, sharegpt, alpaca, firefly or columns."}
    )
    prompt_column: str = field(default="prompt", metadata={"help": "Prompt column for the columns format (CSV)."})
    response_column: str = field(default="response", metadata={"help": "Response column for the columns format."})
    assistant_name: str | None = field(default=None, metadata={"help": "Fills {{name}} in self-cognition data."})
    assistant_author: str | None = field(default=None, metadata={"help": "Fills {{author}} in self-cognition data."})
    last_turn_only: bool = field(
        default=False, metadata={"help": "Train only the last assistant turn of each conversation (default: all)."}
    )
    skip_invalid_rows: bool = field(
        default=False, metadata={"help": "Skip invalid rows (counted and reported) instead of stopping."}
    )
    max_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})


def parse_recipe(argv: list[str] | None = None):
    """(model_args, data_args, training_args, output_args) from `--config recipe.yaml` and command-line overrides.

    YAML sets defaults, the command line overrides them; unknown keys in either are an error.
    """
    from trl import SFTConfig, TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = TrlParser((ModelArguments, DataArguments, SFTConfig, OutputArguments))
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise UserError("--config needs the path of a recipe YAML file")
        _check_recipe(argv[index + 1], parser)
    try:
        parsed = parser.parse_args_and_config(argv)
    except ValueError as error:  # raised by the dataclasses' own checks (e.g. TrainingArguments)
        message = str(error).splitlines()[0]
        if "bf16" in message:
            message = (
                "bf16: true needs a GPU with bfloat16 support (Ampere or newer); on a CPU pass --bf16 false, on older "
                "GPUs --bf16 false --fp16 true (and watch for NaN losses)"
            )
        raise UserError(message) from None
    model_args, data_args, training_args, _ = parsed
    if not data_args.dataset_name:
        raise UserError("no training data: set dataset_name in the recipe or pass --dataset_name FILE")
    if model_args.finetuning_type not in FINETUNING_TYPES:
        raise UserError(
            f"finetuning_type {model_args.finetuning_type!r} is unknown; use one of {', '.join(FINETUNING_TYPES)}"
        )
    return parsed


def _check_recipe(path: str, parser) -> None:
    """Readable errors for a recipe that is missing, is not YAML, or has keys no dataclass knows."""
    try:
        with open(path, encoding="utf-8") as file:
            recipe = yaml.safe_load(file)
    except FileNotFoundError:
        raise UserError(f"{path}: no such recipe file") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise UserError(f"{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(recipe, dict):
        raise UserError(f"{path}: a recipe must be a mapping of keys to values")
    known = {action.dest for action in parser._actions} | {"env"}
    unknown = sorted(key for key in recipe if key not in known)
    if unknown:
        raise UserError(f"{path}: unknown key(s) {', '.join(unknown)}; see python train.py --help for the keys")


@dataclass
class OutputArguments:
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Allow training into an output_dir that already holds a finished model (it is replaced)."},
    )
    swanlab_mode: str = field(
        default="auto",
        metadata={
            "help": "With report_to swanlab: auto (SWANLAB_MODE if set, else cloud when an API key is available, "
            "else local under output_dir/swanlog), cloud, local, offline or disabled."
        },
    )
    swanlab_project: str | None = field(
        default=None, metadata={"help": "SwanLab project (default: SWANLAB_PROJECT, else glm-sft)."}
    )
    sample_prompts: list[str] | None = field(
        default=None,
        metadata={
            "help": "User messages answered (greedy) at each save and at the end, into output_dir/samples.jsonl "
            "and SwanLab (default: the first sample_count rows of the eval split, else of the training data)."
        },
    )
    sample_count: int = field(default=3, metadata={"help": "How many rows make the default sample prompts; 0: none."})
    sample_max_new_tokens: int = field(default=128, metadata={"help": "Longest sample reply, in tokens."})
    predict_max_new_tokens: int = field(
        default=512, metadata={"help": "do_predict: longest reply, in tokens (batch: per_device_eval_batch_size)."}
    )


def check_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuse to train over a finished model unless asked to, so a re-run never silently destroys a result."""
    from pathlib import Path

    path = Path(output_dir)
    finished = [name for name in FINISHED_MARKERS if (path / name).exists()]
    if finished and not overwrite:
        raise UserError(
            f"{output_dir} already holds a finished model ({finished[0]}); pass --overwrite_output_dir true to "
            "replace it, or choose another --output_dir"
        )


# Keys that control one invocation rather than describe the run; left out of the saved recipe.
RUN_CONTROL_KEYS = ("resume_from_checkpoint", "overwrite_output_dir", "hub_token")


def command_line_keys(argv: list[str]) -> list[str]:
    """The keys given on the command line (`--key value` or `--key=value`), --config left out, in order."""
    keys = []
    for item in argv:
        if item.startswith("--") and item != "--config":
            key = item[2:].split("=", 1)[0]
            if key not in keys:
                keys.append(key)
    return keys


def given_keys(argv: list[str]) -> list[str]:
    """The keys the user set: those of the --config recipe, then those given on the command line."""
    keys = []
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        with open(argv[argv.index("--config") + 1], encoding="utf-8") as file:
            keys += [key for key in (yaml.safe_load(file) or {}) if key != "env"]
    return keys + [key for key in command_line_keys(argv) if key not in keys]


def save_recipe(path, argv: list[str], *dataclass_objects) -> None:
    """The recipe as resolved: every key the recipe or the command line set, with its final value.

    The result is itself a recipe: `python train.py --config output/x/recipe.yaml` repeats the run.
    """
    recipe = resolved_recipe(argv, *dataclass_objects)
    with open(path, "w", encoding="utf-8") as file:
        file.write(f"# Resolved recipe of this run: python {' '.join(['train.py', *argv])}\n")
        yaml.safe_dump(recipe, file, allow_unicode=True, sort_keys=False)


def resolved_recipe(argv: list[str], *dataclass_objects) -> dict:
    """{key: final value} for every key the recipe or the command line set (run-control keys left out)."""
    import enum

    def plain(value):
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return value

    recipe = {}
    for key in given_keys(argv):
        if key in RUN_CONTROL_KEYS:
            continue
        for obj in dataclass_objects:
            if hasattr(obj, key):
                recipe[key] = plain(getattr(obj, key))
                break
    return recipe
