"""Training throughput of four set-ups on the same rows, seed, LoRA, schedule and global batch.

  naive      every row padded to max_length, every token trained (what most fine-tuning tutorials do), transformers
             Trainer
  trl        plain TRL SFTTrainer defaults: each batch padded to its longest row, loss on the assistant tokens
  trl_tuned  TRL as a user who tunes it writes it: SFTConfig(padding_free=True), the rows of a batch laid end to end
             with position_ids restarting per row; attention flash_attention_2 when installed on a GPU, else SDPA with
             the block-causal mask transformers builds from position_ids; TRL's fused LM head
  ours       glm_sft.run.build_run with recipes/glm4_lora.yaml: padding-free batches, per-row attention (sdpa_varlen:
             SDPA on each row's own span), fused LM head; on an MoE model the per-expert LoRA of glm_sft.experts
  ours_qlora ours with finetuning_type qlora: on an MoE model the routed experts in 4-bit NF4
             (glm_sft.quantized_experts)

`--model tiny-moe` is a mid-size GLM-4.5-style MoE (hidden 512, 16 routed experts, 4 per token, no dense layer or
shared expert, so the LoRA scope is the attention and the routed experts in every arm): its trl_tuned arm is TRL's
padding-free batches with PEFT's own MoE LoRA (ParamWrapper, W + B·A for the whole expert stack), the same targets,
ranks and dropout (0) as ours.

Each arm runs in a fresh Python process, the arms interleaved (repeat r starts with a different arm), so no arm
inherits another's warm caches or allocator state. All arms read the same rows with our readers and templates; the
trl arms get our labels, the naive arm labels every real token. Before training, each arm's batch layout is checked:
the logits of the first rows in one collated batch against each row run alone (`isolation`: do rows attend to each
other?).

python benchmarks/train_throughput.py                                 # CPU configuration, a few minutes on 2 cores
python benchmarks/train_throughput.py --output bench.json --repeats 3
python benchmarks/train_throughput.py --model glm4-9b --max_length 2048 --batch_size 8 --rows 256   # one GPU, bf16
python benchmarks/gpu_throughput.py                                   # every GPU table of docs/benchmarks.md

Models have random weights built from a config (no download): `tiny` is the GLM architecture at hidden 256, the
GPU configurations are GLM-4-9B's and ChatGLM3-6B's real shapes, and `glm47-flash` GLM-4.7-Flash's real widths with 8
of its 47 layers (an MoE: arms trl_tuned, ours, ours_qlora, as for tiny-moe). The text goes through the built-in tiny
tokenizer of the family (real vocabulary size in the model, so the output layer costs what it really costs).

Figures per arm: real_tokens_per_s (non-padding tokens through the model per second of training), trained_tokens_per_s
(tokens with a loss), padding_ratio (padding positions / all positions), peak_memory_mb (RSS on CPU; allocated and
reserved on GPU), mfu (GPU: model FLOPs of the real tokens, LoRA ~4N per token plus causal attention, over the
GPU's dense bf16 peak), final_loss (mean loss per answer token on a fixed held-out set, after the arm has trained on
the same rows as the others) and the ratios of these to the trl, trl_tuned and naive arms (vs_trl, vs_trl_tuned,
vs_naive).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from weight_bytes import GLM47_FLASH as RELEASED_GLM47_FLASH  # noqa: E402  (benchmarks/ is the script's folder)

ARMS = ("naive", "trl", "trl_tuned", "ours", "ours_qlora")
DEFAULT_ARMS = ("naive", "trl", "trl_tuned", "ours")
REFERENCES = ("trl_tuned", "trl", "naive")  # the ratios of every arm to these
# The bundled samples, then the length-skewed set; --rows (plus the held-out rows) are taken from the front.
DATA = "data/alpaca_zh_demo.json,data/multi_turn.jsonl,data/length_skewed.json"
HELD_OUT_ROWS = 32
RECIPE = "recipes/glm4_lora.yaml"
# Model shapes, over the config of the family's built-in model: tiny is that model's layers (hidden 256, 2 layers)
# with a 6000-token output layer; the others are the released checkpoints' configs.
GLM4_9B = dict(
    hidden_size=4096,
    intermediate_size=13696,
    num_hidden_layers=40,
    num_attention_heads=32,
    num_key_value_heads=2,
    head_dim=128,
    vocab_size=151552,
    attention_bias=True,
)
WIDTH_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "n_routed_experts",
    "n_shared_experts",
    "num_experts_per_tok",
)
# GLM-4.7-Flash's released widths (weight_bytes.py holds its config), on the built-in glm47 model's layers.
GLM47_FLASH = {key: value for key, value in RELEASED_GLM47_FLASH.items() if key in WIDTH_KEYS} | dict(
    qk_head_dim=256, head_dim=64
)
MOE_FAMILIES = ("glm45", "glm47")
MODELS = {
    "tiny": dict(family="glm4", vocab_size=6000),
    "tiny-moe": dict(
        family="glm45",
        vocab_size=6000,
        hidden_size=512,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        n_routed_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=512,
        n_shared_experts=0,
        first_k_dense_replace=0,
    ),
    "glm4-9b": dict(family="glm4", **GLM4_9B),
    # GLM-4.7-Flash's released widths (MLA attention, 64 routed experts, 4 per token, one shared expert, layer 0
    # dense) with 8 of its 47 layers, so that its bf16 weights (10.3 GB) and PEFT's W + B·A fit one 80 GB GPU.
    "glm47-flash": dict(GLM47_FLASH, family="glm47", num_hidden_layers=8, mlp_layer_types=["dense"] + ["sparse"] * 7),
    "chatglm3-6b": dict(GLM4_9B, family="chatglm3", num_hidden_layers=28, vocab_size=65024),  # same layer shape
}
# Dense bf16 peak of the GPUs we report MFU on, in FLOP/s; the longest name the device's name contains wins (an
# "NVIDIA H100 PCIe" is not an H100 SXM).
PEAK_FLOPS = {
    "H100": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "RTX 4090": 165e12,
}
TOKENIZERS = {
    "glm4": "builtin:tiny-glm4",
    "chatglm3": "builtin:tiny-chatglm3",
    "glm45": "builtin:tiny-glm45",
    "glm47": "builtin:tiny-glm47-flash",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"comma list among {', '.join(ARMS)}")
    parser.add_argument("--model", default="tiny", choices=sorted(MODELS), help="model shape (random weights)")
    parser.add_argument("--rows", type=int, default=256, help="training rows each arm consumes (one epoch)")
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=8, help="rows per optimizer step, the same in every arm")
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--gradient_checkpointing", choices=("true", "false"), default="true")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each arm (interleaved); medians reported")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: torch's)")
    parser.add_argument("--kernels", choices=("true", "false"), default="false", help="ours: glm_sft.kernels on a GPU")
    parser.add_argument("--output", help="also write the figures to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one arm and write its figures
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    unknown = [arm for arm in args.arms if arm not in ARMS]
    if unknown or not args.arms:
        parser.error(f"--arms: unknown arm(s) {', '.join(unknown) or '(none)'}; choose among {', '.join(ARMS)}")
    return args


# ----------------------------------------------------------------------------------------------------------- worker


def recipe_argv(args, output_dir: str) -> list[str]:
    """The ours arm's recipe, with the benchmark's shared settings; the other arms take these values too."""
    import torch

    on_gpu = torch.cuda.is_available()
    return [
        "--config", RECIPE,
        "--model_name_or_path", tokenizer_name(args),
        "--dataset_name", DATA,
        "--val_size", str(HELD_OUT_ROWS),
        "--max_samples", str(args.rows + HELD_OUT_ROWS),
        "--max_length", str(args.max_length),
        "--output_dir", output_dir,
        "--per_device_train_batch_size", str(args.batch_size),
        "--gradient_accumulation_steps", "1",
        "--num_train_epochs", "1",
        "--learning_rate", str(args.learning_rate),
        "--activation_checkpointing", args.gradient_checkpointing,
        "--bf16", "true" if on_gpu else "false",
        "--eval_strategy", "no",
        "--save_strategy", "no",
        "--report_to", "none",
        "--logging_steps", "1000000",
        "--sample_count", "0",
        "--dataloader_pin_memory", str(on_gpu).lower(),
        "--disable_tqdm", "true",
        "--kernels", getattr(args, "kernels", "false"),
    ]  # fmt: skip


def build_model(args, dtype=None):
    """A GLM model with random weights in the shape of --model; bf16 on a GPU, fp32 on the CPU (or `dtype`).

    The config starts from the built-in tiny model of the family, so its token ids agree with the tokenizer.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from glm_sft.loading import resolve_model_path

    shape = {key: value for key, value in MODELS[args.model].items() if key != "family"}
    config = AutoConfig.from_pretrained(resolve_model_path(tokenizer_name(args)))
    for key, value in shape.items():
        setattr(config, key, value)
    config.max_position_embeddings = max(config.max_position_embeddings, args.max_length)
    if args.model != "tiny":
        config.initializer_range = 0.02  # the released checkpoints' value
    torch.manual_seed(0)
    # The dtype is passed: from_config takes the config's (float32 in the built-in models), not torch's default.
    if torch.cuda.is_available():
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.bfloat16)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    return model


def tokenizer_name(args) -> str:
    return TOKENIZERS[MODELS[args.model]["family"]]


def moe(args) -> bool:
    return MODELS[args.model]["family"] in MOE_FAMILIES


def peft_moe_config(model_args, model):
    """PEFT's own LoRA on an MoE model (ParamWrapper on the experts) with exactly ours' targets, ranks and alphas."""
    from peft import LoraConfig

    from glm_sft.methods import build_peft_config

    ours = build_peft_config(model_args, model)
    keys = ("r", "lora_alpha", "target_modules", "target_parameters", "rank_pattern", "alpha_pattern", "task_type")
    return LoraConfig(**{key: getattr(ours, key) for key in keys}, lora_dropout=0.0)


def weight_bytes(model) -> tuple[int, int]:
    """(bytes of all parameters and buffers as loaded, bytes of the routed experts' own parameters and buffers)."""
    from glm_sft.experts import routed_experts

    def size(tensors):
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors)

    experts = routed_experts(model)
    expert_bytes = sum(size([*m.parameters(recurse=False), *m.buffers(recurse=False)]) for m in experts)
    return size([*model.parameters(), *model.buffers()]), expert_bytes


class CountingCollator:
    """Wraps a collator; records, batch by batch, the positions, real tokens, trained tokens and row lengths."""

    def __init__(self, collator):
        self.collator, self.batches = collator, []

    def __call__(self, examples):
        batch = self.collator(examples)
        # Real tokens: the rows' own lengths (the naive arm's rows come padded, with their attention_mask).
        rows = [
            int(sum(example["attention_mask"])) if "attention_mask" in example else len(example["input_ids"])
            for example in examples
        ]
        self.batches.append(
            {
                "positions": batch["input_ids"].numel(),
                "real": sum(rows),
                "trained": int((batch["labels"] != -100).sum()),
                "rows": rows,
            }
        )
        return batch


class StepClock:
    """A TrainerCallback that notes the time at the end of every optimizer step."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                clock.synchronize()
                clock.times.append(time.perf_counter())

        self.callback, self.times = Callback(), []

    @staticmethod
    def synchronize():
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


def held_out_loss(model, rows, device) -> float:
    """Mean loss per answer token over the held-out rows, one row at a time (no padding involved)."""
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for row in rows:
            input_ids = torch.tensor([row["input_ids"]], device=device)
            labels = torch.tensor([row["labels"]], device=device)
            logits = model(input_ids=input_ids).logits.float()
            targets = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total += loss.item()
            count += int((targets != -100).sum())
    return total / count


def naive_rows(rows, max_length: int, pad_id: int):
    """Every row padded to max_length, labels on every real token (the tutorials' preprocessing)."""
    out = []
    for row in rows:
        ids = list(row["input_ids"])
        pad = max_length - len(ids)
        out.append(
            {
                "input_ids": ids + [pad_id] * pad,
                "attention_mask": [1] * len(ids) + [0] * pad,
                "labels": ids + [-100] * pad,
            }
        )
    return out


def run_arm(args, work: str) -> dict:
    """Train one arm in this process (output_dir: work) and return its figures."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from glm_sft.arguments import parse_recipe
    from glm_sft.data import read_datasets
    from glm_sft.loading import load_tokenizer
    from glm_sft.methods import build_peft_config
    from glm_sft.run import build_run, tokenized_datasets

    argv = recipe_argv(args, work)
    if moe(args):
        argv += ["--lora_dropout", "0"]  # PEFT's ParamWrapper (the trl_tuned arm) has no dropout: none in any arm
    model = build_model(args)
    device = model.device
    if args.worker in ("ours", "ours_qlora"):
        method = ["--finetuning_type", "qlora"] if args.worker == "ours_qlora" else []
        trainer = build_run(parse_recipe(argv + method), model=model).trainer
        eval_dataset = trainer.eval_dataset
    else:
        from datasets import Dataset

        recipe = parse_recipe(argv)
        model_args, data_args, training_args = recipe.model, recipe.data, recipe.training
        train_rows, eval_rows = read_datasets(data_args, seed=training_args.seed)
        tokenizer, family = load_tokenizer(model_args.model_name_or_path, model_args.template)
        train_dataset, eval_dataset = tokenized_datasets(recipe, tokenizer, family, {}, train_rows, eval_rows)
        common = dict(
            output_dir=work,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1,
            num_train_epochs=1,
            learning_rate=args.learning_rate,
            lr_scheduler_type=training_args.lr_scheduler_type,
            warmup_steps=training_args.warmup_steps,
            seed=training_args.seed,
            bf16=training_args.bf16,
            gradient_checkpointing=training_args.gradient_checkpointing,
            save_strategy="no",
            report_to="none",
            logging_steps=1000000,
            disable_tqdm=True,
            dataloader_pin_memory=training_args.dataloader_pin_memory,
        )
        if args.worker in ("trl", "trl_tuned"):
            from trl import SFTConfig, SFTTrainer

            tuned = {}
            if args.worker == "trl_tuned":
                # TRL's padding-free batches; its docs ask for a flash-attention implementation, which needs CUDA.
                # Elsewhere SDPA, whose mask transformers builds block-causal from the restarting position_ids.
                from transformers.utils import is_flash_attn_2_available

                attention = "flash_attention_2" if device.type == "cuda" and is_flash_attn_2_available() else "sdpa"
                model.set_attn_implementation(attention)
                tuned = dict(padding_free=True, max_length=None)
            # Our rows come cut to max_length; TRL wants max_length=None for padding-free rows without packing.
            trainer = SFTTrainer(
                model=model,
                args=SFTConfig(**{"max_length": args.max_length, **tuned}, **common),
                train_dataset=train_dataset,
                processing_class=tokenizer,
                peft_config=peft_moe_config(model_args, model) if moe(args) else build_peft_config(model_args),
            )
        else:
            from peft import get_peft_model
            from transformers import Trainer, TrainingArguments, default_data_collator

            if training_args.gradient_checkpointing:
                model.enable_input_require_grads()
            padded = Dataset.from_list(naive_rows(train_dataset, args.max_length, tokenizer.pad_token_id))
            trainer = Trainer(
                model=get_peft_model(model, build_peft_config(model_args)),
                args=TrainingArguments(**common),
                train_dataset=padded,
                data_collator=default_data_collator,
            )

    isolation = row_isolation(trainer, device)
    counter, clock = CountingCollator(trainer.data_collator), StepClock()
    trainer.data_collator = counter
    trainer.add_callback(clock.callback)
    if os.environ.get("GLM_SFT_PROFILE"):  # gpu_throughput.py: where the time of a step goes
        trainer.add_callback(profile_callback(os.environ["GLM_SFT_PROFILE"], device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    clock.synchronize()
    start = time.perf_counter()
    trainer.train()
    # Steady state: from the end of the first step (set-up, first-call allocations) to the end of the last; the tokens
    # of steps 2..N. With one batch per step and batches collated in step order, step i trained batch i.
    steps = len(clock.times)
    if steps < 2:
        raise SystemExit(f"only {steps} optimizer step(s): give --rows at least twice --batch_size")
    seconds = clock.times[-1] - clock.times[0]
    measured = counter.batches[1:steps]
    total = {key: sum(batch[key] for batch in measured) for key in ("positions", "real", "trained")}
    figures = {
        "steps": steps,
        "seconds_measured": round(seconds, 3),
        "seconds_with_first_step": round(clock.times[-1] - start, 3),
        "real_tokens": total["real"],
        "trained_tokens": total["trained"],
        "positions": total["positions"],
        "real_tokens_per_s": total["real"] / seconds,
        "trained_tokens_per_s": total["trained"] / seconds,
        "padding_ratio": 1 - total["real"] / total["positions"],
    }
    if device.type == "cuda":
        figures["peak_memory_mb"] = {
            "allocated": torch.cuda.max_memory_allocated() / 2**20,
            "reserved": torch.cuda.max_memory_reserved() / 2**20,
        }
        figures["mfu"] = model_flops_utilization(model, [n for batch in measured for n in batch["rows"]], seconds)
    else:
        import resource

        figures["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    figures["weight_bytes"], figures["expert_weight_bytes"] = weight_bytes(trainer.model)
    figures["final_loss"] = held_out_loss(trainer.model, list(eval_dataset), device)
    figures["isolation"] = isolation
    figures["attention"] = trainer.model.config._attn_implementation
    figures["kernels"] = kernels_in_place(trainer.model)
    return figures


def profile_callback(path: str, device):
    """A TrainerCallback that runs torch.profiler over optimizer steps 2 and 3 and writes its top operators to path."""
    import torch
    from transformers import TrainerCallback

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"

    class Profile(TrainerCallback):
        profiler = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
                self.profiler.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.profiler is not None and state.global_step == 3:
                StepClock.synchronize()
                self.profiler.__exit__(None, None, None)
                table = self.profiler.key_averages().table(sort_by=sort, row_limit=30)
                Path(path).write_text(f"steps 2-3, sorted by {sort}\n{table}\n")
                self.profiler = None

    return Profile()


ISOLATION_ROWS = 4


def row_isolation(trainer, device) -> dict:
    """Do the rows of one collated training batch attend to each other? The first rows of the training set, collated
    as the arm's trainer collates them, run through the model (dropout off) and compared, position by position, with
    each row run alone. A difference beyond float noise means a row saw another."""
    import torch

    model = trainer.model
    examples = [trainer.train_dataset[index] for index in range(min(ISOLATION_ROWS, len(trainer.train_dataset)))]
    batch = trainer.data_collator(examples)
    batch = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    batch.pop("labels", None)
    was_training = model.training
    model.eval()
    worst = 0.0
    with torch.no_grad():
        together = model(**batch).logits.float()
        offset = 0
        for row, example in enumerate(examples):
            ids = example["input_ids"]
            length = int(sum(example["attention_mask"])) if "attention_mask" in example else len(ids)
            alone = model(input_ids=torch.tensor([ids[:length]], device=device)).logits.float()[0]
            if together.shape[0] == 1:  # padding-free: the rows end to end in one sequence
                mine = together[0, offset : offset + length]
                offset += length
            else:
                mine = together[row, :length]
            worst = max(worst, (mine - alone).abs().max().item())
    model.train(was_training)
    tolerance = 1e-3 if together.dtype == torch.float32 and model.dtype == torch.float32 else 5e-2
    return {
        "rows": len(examples),
        "layout": "padding-free (one sequence)" if together.shape[0] == 1 else "padded",
        "max_logit_difference": worst,
        "rows_attend_to_each_other": worst > tolerance,
    }


def kernels_in_place(model) -> list[str]:
    """The names of glm_sft.kernels' replacements found on the model (none on the CPU)."""
    try:
        from glm_sft.kernels import kernels_on_model
    except ImportError:
        return []
    return kernels_on_model(model)


def model_flops_utilization(model, row_lengths, seconds) -> float | None:
    """Model FLOPs of the real tokens per second over the GPU's peak: LoRA trains ~4N per token (forward 2N, backward
    through the frozen weights 2N), plus causal attention 6 * L^2 * width per row and layer (forward 2, backward 4)."""
    import torch

    from glm_sft.experts import routed_experts
    from glm_sft.quantized_experts import packed_weights_uncounted

    name = torch.cuda.get_device_name()
    matches = [key for key in PEAK_FLOPS if key in name]
    if not matches:
        return None
    peak = PEAK_FLOPS[max(matches, key=len)]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    weights = sum(weight_count(p) for n, p in base.named_parameters() if "embed_tokens" not in n and "lora_" not in n)
    # Active parameters: a token goes through top-k of the routed experts (shared experts are plain layers, counted).
    experts = sum(weight_count(p) for module in routed_experts(base) for p in module.parameters(recurse=False))
    experts += packed_weights_uncounted(base)  # 4-bit experts: two weights a byte
    if experts:
        weights -= experts * (1 - config.num_experts_per_tok / config.n_routed_experts)
    # Attention's width: heads x head_dim; with latent attention (MLA) the mean of the query-key and value widths.
    if getattr(config, "qk_nope_head_dim", None):
        head = (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim) / 2
    else:
        head = config.head_dim
    width = config.num_attention_heads * head
    flops = 4 * weights * sum(row_lengths)
    flops += sum(6 * length * length * width * config.num_hidden_layers for length in row_lengths)
    return flops / seconds / peak


def weight_count(parameter) -> int:
    """The weights a parameter stands for: a bitsandbytes 4-bit parameter packs two in a byte (its quant_state keeps
    the shape)."""
    import math

    state = getattr(parameter, "quant_state", None)
    return math.prod(state.shape) if state is not None else parameter.numel()


# ----------------------------------------------------------------------------------------------------------- parent


def run_all(args) -> dict:
    runs, failed = {arm: [] for arm in args.arms}, {}
    script = Path(__file__).resolve()
    passthrough = [
        "--model", args.model, "--rows", str(args.rows), "--max_length", str(args.max_length),
        "--batch_size", str(args.batch_size), "--learning_rate", str(args.learning_rate),
        "--gradient_checkpointing", args.gradient_checkpointing, "--kernels", args.kernels,
    ] + (["--threads", str(args.threads)] if args.threads else [])  # fmt: skip
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}
    for repeat in range(args.repeats):
        order = args.arms[repeat % len(args.arms) :] + args.arms[: repeat % len(args.arms)]
        for arm in order:
            with tempfile.NamedTemporaryFile(suffix=".json") as result:
                print(f"[{repeat + 1}/{args.repeats}] {arm} ...", file=sys.stderr, flush=True)
                command = [sys.executable, str(script), "--worker", arm, "--result", result.name, *passthrough]
                done = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True)
                if done.returncode != 0:  # e.g. out of GPU memory: reported, and the other arms go on
                    sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
                    last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
                    print(f"arm {arm} failed (exit code {done.returncode}): {last}", file=sys.stderr)
                    failed[arm] = last
                    continue
                runs[arm].append(json.loads(Path(result.name).read_text()))
    if not any(runs.values()):
        raise SystemExit("every arm failed; their output is above")
    return summarize(args, runs, failed)


def summarize(args, runs, failed=None) -> dict:
    import torch

    arms = {}
    for arm, results in runs.items():
        if not results:
            arms[arm] = {"error": (failed or {}).get(arm, "no run")}
            continue
        figures = {}
        for key in results[0]:
            values = [result[key] for result in results]
            if isinstance(values[0], dict):  # medians of the numbers; the rest (layout, flags) as in the first run
                figures[key] = {k: _median([v[k] for v in values]) for k in values[0]}
            else:
                figures[key] = _median(values)
        figures["runs"] = results
        arms[arm] = figures
    for name in REFERENCES:  # ratios of every arm against each reference arm
        if "real_tokens_per_s" not in arms.get(name, {}):
            continue
        reference = arms[name]
        for figures in arms.values():
            if "error" in figures:
                continue
            figures[f"vs_{name}"] = {
                "real_tokens_per_s": figures["real_tokens_per_s"] / reference["real_tokens_per_s"],
                "trained_tokens_per_s": figures["trained_tokens_per_s"] / reference["trained_tokens_per_s"],
                "final_loss": figures["final_loss"] / reference["final_loss"] - 1,
            }
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    settings = {key: getattr(args, key) for key in ("model", "rows", "max_length", "batch_size", "repeats")}
    settings["gradient_checkpointing"] = args.gradient_checkpointing == "true"
    settings["kernels"] = args.kernels == "true"
    return {"device": device, "settings": settings, "arms": arms}


def _median(values):
    numbers = all(isinstance(value, int | float) and not isinstance(value, bool) for value in values)
    return statistics.median(values) if numbers else values[0]


def table(report) -> str:
    arms = report["arms"]
    lines = [
        f"device: {report['device']}; settings: {json.dumps(report['settings'])}",
        f"{'arm':<10} {'real tok/s':>11} {'trained tok/s':>14} {'padding':>8} {'peak MB':>16} {'mfu':>6} "
        f"{'final loss':>11} {'vs trl_tuned':>13} {'vs trl':>7} {'vs naive':>9} {'loss vs tuned':>14} {'isolated':>9} "
        f"{'weights MB':>11} {'experts MB':>11}",
    ]
    for arm, figures in arms.items():
        if "error" in figures:
            lines.append(f"{arm:<10} failed: {figures['error']}")
            continue
        memory = figures["peak_memory_mb"]
        memory = f"{memory['allocated']:.0f}/{memory['reserved']:.0f}" if isinstance(memory, dict) else f"{memory:.0f}"
        mfu = f"{figures['mfu']:.1%}" if figures.get("mfu") is not None else "-"
        speeds = [
            f"{figures[f'vs_{name}']['real_tokens_per_s']:.2f}x" if f"vs_{name}" in figures else "-"
            for name in REFERENCES
        ]
        tuned = figures.get("vs_trl_tuned")
        loss = f"{tuned['final_loss']:+.2%}" if tuned else "-"
        isolation = figures.get("isolation") or {}
        isolated = {True: "no", False: "yes"}.get(isolation.get("rows_attend_to_each_other"), "-")
        lines.append(
            f"{arm:<10} {figures['real_tokens_per_s']:>11.0f} {figures['trained_tokens_per_s']:>14.0f} "
            f"{figures['padding_ratio']:>8.1%} {memory:>16} {mfu:>6} {figures['final_loss']:>11.4f} {speeds[0]:>13} "
            f"{speeds[1]:>7} {speeds[2]:>9} {loss:>14} {isolated:>9} {figures['weight_bytes'] / 2**20:>11.1f} "
            f"{figures['expert_weight_bytes'] / 2**20:>11.1f}"
        )
    ours = arms.get("ours", {})
    if "error" not in ours:
        versus = [
            f"{ours[f'vs_{name}']['real_tokens_per_s']:.2f}x {name}" for name in REFERENCES if f"vs_{name}" in ours
        ]
        if versus:
            lines.append(f"ours: real tokens/s {', '.join(versus)}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        with tempfile.TemporaryDirectory(prefix=f"bench-{args.worker}-") as work:
            Path(args.result).write_text(json.dumps(run_arm(args, work)))
        return
    report = run_all(args)
    print(table(report))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
