"""The README.md model card of a result, one builder for both: the card train.py writes into output_dir and the card
export.py writes into a merged export. Each says what was trained on what and how it ended (the recipe, run.json's
facts), and how to use the folder it is in."""

from glm_sft.inference import switches_lines, switches_note

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


def model_card(recipe: dict, facts: dict, family: str, prompt: str, export: dict | None = None) -> str:
    """The card of a run's result (`export` None) or of an export. `recipe`: the run's recipe keys; `facts`: run.json
    (rows, global_step, final losses, template switches); `prompt`: prompt_example's text. `export`: {"source",
    "dtype", "architecture"} and, for a merged adapter, {"base", "qlora", "dora"}."""
    merged = export is not None and "base" in export
    method = recipe.get("finetuning_type") or ("lora" if merged else "full or freeze (not recorded)")
    if (recipe.get("use_dora") or (export or {}).get("dora")) and method == "lora":
        method = "lora (DoRA)"
    base = (export or {}).get("base") or recipe.get("model_name_or_path") or "not recorded"
    settings = [f"- {key}: {recipe[key]}" for key in CARD_KEYS if recipe.get(key) is not None]
    if export is None:
        whole = method in ("full", "freeze")
        intro = [
            f"Trained by glm-sft's train.py ({'the whole model' if whole else 'an adapter'}). The full recipe is in "
            "`recipe.yaml` (`python train.py --config recipe.yaml` repeats the run), the loss history in "
            "`trainer_state.json`.",
        ]
        flag = "--model" if whole else "--adapter"
        usage = [
            "```bash",
            f"python chat_cli.py {flag} path/to/this/dir                       # chat in the terminal",
            "python export.py path/to/this/dir --out_dir exported/my-model   # one plain transformers directory",
            "```",
        ]
    else:
        intro = [
            f"Exported by glm-sft's export.py from `{export['source']}`. Plain transformers weights "
            f"({export['dtype']}, native `{export['architecture']}`); no trust_remote_code needed.",
            *_merge_notes(export, method),
        ]
        usage = _transformers_usage(facts)
    lines = [
        "# Fine-tuned GLM model",
        "",
        *intro,
        "",
        f"- base model: {base}",
        f"- method: {method}",
        f"- chat format: {family} (`{prompt}`)",
        *switches_lines(facts),
        *_data_lines(recipe, facts, sequences=export is None),
        *([f"- steps: {facts['global_step']}"] if isinstance(facts.get("global_step"), int) else []),
        f"- final train loss: {_loss(facts, 'final_train_loss')}",
        f"- final eval loss: {_loss(facts, 'final_eval_loss')}",
        "",
        "## Training settings",
        "",
        *(settings or ["not recorded"]),
        "",
        "## Usage",
        "",
        *usage,
        "",
        *switches_note(facts),
    ]
    return "\n".join(lines)


def final_losses(log_history: list[dict]) -> dict:
    """{"final_train_loss", "final_eval_loss"}: the last of each in a trainer's log history, or None."""
    train = [entry["loss"] for entry in log_history if "loss" in entry]
    evaluation = [entry["eval_loss"] for entry in log_history if "eval_loss" in entry]
    return {
        "final_train_loss": train[-1] if train else None,
        "final_eval_loss": evaluation[-1] if evaluation else None,
    }


def prompt_example(tokenizer) -> str:
    """The prompt of a one-message chat as this model's template writes it, newlines escaped, for the model card."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "你好"}], add_generation_prompt=True, tokenize=False
    )
    return text.replace("\n", "\\n")


def _loss(facts: dict, key: str) -> str:
    value = facts.get(key)
    if not isinstance(value, int | float):
        return "not recorded"
    step = facts.get("global_step")
    return f"{value:.4f} (step {step})" if step is not None else f"{value:.4f}"


def _data_lines(recipe: dict, facts: dict, sequences: bool) -> list[str]:
    """The training and evaluation data with the rows the run used (run.json); `sequences`: with the training
    sequences they made."""

    def rows(key: str) -> str:
        return f"{facts[key]} rows" if isinstance(facts.get(key), int) else "row count not recorded"

    made = f", {facts['train_sequences']} training sequences" if sequences and "train_sequences" in facts else ""
    lines = [f"- training data: {recipe.get('dataset_name', 'not recorded')} ({rows('train_rows')}{made})"]
    val_size = recipe.get("val_size")
    if recipe.get("eval_dataset_name"):
        lines.append(f"- evaluation data: {recipe['eval_dataset_name']} ({rows('eval_rows')})")
    elif val_size:
        held_out = rows("eval_rows") if isinstance(facts.get("eval_rows"), int) else str(val_size)
        lines.append(f"- evaluation data: {held_out} held out of the training data (val_size {val_size})")
    elif "dataset_name" in recipe:
        lines.append("- evaluation data: none")
    return lines


def _merge_notes(export: dict, method: str) -> list[str]:
    if "base" not in export:
        return []
    merged = f"The {method} adapter from `{export['source']}` is merged into the base weights (PEFT merge_and_unload)."
    notes = ["", merged]
    if export.get("qlora"):
        notes.append(
            "Note: this is a QLoRA adapter. It was trained on the 4-bit quantized base, but it is merged here into "
            f"the base loaded in {export['dtype']}, not into 4-bit weights; outputs can differ slightly from the "
            "quantized model used in training."
        )
    return notes


def _transformers_usage(facts: dict) -> list[str]:
    """Loading the export with plain transformers, passing the template switches it answers with."""
    switches = "".join(f", {key}={value!r}" for key, value in (facts.get("chat_template_kwargs") or {}).items())
    return [
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
    ]
