"""A fine-tuned model as one plain transformers directory: an adapter merged into its base (or a full/freeze result
re-saved) in the dtype asked for, with the tokenizer and the family's chat template, generation_config.json with the
family's stop ids, run.json and a model card. export.py is the command line over export_model.

The export is written into a staging folder beside the target and put in its place as a whole (staging.replace_folder):
an export cut off at any point leaves the old target, or the new one, complete.
"""

import json
import pickle
import shutil
import sys
from pathlib import Path

from glm_sft import UserError
from glm_sft.staging import (
    folder_size,
    follow_umask,
    free_space_note,
    human_size,
    replace_folder,
    staging_beside,
    storage_error,
)

SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def read_json(path: Path) -> dict:
    """A JSON file of the folder being exported; {} when it is not there."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise UserError(f"{path} is not valid JSON (cut off while saving?); export another checkpoint") from None


def export_model(source: Path, out_dir: Path, dtype_name: str, max_shard_size: str) -> None:
    """Load, merge and write `source` (checked by export.py) into out_dir, replacing what it held as a whole. A full
    disk or a target that cannot be written is one UserError saying what the export needs; nothing is left behind."""
    from glm_sft.inference import read_run_facts
    from glm_sft.loading import quiet_transformers, read_run_recipe, torch_dtype

    quiet_transformers()
    dtype = torch_dtype(dtype_name, "full", False)
    recipe = read_run_recipe(source)
    model, merged = load_merged_model(source, recipe, dtype)
    model = model.to(dtype)
    tokenizer, family = load_export_tokenizer(source, recipe, merged.get("base"))
    config = generation_config(source, tokenizer, family)
    card = export_card(source, recipe, merged, family, dtype_name, tokenizer, type(model).__name__)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = None
    try:
        staging = staging_beside(out_dir)
        write_export(staging, model, tokenizer, family, config, card, max_shard_size, read_run_facts(source))
        replace_folder(staging, out_dir)
    except Exception as exception:  # a full disk, a read-only or vanished target: nothing half-written stays
        error = storage_error(exception, out_dir.parent)
        written = folder_size(staging) if staging is not None else 0
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if error is None:
            raise
        needed = max(written, sum(p.numel() * p.element_size() for p in model.parameters()))
        where = f" ({error.filename})" if error.filename else ""
        raise UserError(
            f"cannot write the export into {out_dir.parent}: {error.strerror or error}{where}; it needs about "
            f"{human_size(needed)}{free_space_note(out_dir.parent)}; nothing was left there"
        ) from None
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise


def load_merged_model(source: Path, recipe: dict, dtype):
    """(model with plain weights, what was merged) for an adapter merged into its base, or a full/freeze result;
    weights that cannot be read, or would run code, are one UserError."""
    try:
        return _load_merged_model(source, recipe, dtype)
    except pickle.UnpicklingError as error:  # a full model's pytorch_model*.bin holding more than tensors
        from glm_sft.loading import unsafe_pickle_message

        names = sorted(path.name for path in source.glob("*.bin") if path.name != "training_args.bin")
        raise UserError(unsafe_pickle_message(source, names[0] if len(names) == 1 else "", error)) from None
    except Exception as error:  # a weight file cut off in a way export.py's check missed (safetensors' own error)
        if not isinstance(error, OSError) and "safetensor" not in type(error).__name__.lower():
            raise
        raise UserError(f"{source}: the weights cannot be read ({error}); export another checkpoint") from None


def _load_merged_model(source: Path, recipe: dict, dtype):
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


def export_card(
    source: Path, recipe: dict, merged: dict, family: str, dtype_name: str, tokenizer, architecture: str
) -> str:
    """The export's model card: the run's facts (run.json), with the losses of the exported step (its
    trainer_state.json: a checkpoint-N's own)."""
    from glm_sft.inference import read_run_facts
    from glm_sft.model_card import final_losses, model_card, prompt_example

    facts = read_run_facts(source)
    state = read_json(source / "trainer_state.json")
    if state:
        facts = {**facts, **final_losses(state.get("log_history", [])), "global_step": state.get("global_step")}
    export = {"source": source, "dtype": dtype_name, "architecture": architecture, **merged}
    return model_card(recipe, facts, family, prompt_example(tokenizer), export=export)


def write_export(
    folder: Path, model, tokenizer, family: str, config, card: str, max_shard_size: str, facts: dict
) -> None:
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
