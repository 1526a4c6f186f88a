"""One training run: built from its recipe (data, tokenizer and template, model and method, trainer), then trained,
saved and reported. train.py is these steps in order; the benchmarks and tests build runs the same way.

Every problem a user can cause (recipe, data, method against launch) is found before any weights load.
"""

import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from glm_sft import UserError, kernels, speed, tracking
from glm_sft.arguments import Recipe
from glm_sft.callbacks import SampleGeneration, sample_prompts
from glm_sft.checkpoints import STATE_FILE, checkpoint_step, resolve_resume_checkpoint
from glm_sft.data import read_datasets
from glm_sft.distributed import check_launch, main_process_output
from glm_sft.evaluation import predict_after_training
from glm_sft.inference import RUN_FACTS, generation_config_for
from glm_sft.loading import load_model, load_tokenizer, torch_dtype
from glm_sft.methods import (
    build_peft_config,
    check_method,
    check_moe_lora,
    count_parameters,
    lora_scope,
    prepare_model,
    quantization_config,
)
from glm_sft.model_card import final_losses, model_card, prompt_example
from glm_sft.outputs import acquire_output_lock, check_output_dir
from glm_sft.reasoning import reasoning_samples
from glm_sft.saving import save_final_model
from glm_sft.stopping import GracefulStop
from glm_sft.switches import answering_switches, check_switches, reasoning_in
from glm_sft.template import save_tokenizer
from glm_sft.tokenization import tokenize_dataset


@dataclass
class Run:
    recipe: Recipe
    trainer: object  # trl.SFTTrainer
    family: str  # the chat format (template.FAMILIES)
    generation_config: object  # the family's stop ids; saved with the result
    train_rows: list[dict]
    eval_rows: list[dict] | None
    swanlab_mode: str | None  # None: not reporting to SwanLab
    choices: list[str]  # how it trains: batches, attention, gradient checkpointing, loss head
    # The template switches the rows trained with (the recipe's chat_template_kwargs), what the trained replies held
    # of reasoning ("all", "none", "mixed"), and the switches the result answers with by default.
    template_kwargs: dict
    reasoning: str
    answer_template_kwargs: dict

    @property
    def is_main(self) -> bool:
        return self.trainer.is_world_process_zero()

    @property
    def output_dir(self) -> Path:
        return Path(self.recipe.training.output_dir)

    def summary(self) -> str:
        model, training = self.recipe.model, self.recipe.training
        trainable, total = count_parameters(self.trainer.model)
        world_batch = training.per_device_train_batch_size * training.gradient_accumulation_steps * training.world_size
        return "\n".join(
            [
                f"model: {model.model_name_or_path} ({self.family} format), method: {model.finetuning_type}, "
                f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)",
                *filter(None, [lora_scope(self.trainer.model)]),
                f"effective batch size: {world_batch} = {training.per_device_train_batch_size} per device "
                f"x {training.gradient_accumulation_steps} accumulation x {training.world_size} processes",
                *self.choices,
            ]
        )

    def train(self) -> int | None:
        """Train (resuming when resume_from_checkpoint says so); None when done, else the exit code of a stop.

        Ctrl-C or SIGTERM during training: checkpoint at the end of the step, stop, and say how to go on.
        """
        if self.is_main and self.swanlab_mode not in (None, "disabled"):
            self.start_swanlab()
        checkpoint = resolve_resume_checkpoint(
            self.recipe.training.resume_from_checkpoint, self.output_dir, announce=self.is_main
        )
        if checkpoint is not None and self.finished_in(checkpoint):
            if self.trainer.eval_dataset is not None:
                self.trainer.evaluate()
            return None
        stop = GracefulStop(announce=self.is_main, argv=self.recipe.argv)
        self.trainer.add_callback(stop)
        with stop.catching_signals():
            self.trainer.train(resume_from_checkpoint=checkpoint)
        if stop.stopped_at_step is None:
            if self.trainer.eval_dataset is not None:
                self.trainer.evaluate()
            return None
        if self.is_main:
            several = self.recipe.training.world_size > 1
            print(stop.report(self.output_dir, self.trainer.state.max_steps, self.recipe.argv, several))
        return stop.exit_code

    def planned_steps(self) -> int | None:
        """The optimizer steps this run trains in all (max_steps, else from the epochs and the data)."""
        training = self.recipe.training
        if training.max_steps > 0:
            return training.max_steps
        try:
            return self.trainer.set_initial_training_values(training, self.trainer.get_train_dataloader())[-1]
        except (AttributeError, TypeError):  # a transformers without that helper: let the trainer decide
            return None

    def finished_in(self, checkpoint: str) -> bool:
        """Whether `checkpoint` was saved at this run's last step (cut off during or after its final save); then its
        weights become the trainer's, as they were at the end of training, and no step is trained past the end.

        transformers' Trainer, resumed from the checkpoint of the last step, would train one step more.
        """
        step, planned = checkpoint_step(checkpoint), self.planned_steps()
        if step is None or planned is None or step < planned:
            return False
        if self.trainer.is_deepspeed_enabled:  # its weights load only inside train(): resumed as usual there
            if self.is_main:
                print(
                    f"note: {checkpoint} is at the last step; DeepSpeed resumes it through training", file=sys.stderr
                )
            return False
        from transformers import TrainerState

        self.trainer._load_from_checkpoint(checkpoint)
        self.trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / STATE_FILE))
        if self.is_main:
            print(
                f"{checkpoint} is at step {step}, the last of this run ({planned}): training was done; saving the "
                "final model from it",
                file=sys.stderr,
            )
        return True

    def start_swanlab(self) -> None:
        trainable, total = count_parameters(self.trainer.model)
        data = {"train_rows": len(self.trainer.train_dataset), "eval_rows": len(self.eval_rows or [])}
        config = {
            "recipe": self.recipe.resolved(),
            "data": data,
            "parameters": {"trainable": trainable, "total": total},
        }
        tracking.start_swanlab(self.swanlab_mode, self.recipe.training, config=config)

    def save(self) -> None:
        """The result: adapter or full model, tokenizer with the template, the family's stop ids, the recipe."""

        def write_extra_files(folder):
            save_tokenizer(self.trainer.processing_class, self.family, folder)  # the checkpoint's own template
            self.generation_config.save_pretrained(folder)
            self.trainer.state.save_to_json(str(folder / "trainer_state.json"))  # the loss history, for model cards
            self.recipe.save(folder / "recipe.yaml")
            facts = self.facts()
            (folder / RUN_FACTS).write_text(json.dumps(facts, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            (folder / "README.md").write_text(run_card(self, facts), encoding="utf-8")  # replaces PEFT's template

        several = self.recipe.training.world_size > 1
        save_final_model(self.trainer, self.output_dir, write_extra_files, self.recipe.argv, several)

    def facts(self) -> dict:
        """What the run used and reached, for run.json and the model cards (export.py reads it too)."""
        eval_dataset = self.trainer.eval_dataset
        return {
            "train_rows": len(self.train_rows),
            "eval_rows": len(self.eval_rows or []),
            "train_sequences": len(self.trainer.train_dataset),
            "eval_sequences": len(eval_dataset) if eval_dataset is not None else 0,
            "global_step": self.trainer.state.global_step,
            **final_losses(self.trainer.state.log_history),
            "reasoning": self.reasoning,  # in the trained replies: all, none or mixed
            # What chat_cli, serve, webchat and evaluate pass the template unless told otherwise.
            "chat_template_kwargs": self.answer_template_kwargs,
        }

    def predict(self) -> None:
        """do_predict: replies to the eval rows, scored, into predictions.jsonl and metrics.json."""
        if not self.recipe.training.do_predict:
            return
        stop_ids, longest = self.generation_config.eos_token_id, self.recipe.training.predict_max_new_tokens
        metrics = predict_after_training(
            self.trainer,
            self.eval_rows,
            self.output_dir,
            stop_ids=stop_ids,
            max_new_tokens=longest,
            family=self.family,
            template_kwargs=self.answer_template_kwargs,
        )
        if self.is_main:
            tracking.log_metrics(metrics, "predict", step=self.trainer.state.global_step)
            print(f"do_predict on {len(self.eval_rows)} eval rows: {json.dumps(metrics)}")

    def finish(self) -> None:
        """The loss plot, the end of the SwanLab run, and how to chat with the result."""
        if not self.is_main:
            return
        history = self.trainer.state.log_history
        tracking.plot_losses(history, self.output_dir / tracking.LOSS_PLOT, title=str(self.output_dir))
        tracking.finish_swanlab()
        flag = "--model" if self.recipe.model.finetuning_type in ("full", "freeze") else "--adapter"
        print(f"saved to {self.output_dir}; chat with: python chat_cli.py {flag} {self.output_dir}")


def run_card(run: Run, facts: dict) -> str:
    """output_dir/README.md: what was trained on what, how it ended, and how to chat with it or export it."""
    model_args, data_args = run.recipe.model, run.recipe.data
    recipe = {
        **run.recipe.resolved(),
        "model_name_or_path": model_args.model_name_or_path,
        "finetuning_type": model_args.finetuning_type,
        "dataset_name": data_args.dataset_name,
        "eval_dataset_name": data_args.eval_dataset_name,
        "val_size": data_args.val_size,
    }
    return model_card(recipe, facts, run.family, prompt_example(run.trainer.processing_class))


def build_run(recipe: Recipe, model=None) -> Run:
    """Everything up to training, in one pass: recipe -> data -> tokenizer and family -> model and method -> speed ->
    trainer. `model`: an already built model to train instead of loading model_name_or_path (the benchmarks pass
    one)."""
    model_args, data_args, training = recipe.model, recipe.data, recipe.training
    check_recipe(recipe)
    train_rows, eval_rows = read_run_data(recipe)
    swanlab_mode = tracking.resolve_swanlab_mode(training.swanlab_mode, training)
    if training.process_index == 0:  # one run at a time per output_dir (created here); under a launch, the main's
        acquire_output_lock(training.output_dir)

    tokenizer, family = load_tokenizer(model_args.model_name_or_path, model_args.template, training.trust_remote_code)
    switches = check_switches(data_args.chat_template_kwargs, family)
    check_moe_lora(model_args, family)
    train_dataset, eval_dataset = tokenized_datasets(recipe, tokenizer, family, switches, train_rows, eval_rows)
    reasoning = reasoning_in(train_rows)
    answer_switches = answering_switches(family, switches, reasoning)

    model, notes = method_model(recipe, model)
    choices = speed.configure(model, model_args, training) + notes  # padding-free or padded batches, attention
    choices.append(kernels.apply_kernels(model, training.kernels))  # before PEFT wraps the modules
    generation_config = generation_config_for(tokenizer, family)
    model.generation_config = generation_config

    from trl import SFTTrainer

    trainer = SFTTrainer(
        model=model,
        args=trainer_arguments(training, swanlab_mode),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=build_peft_config(model_args, model),  # on MoE models: glm_sft.experts' expert LoRA
    )
    # Greedy replies to a few fixed prompts at each save and at the end: output_dir/samples.jsonl and SwanLab.
    samples = sample_prompts(training.sample_prompts, eval_rows or train_rows, training.sample_count)
    trainer.add_callback(
        SampleGeneration(trainer, samples, generation_config, training.sample_max_new_tokens, family, answer_switches)
    )
    choices += speed.lean_training(trainer.model)  # lean LoRA forward and, on the CPU, trained-position loss
    fused = speed.fused_lm_head_applied(trainer.model)  # checked on the model, not taken on trust
    choices.append(
        "loss: TRL's fused LM head (trained positions only, no full logits)" if fused else "loss: full logits"
    )
    if answer_switches != switches:
        added = ", ".join(f"{key}={json.dumps(answer_switches[key])}" for key in answer_switches.keys() - switches)
        choices.append(
            f"thinking: no trained reply has reasoning, so the result answers with {added} by default, as it "
            "trained (run.json; chat_cli --enable_thinking true or a request's chat_template_kwargs overrides it)"
        )
    return Run(
        recipe,
        trainer,
        family,
        generation_config,
        train_rows,
        eval_rows,
        swanlab_mode,
        choices,
        switches,
        reasoning,
        answer_switches,
    )


def check_recipe(recipe: Recipe) -> None:
    """The method, the batching and the launch (DeepSpeed config) agree; nothing is read or loaded yet."""
    check_method(recipe.model, recipe.training)
    speed.check_batching(recipe.model, recipe.training)
    check_launch(recipe.model, recipe.training)


def read_run_data(recipe: Recipe) -> tuple[list[dict], list[dict] | None]:
    """(train rows, eval rows or None), read and checked.

    Every data problem and the output directory's are reported here, in one report, before the tokenizer or the model
    is loaded: a user who fixes one does not meet the other on the next try.
    """
    training = recipe.training
    try:
        check_output_dir(training.output_dir, training.overwrite_output_dir)
        output_problem = None
    except UserError as error:
        output_problem = str(error)
    with main_process_output(training):
        try:
            train_rows, eval_rows = read_datasets(recipe.data, seed=training.seed)
        except UserError as error:
            raise UserError(f"{error}\nerror: {output_problem}" if output_problem else str(error)) from None
    if output_problem:
        raise UserError(output_problem)
    check_eval_data(training, eval_rows)
    return train_rows, eval_rows


def check_eval_data(training, eval_rows) -> None:
    if training.eval_strategy != "no" and not eval_rows:
        raise UserError(
            f"eval_strategy is {training.eval_strategy.value} but there is no eval data; set val_size or "
            "eval_dataset_name, or pass --eval_strategy no"
        )
    if training.do_predict and not eval_rows:
        raise UserError(
            "do_predict scores replies to the eval data and there is none; set val_size or eval_dataset_name"
        )


def tokenized_datasets(recipe: Recipe, tokenizer, family: str, switches: dict, train_rows, eval_rows):
    """(train, eval or None) datasets of input_ids and labels, as the trainer gets them, rendered with the template
    switches `switches`, cut to max_length as truncation_mode says; rows with reasoning the template drops from
    history are split first (reasoning.reasoning_samples). The trainer does not prepare them again
    (trainer_arguments), so shuffle_dataset is applied here, as TRL's preparation would."""
    training, last_turn_only = recipe.training, recipe.data.last_turn_only
    train_rows, eval_rows = (
        reasoning_samples(rows, family, last_turn_only, switches) if rows else rows for rows in (train_rows, eval_rows)
    )
    settings = dict(
        tokenizer=tokenizer,
        max_length=training.max_length,
        last_turn_only=last_turn_only,
        num_proc=training.dataset_num_proc,
        training_args=training,
        template_kwargs=switches or None,
        truncation_mode=training.truncation_mode,
    )
    datasets = []
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
        dataset = (
            tokenize_dataset(rows, name=name, **settings).select_columns(["input_ids", "labels"]) if rows else None
        )
        if dataset is not None and training.shuffle_dataset and not training.packing:
            dataset = dataset.shuffle(seed=training.seed)
        datasets.append(dataset)
    return tuple(datasets)


def method_model(recipe: Recipe, model=None):
    """(the model to train, notes for the summary): loaded for its method unless given (quantized for qlora), then
    prepared for it (k-bit preparation for qlora, frozen layers for freeze, ZeRO-3)."""
    model_args, training = recipe.model, recipe.training
    if model is None:
        model = load_model(
            model_args.model_name_or_path,
            dtype=torch_dtype(model_args.dtype, model_args.finetuning_type, training.bf16),
            trust_remote_code=training.trust_remote_code,
            quantization=quantization_config(model_args),
        )
    return model, prepare_model(model, model_args, training)


def trainer_arguments(training, swanlab_mode):
    """The trainer's own copy of the training keys; the recipe's stay as the user gave them (recipe.yaml).

    Our tokenization is the only place that truncates: TRL's dataset preparation (which would cut to max_length and
    drop rows left without a trained token again) is skipped, except with packing, where it only packs the rows
    (already cut; TRL does not truncate when it packs).
    """
    arguments = copy.copy(training)
    if swanlab_mode == "disabled":  # SwanLab left out, so that it is not even imported
        arguments.report_to = [name for name in training.report_to if name != "swanlab"]
    if not training.packing:
        arguments.dataset_kwargs = {**(training.dataset_kwargs or {}), "skip_prepare_dataset": True}
        if training.padding_free:
            arguments.max_length = None  # TRL refuses a max_length it would not enforce without packing
    if training.dataloader_pin_memory and training.device.type == "cpu":
        arguments.dataloader_pin_memory = False  # nothing to pin for: torch would warn at every epoch
    return arguments
