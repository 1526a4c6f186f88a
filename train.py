"""Fine-tune a GLM chat model.

python train.py --config recipes/demo.yaml                 # tiny built-in model, CPU, about a minute
python train.py --config recipes/glm4_lora.yaml --learning_rate 1e-4   # any recipe key can be overridden
accelerate launch --config_file configs/zero2.yaml train.py --config recipes/glm4_lora.yaml
"""

import sys
from pathlib import Path

from glm_sft import UserError, exit_on_user_error
from glm_sft.arguments import check_output_dir, parse_recipe, save_recipe
from glm_sft.checkpoints import GracefulStop, is_complete, resolve_resume_checkpoint, resume_command, save_final_model
from glm_sft.data import read_datasets, tokenize_rows
from glm_sft.modeling import (
    build_peft_config,
    check_method,
    count_parameters,
    generation_config_for,
    load_model,
    load_tokenizer,
    prepare_model,
    quantization_config,
    torch_dtype,
)


def build_trainer(argv=None):
    """Everything up to training: recipe, data, tokenizer, model, trainer. Returns (trainer, recipe parts, extras)."""
    model_args, data_args, training_args, output_args = parse_recipe(argv)
    check_output_dir(training_args.output_dir, output_args.overwrite_output_dir)
    check_method(model_args, training_args)

    # Every data problem is reported here, before the tokenizer or the model is loaded.
    train_rows, eval_rows = read_datasets(data_args, seed=training_args.seed)
    if training_args.eval_strategy != "no" and not eval_rows:
        raise UserError(
            f"eval_strategy is {training_args.eval_strategy.value} but there is no eval data; set val_size or "
            "eval_dataset_name, or pass --eval_strategy no"
        )

    tokenizer, family = load_tokenizer(
        model_args.model_name_or_path, model_args.template, training_args.trust_remote_code
    )
    tokenize = dict(
        tokenizer=tokenizer,
        max_length=training_args.max_length,
        last_turn_only=data_args.last_turn_only,
        num_proc=training_args.dataset_num_proc,
    )
    train_dataset = tokenize_rows(train_rows, name="train", **tokenize).select_columns(["input_ids", "labels"])
    eval_dataset = None
    if eval_rows:
        eval_dataset = tokenize_rows(eval_rows, name="eval", **tokenize).select_columns(["input_ids", "labels"])

    model = load_model(
        model_args.model_name_or_path,
        dtype=torch_dtype(model_args.dtype, model_args.finetuning_type, training_args.bf16),
        trust_remote_code=training_args.trust_remote_code,
        quantization=quantization_config(model_args),
    )
    prepare_model(model, model_args, training_args)  # k-bit preparation (qlora), frozen layers (freeze)
    generation_config = generation_config_for(tokenizer, family)
    model.generation_config = generation_config

    from trl import SFTTrainer

    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=build_peft_config(model_args),
    )
    return trainer, (model_args, data_args, training_args, output_args), (family, generation_config)


@exit_on_user_error
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    trainer, recipe, (family, generation_config) = build_trainer(argv)
    model_args, data_args, training_args, output_args = recipe
    trainable, total = count_parameters(trainer.model)
    world_batch = (
        training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * training_args.world_size
    )
    trainer.accelerator.print(
        f"model: {model_args.model_name_or_path} ({family} format), method: {model_args.finetuning_type}, "
        f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)\n"
        f"effective batch size: {world_batch} = {training_args.per_device_train_batch_size} per device "
        f"x {training_args.gradient_accumulation_steps} accumulation x {training_args.world_size} processes"
    )

    is_main = trainer.is_world_process_zero()
    output_dir = Path(training_args.output_dir)
    checkpoint = resolve_resume_checkpoint(training_args.resume_from_checkpoint, output_dir, announce=is_main)
    # Ctrl-C or SIGTERM during training: checkpoint at the end of the step, stop, and say how to go on.
    stop = GracefulStop(announce=is_main)
    trainer.add_callback(stop)
    with stop.catching_signals():
        trainer.train(resume_from_checkpoint=checkpoint)
    if stop.stopped_at_step is not None:
        if is_main:
            saved = output_dir / f"checkpoint-{stop.stopped_at_step}"
            where = f"checkpoint in {saved}" if is_complete(saved) else "no checkpoint could be saved at this step"
            command = resume_command(argv, several_processes=training_args.world_size > 1)
            print(
                f"stopped at step {stop.stopped_at_step} of {trainer.state.max_steps}; {where}; resume with: {command}"
            )
        sys.exit(stop.exit_code)
    if trainer.eval_dataset is not None:
        trainer.evaluate()

    # The result: adapter or full model, tokenizer with the template, the family's stop ids, the resolved recipe.
    def write_extra_files(folder):
        generation_config.save_pretrained(folder)
        trainer.state.save_to_json(str(folder / "trainer_state.json"))  # the loss history, for model cards
        save_recipe(folder / "recipe.yaml", argv, model_args, data_args, training_args, output_args)

    save_final_model(trainer, output_dir, write_extra_files)
    if is_main:
        flag = "--model" if model_args.finetuning_type in ("full", "freeze") else "--adapter"
        print(f"saved to {output_dir}; chat with: python chat_cli.py {flag} {output_dir}")


if __name__ == "__main__":
    main()
