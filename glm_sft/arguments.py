"""The recipe: our keys beside TRL's SFTConfig, the one parser train.py and preview share, the resolved recipe.

A recipe is a YAML file of keys (`--config recipe.yaml`) with command-line overrides (`--learning_rate 1e-4`). Model
and method keys are ModelArguments, data keys DataArguments, training keys TrainingConfig (TRL's SFTConfig with our
keys and defaults added). The parser records which keys the recipe file and the command line set, so that a default
can be ours without guessing, and the run can save exactly the recipe it was given.
"""

import argparse
import difflib
import enum
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field

import yaml
from trl import SFTConfig, TrlParser

from glm_sft import UserError

FINETUNING_TYPES = ("lora", "qlora", "ptuning", "full", "freeze")
# Keys that control one invocation rather than describe the run; left out of the saved recipe.
RUN_CONTROL_KEYS = ("resume_from_checkpoint", "overwrite_output_dir", "hub_token")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="builtin:tiny-glm4",
        metadata={
            "help": "Local directory, hub id (zai-org/GLM-4.7-Flash) or a built-in tiny model: builtin:tiny-glm4, "
            "tiny-chatglm3, tiny-glm4-0414, tiny-glmz1, tiny-glm45, tiny-glm47-flash, tiny-glm5, tiny-glm52."
        },
    )
    template: str = field(
        default="auto",
        metadata={
            "help": "Chat format: auto (the family whose template the checkpoint ships, else by its model type) or "
            "one of glm4, chatglm3, glm4_0414, glmz1, glm45, glm46, glm47, glm5, glm51, glm52."
        },
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
    chat_template_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Switches of the template the rows are rendered with, as a mapping (YAML) or JSON text: "
            "enable_thinking (GLM-4.5 and later), clear_thinking (GLM-4.7 and later), reasoning_effort (GLM-5.2), "
            'e.g. {"reasoning_effort": "high"}. The trained model answers with the same switches (chat_cli, serve, '
            "webchat, evaluate); a flag or request field overrides them."
        },
    )

    def __post_init__(self):
        if isinstance(self.chat_template_kwargs, str):  # from the command line: JSON text
            try:
                self.chat_template_kwargs = json.loads(self.chat_template_kwargs)
            except json.JSONDecodeError as error:
                raise UserError(
                    f"chat_template_kwargs {self.chat_template_kwargs!r} is not JSON ({error.msg}); pass an object "
                    """such as '{"enable_thinking": false}'"""
                ) from None


@dataclass
class TrainingConfig(SFTConfig):
    """TRL's SFTConfig, with the keys and defaults of a glm-sft run."""

    padding_free: bool | None = field(
        default=None,
        metadata={
            "help": "Lay the rows of a batch end to end without padding, each attending only to itself. Default: on "
            "where the model and method allow it (see glm_sft/speed.py), else padded, length-grouped batches."
        },
    )
    truncation_mode: str = field(
        default="keep_start",
        metadata={
            "help": "How a row longer than max_length is cut, in our tokenization (the only place that truncates): "
            "keep_start (cut its end) or keep_end (drop its earliest rounds, keeping the system prompt and tools, so "
            "that the last turns fit).",
            "choices": ["keep_start", "keep_end"],
        },
    )
    kernels: bool = field(
        default=False,
        metadata={
            "help": "GLM kernels on a GPU (glm_sft/kernels.py): Liger RMSNorm and SwiGLU, compiled rotary; needs CUDA "
            "and pip install liger-kernel. The log says which are in place."
        },
    )
    train_sampling_strategy: str | None = field(
        default=None,
        metadata={
            "help": "random, sequential, group_by_length or batch_rebalance. Default: random for padding-free "
            "batches, group_by_length for padded ones (less padding)."
        },
    )
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

    def __post_init__(self):
        with warnings.catch_warnings():  # TRL deprecates its own keep_end; ours is glm_sft/tokenization.py's
            warnings.filterwarnings("ignore", message=".*'keep_end'.* truncation mode", category=FutureWarning)
            super().__post_init__()


class RecipeParser(TrlParser):
    """TrlParser that records the keys given on the command line and reports mistakes in one line."""

    command_line_keys: tuple[str, ...] = ()

    def parse_known_args(self, args=None, namespace=None):
        # Every key starts unset; afterwards the ones still unset get their (recipe or dataclass) default.
        unset = object()
        actions = [action for action in self._actions if action.dest not in (argparse.SUPPRESS, "help")]
        namespace = argparse.Namespace(**{action.dest: unset for action in actions})
        namespace, remaining = super().parse_known_args(args, namespace)
        self.command_line_keys = tuple(key for key, value in vars(namespace).items() if value is not unset)
        for action in actions:
            if getattr(namespace, action.dest) is unset:
                default = action.default
                if isinstance(default, str) and action.type is not None:
                    default = self._get_value(action, default)  # as argparse converts string defaults
                setattr(namespace, action.dest, default)
        return namespace, remaining

    def error(self, message):  # argparse's own: a bad value (`--learning_rate fast`), a flag without its value
        raise UserError(f"{message}; see python train.py --help for the keys")

    def suggestion(self, option: str) -> str:
        known = [key for action in self._actions for key in action.option_strings]
        close = difflib.get_close_matches(option.split("=")[0], known, n=1)
        return f" (did you mean {close[0]}?)" if close else ""

    def known_keys(self) -> set[str]:
        return {action.dest for action in self._actions} | {"env"}


@dataclass
class Recipe:
    """The parsed recipe: the three groups of keys, the keys the user set (recipe file, then command line), argv."""

    model: ModelArguments
    data: DataArguments
    training: TrainingConfig
    given: list[str]
    argv: list[str]
    extra: tuple = ()  # instances of the extra dataclasses parse_recipe was given

    def resolved(self) -> dict:
        """{key: final value} for every key the recipe or the command line set (run-control keys left out)."""
        recipe = {}
        for key in self.given:
            if key in RUN_CONTROL_KEYS:
                continue
            for group in (self.model, self.data, self.training, *self.extra):
                if hasattr(group, key):
                    recipe[key] = _plain(getattr(group, key))
                    break
        return recipe

    def save(self, path) -> None:
        """The resolved recipe as YAML; `python train.py --config PATH` repeats the run."""
        with open(path, "w", encoding="utf-8") as file:
            file.write(f"# Resolved recipe of this run: python {' '.join(['train.py', *self.argv])}\n")
            yaml.safe_dump(self.resolved(), file, allow_unicode=True, sort_keys=False)


def _plain(value):
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def parse_recipe(
    argv: list[str] | None = None,
    extra: tuple = (),
    launch_defaults: dict | None = None,
    description: str | None = None,
    prog: str = "train.py",
) -> Recipe:
    """The Recipe of `--config recipe.yaml` and command-line overrides; unknown keys in either are an error.

    YAML sets defaults, the command line overrides them. `extra`: more dataclasses whose keys the same parser takes
    (preview's). `launch_defaults`: keys a launch needs unless the recipe sets them (glm_sft.distributed).
    `description` and `prog` are what --help shows.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = RecipeParser(
        (ModelArguments, DataArguments, TrainingConfig, *extra),
        prog=prog,
        usage=f"python {prog} --config RECIPE.yaml [--key value ...]",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command_line, config = list(argv), {}
    if "--config" in command_line:
        index = command_line.index("--config")
        if index + 1 >= len(command_line):
            raise UserError("--config needs the path of a recipe YAML file")
        path = command_line.pop(index + 1)
        command_line.pop(index)
        config = _read_recipe_file(path, parser)
    for key, value in (config.pop("env", None) or {}).items():
        os.environ[key] = str(value)
    parser.set_defaults_with_config(**{**(launch_defaults or {}), **config})
    try:
        *groups, unknown = parser.parse_args_into_dataclasses(command_line, return_remaining_strings=True)
    except ValueError as error:  # raised by the dataclasses' own checks (e.g. TrainingArguments)
        message = str(error).splitlines()[0]
        if "bf16" in message:
            message = (
                "bf16: true needs a GPU with bfloat16 support (Ampere or newer); on a CPU pass --bf16 false, on older "
                "GPUs --bf16 false --fp16 true (and watch for NaN losses)"
            )
        raise UserError(message) from None
    except argparse.ArgumentError as error:  # a recipe file value that does not convert (learning_rate: fast)
        raise UserError(f"{error}; see python train.py --help for the keys") from None
    if unknown:
        option = next((item for item in unknown if item.startswith("-")), unknown[0])
        raise UserError(f"unknown option {option}{parser.suggestion(option)}; see python train.py --help for the keys")
    model, data, training, *extra_groups = groups
    given = list(config) + [key for key in parser.command_line_keys if key not in config]
    if not data.dataset_name:
        raise UserError("no training data: set dataset_name in the recipe or pass --dataset_name FILE")
    if model.finetuning_type not in FINETUNING_TYPES:
        raise UserError(
            f"finetuning_type {model.finetuning_type!r} is unknown; use one of {', '.join(FINETUNING_TYPES)}"
        )
    check_training_values(training)
    return Recipe(model, data, training, given, argv, tuple(extra_groups))


def check_training_values(training) -> None:
    """Training keys whose value would train nothing or fail only after the model loads."""
    from glm_sft.tokenization import check_truncation_mode

    check_truncation_mode(training.truncation_mode)
    rate = training.learning_rate
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
        raise UserError(
            f"learning_rate {rate!r} must be a positive number (adapters: 1e-4 to 5e-4; full fine-tuning about ten "
            "times lower)"
        )
    if training.max_steps == 0 or training.max_steps < -1:
        raise UserError(
            f"max_steps {training.max_steps} trains nothing; give a positive number of steps, or -1 (the default) to "
            "train for num_train_epochs"
        )
    if training.max_steps < 0 and not training.num_train_epochs > 0:
        raise UserError(
            f"num_train_epochs {training.num_train_epochs} trains nothing; give a positive number of epochs (a "
            "fraction such as 0.5 trains half an epoch), or set max_steps"
        )


def _read_recipe_file(path: str, parser) -> dict:
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
    known = parser.known_keys()
    unknown = sorted(key for key in recipe if key not in known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"{path}: unknown key(s) {', '.join(unknown)}{hint}; see python train.py --help for the keys")
    return recipe
