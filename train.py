"""Fine-tune a GLM chat model.

python train.py --config recipes/demo.yaml                 # tiny built-in model, CPU, about a minute
python train.py --config recipes/glm4_lora.yaml --learning_rate 1e-4   # any recipe key can be overridden
accelerate launch --config_file configs/zero2.yaml train.py --config recipes/glm4_lora.yaml
"""

import copy
import json
import sys
from pathlib import Path

from glm_sft import UserError, exit_on_user_error, speed, tracking
from glm_sft.arguments import check_output_dir, given_keys, parse_recipe, resolved_recipe, save_recipe
from glm_sft.callbacks import SampleGeneration, sample_prompts
from glm_sft.checkpoints import GracefulStop, is_complete, resolve_resume_checkpoint, resume_command, save_final_model
from glm_sft.data import read_datasets
from glm_sft.distributed import check_launch, launch_arguments, main_process_output, tokenize_once
from glm_sft.generation import predict_after_training
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


def tokenized_datasets(tokenizer, train_rows, eval_rows, data_args, training_args):
    """(train, eval or None) datasets of input_ids and labels, as the trainer gets them.

    Tokenized once per machine, by its main process; the others load the result.
    """
    tokenize = dict(
        tokenizer=tokenizer,
        max_length=training_args.max_length,
        last_turn_only=data_args.last_turn_only,
        num_proc=training_args.dataset_num_proc,
    )
    return tuple(
        tokenize_once(training_args, rows, name=name, **tokenize).select_columns(["input_ids", "labels"])
        if rows
        else None
        for name, rows in (("train", train_rows), ("eval", eval_rows))
    )


def build_trainer(argv=None, model=None):
    """Everything up to training: recipe, data, tokenizer, model, trainer. Returns (trainer, recipe parts, extras).

    `model`: an already built model to train instead of loading model_name_or_path (the benchmarks pass one).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # Under accelerate launch: check the devices; on a machine without GPUs the processes run on the CPU.
    model_args, data_args, training_args, output_args = parse_recipe(argv + launch_arguments(argv))
    check_output_dir(training_args.output_dir, output_args.overwrite_output_dir)
    check_method(model_args, training_args)
    given = set(given_keys(argv))
    if "padding_free" not in given:
        training_args.padding_free = True  # our default (TRL's is false); speed.configure falls back where it can't
    check_launch(model_args, training_args)  # method vs. DeepSpeed config

    # Every data problem is reported here, before the tokenizer or the model is loaded.
    with main_process_output(training_args):
        train_rows, eval_rows = read_datasets(data_args, seed=training_args.seed)
    if training_args.eval_strategy != "no" and not eval_rows:
        raise UserError(
            f"eval_strategy is {training_args.eval_strategy.value} but there is no eval data; set val_size or "
            "eval_dataset_name, or pass --eval_strategy no"
        )
    if training_args.do_predict and not eval_rows:
        raise UserError(
            "do_predict scores replies to the eval data and there is none; set val_size or eval_dataset_name"
        )
    swanlab_mode = tracking.resolve_swanlab_mode(output_args.swanlab_mode, training_args)  # None: not reporting

    tokenizer, family = load_tokenizer(
        model_args.model_name_or_path, model_args.template, training_args.trust_remote_code
    )
    train_dataset, eval_dataset = tokenized_datasets(tokenizer, train_rows, eval_rows, data_args, training_args)

    if model is None:
        model = load_model(
            model_args.model_name_or_path,
            dtype=torch_dtype(model_args.dtype, model_args.finetuning_type, training_args.bf16),
            trust_remote_code=training_args.trust_remote_code,
            quantization=quantization_config(model_args),
        )
    prepare_model(model, model_args, training_args)  # k-bit preparation (qlora), frozen layers (freeze)
    # Padding-free batches and their attention where the model allows it, else padded, length-grouped batches.
    speed_report = speed.configure(model, model_args, training_args, given)
    generation_config = generation_config_for(tokenizer, family)
    model.generation_config = generation_config

    from trl import SFTTrainer

    with tracking.reporting_without_disabled_swanlab(training_args, swanlab_mode):
        trainer_args = training_args
        if training_args.padding_free and not training_args.packing:
            # Rows are already cut to max_length by our tokenization; TRL wants none to enforce without packing.
            trainer_args = copy.copy(training_args)
            trainer_args.max_length = None
        trainer = SFTTrainer(
            model=model,
            args=trainer_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=build_peft_config(model_args),
        )
    # Greedy replies to a few fixed prompts at each save and at the end: output_dir/samples.jsonl and SwanLab.
    samples = sample_prompts(output_args.sample_prompts, eval_rows or train_rows, output_args.sample_count)
    trainer.add_callback(SampleGeneration(trainer, samples, generation_config, output_args.sample_max_new_tokens))
    fused = speed.fused_lm_head_applied(trainer.model)  # checked on the model, not taken on trust
    speed_report.append(
        "loss: TRL's fused LM head (trained positions only, no full logits)" if fused else "loss: full logits"
    )
    extras = (family, generation_config, eval_rows, swanlab_mode, speed_report)
    return trainer, (model_args, data_args, training_args, output_args), extras


@exit_on_user_error
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    trainer, recipe, (family, generation_config, eval_rows, swanlab_mode, speed_report) = build_trainer(argv)
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
        f"x {training_args.gradient_accumulation_steps} accumulation x {training_args.world_size} processes\n"
        + "\n".join(speed_report)
    )

    is_main = trainer.is_world_process_zero()
    output_dir = Path(training_args.output_dir)
    if is_main and swanlab_mode not in (None, "disabled"):
        data = {"train_rows": len(trainer.train_dataset), "eval_rows": len(eval_rows or [])}
        parameters = {"trainable": trainable, "total": total}
        config = {"recipe": resolved_recipe(argv, *recipe), "data": data, "parameters": parameters}
        tracking.start_swanlab(swanlab_mode, training_args, output_args, config=config)
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
    if training_args.do_predict:  # replies to the eval rows, scored: predictions.jsonl and metrics.json
        stop_ids, longest = generation_config.eos_token_id, output_args.predict_max_new_tokens
        metrics = predict_after_training(trainer, eval_rows, output_dir, stop_ids=stop_ids, max_new_tokens=longest)
        if is_main:
            tracking.log_metrics(metrics, "predict", step=trainer.state.global_step)
            print(f"do_predict on {len(eval_rows)} eval rows: {json.dumps(metrics)}")
    if is_main:
        tracking.plot_losses(trainer.state.log_history, output_dir / tracking.LOSS_PLOT, title=str(output_dir))
        tracking.finish_swanlab()
        flag = "--model" if model_args.finetuning_type in ("full", "freeze") else "--adapter"
        print(f"saved to {output_dir}; chat with: python chat_cli.py {flag} {output_dir}")


if __name__ == "__main__":
    main()
