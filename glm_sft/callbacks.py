"""Sample generations during training: greedy replies to a few fixed prompts at each save and at the end.

They go to output_dir/samples.jsonl (one line per step and prompt) and, when a SwanLab run is active, to SwanLab as
text. Generating leaves training as it was: train mode, gradient checkpointing and every random number generator.
"""

import contextlib
import json
import random
import sys
from pathlib import Path

from transformers import TrainerCallback

from glm_sft.evaluation import generation_sync, prompt_and_reference
from glm_sft.inference import generate_replies
from glm_sft.tracking import active_swanlab

SAMPLES_FILE = "samples.jsonl"


def sample_prompts(prompts: list[str] | None, rows: list[dict] | None, count: int) -> list[tuple[dict, str | None]]:
    """(prompt, reference) pairs: the recipe's sample_prompts as user messages, else the first `count` rows."""
    if prompts:
        return [({"messages": [{"role": "user", "content": text}]}, None) for text in prompts]
    return [prompt_and_reference(row) for row in (rows or [])[: max(count, 0)]]


@contextlib.contextmanager
def preserved_training_state(model):
    """Eval mode inside; afterwards the model's train/eval mode and the torch (CPU and CUDA), Python and NumPy
    random states are back as they were, so a run with samples draws the same dropout masks and batches as one
    without."""
    import numpy
    import torch

    was_training = model.training
    states = (torch.get_rng_state(), random.getstate(), numpy.random.get_state())
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    model.eval()
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        numpy.random.set_state(states[2])
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        model.train(was_training)


class SampleGeneration(TrainerCallback):
    """At each checkpoint save and at the end of training, greedy replies to fixed prompts, logged and kept.

    With a sharded model (ZeRO-3, FSDP) every process generates (the parameters are gathered collectively); in
    plain DDP or a single process only the main process does. Only the main process writes and logs.
    """

    def __init__(
        self,
        trainer,
        samples: list[tuple[dict, str | None]],
        generation_config,
        max_new_tokens: int,
        family: str | None = None,
        template_kwargs: dict | None = None,
    ):
        """samples: (prompt, reference) pairs from sample_prompts(); generation_config: its eos ids stop replies;
        family and template_kwargs: the chat format and the switches the model answers with (a thinking family's
        answers are recorded without their reasoning)."""
        self.family = family
        self.template_kwargs = template_kwargs
        self.trainer = trainer
        self.tokenizer = trainer.processing_class
        self.samples = samples
        self.stop_ids = list(generation_config.eos_token_id)  # a list: see inference.generation_config_for
        self.max_new_tokens = max_new_tokens
        self.path = Path(trainer.args.output_dir) / SAMPLES_FILE
        self.done_steps = set()

    def on_train_begin(self, args, state, control, **kwargs):
        # A fresh run starts the file anew; a resumed one keeps what came before its checkpoint.
        if state.is_world_process_zero and self.path.is_file():
            kept = [
                line
                for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= state.global_step
            ]
            self.path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")

    def on_save(self, args, state, control, model=None, **kwargs):
        self.generate(args, state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.generate(args, state, model)

    def generate(self, args, state, model) -> None:
        if not self.samples or model is None or state.global_step in self.done_steps:
            return
        self.done_steps.add(state.global_step)
        synced_gpus = generation_sync(self.trainer, state.is_world_process_zero)
        if synced_gpus is None:
            return
        with preserved_training_state(model):
            replies = generate_replies(
                model,
                self.tokenizer,
                [prompt for prompt, _ in self.samples],
                stop_ids=self.stop_ids,
                max_new_tokens=self.max_new_tokens,
                batch_size=len(self.samples),
                synced_gpus=synced_gpus,
                family=self.family,
                template_kwargs=self.template_kwargs,
            )
        if state.is_world_process_zero:
            self.record(state.global_step, replies)

    def record(self, step: int, replies: list[str]) -> None:
        records = []
        for (prompt, reference), reply in zip(self.samples, replies, strict=True):
            record = {"step": step, "prompt": prompt["messages"][-1]["content"], "reply": reply}
            if len(prompt["messages"]) > 1:
                record["messages"] = prompt["messages"]
            if reference is not None:
                record["reference"] = reference
            records.append(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as file:
            file.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        log_to_swanlab(step, records)
        shown = " | ".join(json.dumps(record["reply"][:40], ensure_ascii=False) for record in records)
        print(f"samples at step {step} ({self.path.name}): {shown}", file=sys.stderr)


def log_to_swanlab(step: int, records: list[dict]) -> None:
    """The replies as SwanLab text (prompt as caption), when a SwanLab run is active in this process."""
    swanlab = active_swanlab()
    if swanlab is None:
        return
    texts = [
        swanlab.Text(record["reply"], caption=f"{record['prompt']} | reference: {record.get('reference', '-')}")
        for record in records
    ]
    swanlab.log({"samples/replies": texts}, step=step)
