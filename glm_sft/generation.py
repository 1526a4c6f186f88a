"""Batched greedy replies for conversations, and predictions scored against references (evaluate.py, do_predict).

Prompts are rendered with the tokenizer's chat template and the generation prompt, exactly as chat_cli.py does,
then left-padded into batches; replies stop at the family's end-of-turn tokens.
"""

import json
import sys
from pathlib import Path

from glm_sft.metrics import score_replies


def prompt_and_reference(row: dict) -> tuple[dict, str]:
    """A conversation cut before its last assistant turn (the prompt, with the row's tools) and that turn's text."""
    messages = row["messages"]
    last = max(index for index, message in enumerate(messages) if message["role"] == "assistant")
    prompt = {"messages": messages[:last]}
    if row.get("tools"):
        prompt["tools"] = row["tools"]
    reply = messages[last]
    reference = reply.get("content") or ""
    if not reference and reply.get("tool_calls"):
        reference = json.dumps([call.get("function", call) for call in reply["tool_calls"]], ensure_ascii=False)
    return prompt, reference


def render_prompt(tokenizer, prompt: dict) -> list[int]:
    return tokenizer.apply_chat_template(
        prompt["messages"], tools=prompt.get("tools"), add_generation_prompt=True, tokenize=True, return_dict=False
    )


def generate_replies(
    model,
    tokenizer,
    prompts: list[dict],
    *,
    stop_ids,
    max_new_tokens: int,
    batch_size: int = 8,
    synced_gpus: bool = False,
    progress: bool = False,
) -> list[str]:
    """Greedy replies to `prompts` ({"messages", optional "tools"}), `batch_size` at a time, left-padded.

    synced_gpus: every process of a sharded model (DeepSpeed ZeRO-3, FSDP) calls this with the same prompts, and
    each keeps running forward passes until all are done, as the parameters are gathered collectively.
    """
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    context = getattr(model.config, "max_position_embeddings", None) or 4096
    budget = max(context - max_new_tokens, 1)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    replies = []
    batches = range(0, len(prompts), max(batch_size, 1))
    for start in tqdm(batches, desc="generating", unit="batch", disable=not progress, file=sys.stderr):
        encoded = [render_prompt(tokenizer, prompt)[-budget:] for prompt in prompts[start : start + batch_size]]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in encoded], device=device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
        with torch.no_grad():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=list(stop_ids),
                pad_token_id=pad_id,
                use_cache=True,  # training may have turned the cache off for gradient checkpointing
                synced_gpus=synced_gpus,
            )
        for row in output[:, width:].tolist():
            replies.append(tokenizer.decode(cut_at_stop(row, stop_ids), skip_special_tokens=True).strip())
    return replies


def cut_at_stop(ids: list[int], stop_ids) -> list[int]:
    """The generated ids before the first end-of-turn token (what follows is padding)."""
    stops = set(stop_ids)
    for index, token in enumerate(ids):
        if token in stops:
            return ids[:index]
    return ids


def predict(
    model,
    tokenizer,
    rows: list[dict],
    output_dir,
    *,
    stop_ids,
    max_new_tokens: int,
    batch_size: int = 8,
    synced_gpus: bool = False,
    write: bool = True,
) -> dict:
    """Replies for each row's last assistant turn, scored against it; writes predictions.jsonl and metrics.json.

    Returns the metrics (see glm_sft.metrics.score_replies). With write False (the other processes of a sharded
    run) nothing is written and nothing is shown.
    """
    pairs = [prompt_and_reference(row) for row in rows]
    prompts = [prompt for prompt, _ in pairs]
    references = [reference for _, reference in pairs]
    replies = generate_replies(
        model,
        tokenizer,
        prompts,
        stop_ids=stop_ids,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        synced_gpus=synced_gpus,
        progress=write,
    )
    metrics = score_replies(replies, references)
    if write:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        with open(output_dir / "predictions.jsonl", "w", encoding="utf-8") as file:
            for row, prompt, reference, reply in zip(rows, prompts, references, replies, strict=True):
                record = {"prompt": prompt["messages"], "reference": reference, "reply": reply}
                if row.get("source"):
                    record["source"] = row["source"]
                file.write(json.dumps(record, ensure_ascii=False) + "\n")
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics


def is_sharded(trainer) -> bool:
    """Whether the parameters are spread over the processes, so that every one must take part in generation."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled() or bool(getattr(trainer, "is_fsdp_enabled", False))


def predict_after_training(trainer, rows: list[dict], output_dir, *, stop_ids, max_new_tokens: int) -> dict | None:
    """do_predict: predict() with the trained model, batched by per_device_eval_batch_size. With a sharded model
    every process takes part; otherwise only the main one generates. The main process writes and gets the metrics."""
    is_main = trainer.is_world_process_zero()
    sharded = is_sharded(trainer)
    if not (is_main or sharded):
        return None
    trainer.model.eval()
    return predict(
        trainer.model,
        trainer.processing_class,
        rows,
        output_dir,
        stop_ids=stop_ids,
        max_new_tokens=max_new_tokens,
        batch_size=trainer.args.per_device_eval_batch_size,
        synced_gpus=sharded and trainer.args.world_size > 1,
        write=is_main,
    )
