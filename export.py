"""Export a fine-tuned GLM model as one plain transformers directory (no glm-sft code, no trust_remote_code needed).

    python export.py output/demo --out_dir exported/demo                    # LoRA/DoRA/QLoRA: merged into the base
    python export.py output/full-run/checkpoint-500 --out_dir exported/full --dtype bf16   # full/freeze, checkpoints
    python export.py output/demo --out_dir exported/demo --force            # replace an existing export

The result holds safetensors weights (sharded with an index above --max_shard_size), config.json with the native
class, the tokenizer with the family's chat template, generation_config.json with the family's stop ids and a
README.md model card. It is written into a hidden folder beside --out_dir and renamed into place when complete.
"""

import argparse
import json
import os
import pickle
import shutil
import sys
import tempfile
from pathlib import Path

from glm_sft import UserError, exit_on_user_error

DTYPE_NAMES = ("bf16", "fp16", "fp32")
# Recipe keys worth a line in the model card, when the recipe set them.
CARD_KEYS = (
    "finetuning_type",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_target",
    "use_dora",
    "use_rslora",
    "quantization_bit",
    "freeze_trainable_layers",
    "freeze_extra_modules",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "warmup_ratio",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "last_turn_only",
    "packing",
    "seed",
)
SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="adapter or model directory written by train.py, or one of its checkpoint-N")
    parser.add_argument(
        "--out_dir", "--out-dir", required=True, help="where the exported model goes (must be empty or absent)"
    )
    parser.add_argument("--dtype", default="bf16", help="weights dtype: bf16 (default), fp16 or fp32")
    parser.add_argument(
        "--max_shard_size", "--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)"
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out_dir once the export is done")
    return parser.parse_args(argv)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise UserError(f"{path} is not valid JSON (cut off while saving?); export another checkpoint") from None


def check_arguments(args) -> tuple[Path, Path]:
    """Every mistake a user can make on the command line, found before any weights load."""
    from transformers.utils.hub import convert_file_size_to_int

    source = Path(args.source).expanduser()
    out_dir = Path(args.out_dir).expanduser()
    if args.dtype not in DTYPE_NAMES:
        raise UserError(f"--dtype {args.dtype!r} is unknown; use one of {', '.join(DTYPE_NAMES)}")
    try:
        convert_file_size_to_int(args.max_shard_size)
    except ValueError:
        raise UserError(f"--max_shard_size {args.max_shard_size!r} is not a size such as 5GB or 500MB") from None
    if not source.is_dir():
        raise UserError(f"{source}: no such directory")
    from glm_sft.checkpoints import check_writable_dir, finish_cut_off_save, weights_problem

    finish_cut_off_save(source, reading=True)  # a final save a killed run left half-done: finished first
    if not (source / "adapter_config.json").is_file() and not (source / "config.json").is_file():
        raise UserError(
            f"{source}: not an adapter or model directory (no adapter_config.json or config.json); give the "
            "output_dir of a train.py run or one of its checkpoint-N folders"
        )
    if out_dir.exists():
        if not out_dir.is_dir():
            raise UserError(f"--out_dir {out_dir} exists and is not a directory")
        if any(out_dir.iterdir()) and not args.force:
            raise UserError(f"--out_dir {out_dir} is not empty; pass --force to replace it")
        resolved_out, resolved_source = out_dir.resolve(), source.resolve()
        if resolved_source == resolved_out or resolved_out in resolved_source.parents:
            raise UserError(f"--out_dir {out_dir} holds the model being exported; choose another directory")
        if os.path.ismount(out_dir):
            raise UserError(
                f"--out_dir {out_dir} is a mount point: the export is written beside it and renamed into place, "
                f"which a mount point cannot be; give a folder inside it, such as {out_dir / source.resolve().name}"
            )
    check_writable_dir(out_dir.parent, "out_dir")  # the export is written beside out_dir, then renamed
    for name in ("adapter_config.json", "config.json"):
        read_json(source / name)  # a cut-off config is one line here, not a traceback inside the loader
    if problem := weights_problem(source):
        raise UserError(
            f"{source}: {problem}: the folder is corrupt (cut off while saving?); export another checkpoint"
        )
    return source, out_dir


STAGING_KINDS = ("exporting", "old")  # .NAME.exporting-PID-*: an export being written; .NAME.old-PID-*: set aside


def staging_prefix(out_dir: Path, kind: str) -> str:
    return f".{out_dir.name}.{kind}-{os.getpid()}-"


def clean_stale_staging(out_dir: Path) -> None:
    """Remove what an export into out_dir that was killed left beside it (its process is gone); an old export that
    was set aside for --force and not yet replaced is put back first."""
    from glm_sft.checkpoints import process_alive

    if not out_dir.parent.is_dir():
        return
    for kind in STAGING_KINDS:
        for folder in sorted(out_dir.parent.glob(f".{out_dir.name}.{kind}-*")):
            pid = folder.name.removeprefix(f".{out_dir.name}.{kind}-").split("-")[0]
            if pid.isdigit() and int(pid) != os.getpid() and process_alive(int(pid)):
                continue  # an export running now
            set_aside = folder / out_dir.name
            if kind == "old" and set_aside.is_dir() and not out_dir.exists():
                os.replace(set_aside, out_dir)
                say(f"note: put back {out_dir}, which a stopped export had set aside in {folder}")
            shutil.rmtree(folder, ignore_errors=True)
            say(f"note: removed {folder}, left by an export that was stopped")


def load_merged_model(source: Path, recipe: dict, dtype):
    """(model with plain weights, description) for an adapter merged into its base, or a full/freeze result."""
    from glm_sft.loading import load_adapter_model, load_model

    adapter_config = read_json(source / "adapter_config.json")
    if not adapter_config:
        say(f"loading {source}")
        return load_model(str(source), dtype=dtype), {}
    peft_type = adapter_config.get("peft_type")
    if peft_type == "PREFIX_TUNING":
        raise UserError(
            f"{source} is a P-Tuning v2 adapter: its prefixes are extra attention keys, not weight changes, so it "
            f"cannot be merged into the base model; use it as it is: python chat_cli.py --adapter {source}"
        )
    if peft_type != "LORA":
        raise UserError(f"{source}: adapters of type {peft_type} cannot be exported; only LoRA, DoRA and QLoRA")
    base = adapter_config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{source}: the adapter does not name its base model (base_model_name_or_path)")

    qlora = recipe.get("finetuning_type") == "qlora"
    # QLoRA trained on 4-bit weights; the adapter is merged into the full-precision base, not into 4-bit weights.
    say(
        f"loading base model {base}"
        + (" in full precision (the adapter is QLoRA)" if qlora else "")
        + f" and adapter {source}"
    )
    model = load_adapter_model(source, base, base, dtype=dtype)
    say("merging the adapter into the base weights")
    model = model.merge_and_unload()
    return model, {"base": base, "qlora": qlora, "dora": bool(adapter_config.get("use_dora"))}


def load_export_tokenizer(source: Path, recipe: dict, base: str | None):
    """The run's tokenizer with the family's template: from the directory, the run's output_dir, or the base."""
    from glm_sft.loading import load_tokenizer

    candidates = [str(source), str(source.parent)] + ([base] if base else [])
    for candidate in candidates:
        if candidate == base or (Path(candidate) / "tokenizer_config.json").is_file():
            return load_tokenizer(candidate, recipe.get("template", "auto"))
    raise UserError(f"{source}: no tokenizer found (no tokenizer_config.json) and no base model to take it from")


def generation_config(source: Path, tokenizer, family: str):
    """The family's stop ids, plus the sampling settings in the run's generation_config.json (if any)."""
    from glm_sft.inference import generation_config_for

    config = generation_config_for(tokenizer, family)
    recorded = read_json(source / "generation_config.json")
    sampling = {key: recorded[key] for key in SAMPLING_KEYS if key in recorded}
    if sampling.get("do_sample") or any(key in sampling for key in ("temperature", "top_p", "top_k")):
        sampling.setdefault("do_sample", True)
    config.update(**sampling)
    return config


def final_losses(source: Path) -> tuple[str, str]:
    """(train loss, eval loss) from the last entries of trainer_state.json's log, or 'not recorded'."""
    state = read_json(source / "trainer_state.json")
    history = state.get("log_history", [])
    train = [entry["loss"] for entry in history if "loss" in entry]
    evaluation = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    step = state.get("global_step")
    where = f" (last logged, step {step})" if step is not None else ""
    return (
        f"{train[-1]:.4f}{where}" if train else "not recorded",
        f"{evaluation[-1]:.4f}{where}" if evaluation else "not recorded",
    )


def model_card(
    source: Path, recipe: dict, merged: dict, family: str, dtype_name: str, tokenizer, architecture: str
) -> str:
    base = merged.get("base") or recipe.get("model_name_or_path") or "not recorded"
    method = recipe.get("finetuning_type") or ("lora" if merged else "full or freeze (not recorded)")
    if merged.get("dora") and method == "lora":
        method = "lora (DoRA)"
    from glm_sft.inference import read_run_facts, switches_lines, switches_note

    train_loss, eval_loss = final_losses(source)
    facts = read_run_facts(source)
    train_rows, eval_rows = (
        f"{facts[key]} rows" if isinstance(facts.get(key), int) else "row count not recorded"
        for key in ("train_rows", "eval_rows")
    )
    data = [f"- training data: {recipe.get('dataset_name', 'not recorded')} ({train_rows})"]
    if recipe.get("eval_dataset_name"):
        data.append(f"- evaluation data: {recipe['eval_dataset_name']} ({eval_rows})")
    elif recipe.get("val_size"):
        held_out = eval_rows if isinstance(facts.get("eval_rows"), int) else str(recipe["val_size"])
        data.append(f"- evaluation data: {held_out} held out of the training data (val_size {recipe['val_size']})")
    settings = [f"- {key}: {recipe[key]}" for key in CARD_KEYS if key in recipe and recipe[key] is not None]
    notes = []
    if merged:
        notes.append(f"The {method} adapter from `{source}` is merged into the base weights (PEFT merge_and_unload).")
    if merged.get("qlora"):
        notes.append(
            "Note: this is a QLoRA adapter. It was trained on the 4-bit quantized base, but it is merged here into "
            f"the base loaded in {dtype_name}, not into 4-bit weights; outputs can differ slightly from the quantized "
            "model used in training."
        )
    prompt = prompt_example(tokenizer)
    switches = "".join(f", {key}={value!r}" for key, value in (facts.get("chat_template_kwargs") or {}).items())
    lines = [
        "# Fine-tuned GLM model",
        "",
        f"Exported by glm-sft's export.py from `{source}`. Plain transformers weights ({dtype_name}, native "
        f"`{architecture}`); no trust_remote_code needed.",
        "",
        *notes,
        "" if notes else None,
        f"- base model: {base}",
        f"- method: {method}",
        f"- chat format: {family} (`{prompt}`)",
        *switches_lines(facts),
        *data,
        f"- final train loss: {train_loss}",
        f"- final eval loss: {eval_loss}",
        "",
        "## Training settings",
        "",
        *(settings or ["not recorded"]),
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/dir")',
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/dir", dtype="auto", device_map="auto")',
        'messages = [{"role": "user", "content": "你好"}]',
        "inputs = tokenizer.apply_chat_template(",
        f'    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True{switches}',
        ").to(model.device)",
        "output = model.generate(**inputs, max_new_tokens=256)  # stops at the family's end-of-turn tokens",
        "print(tokenizer.decode(output[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True))",
        "```",
        "",
        "Or `python chat_cli.py --model path/to/this/dir` from glm-sft; vLLM serves the directory as it is.",
        "",
        *switches_note(facts),
    ]
    return "\n".join(line for line in lines if line is not None)


def prompt_example(tokenizer) -> str:
    """The prompt of a one-message chat as this model's template writes it, newlines escaped, for the model card."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "你好"}], add_generation_prompt=True, tokenize=False
    )
    return text.replace("\n", "\\n")


def write_export(
    folder: Path, model, tokenizer, family: str, config, card: str, max_shard_size: str, facts: dict
) -> None:
    from glm_sft.checkpoints import follow_umask
    from glm_sft.inference import RUN_FACTS
    from glm_sft.template import save_tokenizer

    say(f"saving the model to {folder}")
    model.generation_config = config
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    save_tokenizer(tokenizer, family, folder)  # the checkpoint's own template for the newer generations
    (folder / "README.md").write_text(card, encoding="utf-8")
    if facts:  # the run's record, with the template switches the model answers with (chat_cli, serve, webchat)
        (folder / RUN_FACTS).write_text(json.dumps(facts, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    follow_umask(folder)  # safetensors writes its files owner-only


def move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename the finished export to out_dir; an old out_dir (--force) is set aside first and removed after."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=staging_prefix(out_dir, "old"), dir=out_dir.parent))
        try:
            os.replace(out_dir, old / out_dir.name)
        except OSError:
            old.rmdir()  # nothing was set aside: leave nothing beside out_dir
            raise
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    source, out_dir = check_arguments(args)
    clean_stale_staging(out_dir)

    from glm_sft.inference import read_run_facts
    from glm_sft.loading import quiet_transformers, read_run_recipe, torch_dtype

    quiet_transformers()
    dtype = torch_dtype(args.dtype, "full", False)
    recipe = read_run_recipe(source)

    try:
        model, merged = load_merged_model(source, recipe, dtype)
    except pickle.UnpicklingError as error:  # a full model's pytorch_model*.bin holding more than tensors
        from glm_sft.loading import unsafe_pickle_message

        names = sorted(path.name for path in source.glob("*.bin") if path.name != "training_args.bin")
        raise UserError(unsafe_pickle_message(source, names[0] if len(names) == 1 else "", error)) from None
    except Exception as error:  # a weight file cut off in a way the check above missed (safetensors' own error)
        if not isinstance(error, OSError) and "safetensor" not in type(error).__name__.lower():
            raise
        raise UserError(f"{source}: the weights cannot be read ({error}); export another checkpoint") from None
    model = model.to(dtype)
    tokenizer, family = load_export_tokenizer(source, recipe, merged.get("base"))
    config = generation_config(source, tokenizer, family)
    card = model_card(source, recipe, merged, family, args.dtype, tokenizer, type(model).__name__)

    # Written beside the target under a dot name, then renamed: an interrupted export leaves nothing that looks done.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=staging_prefix(out_dir, "exporting"), dir=out_dir.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary directory
        facts = read_run_facts(source)
        write_export(staging, model, tokenizer, family, config, card, args.max_shard_size, facts)
        move_into_place(staging, out_dir)
    except Exception as exception:  # a full disk, a read-only or vanished target: nothing half-written stays
        from glm_sft.checkpoints import folder_size, free_space_note, human_size, storage_error

        if (error := storage_error(exception, out_dir.parent)) is None:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise

        written = folder_size(staging) if staging is not None else 0
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        needed = max(written, sum(p.numel() * p.element_size() for p in model.parameters()))
        free = free_space_note(out_dir.parent)
        where = f" ({error.filename})" if error.filename else ""
        raise UserError(
            f"cannot write the export into {out_dir.parent}: {error.strerror or error}{where}; it needs about "
            f"{human_size(needed)}{free}; nothing was left there"
        ) from None
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    say(f"exported to {out_dir}; chat with: python chat_cli.py --model {out_dir}")


if __name__ == "__main__":
    main()
