"""Predictions scored against references (evaluate.py, do_predict): each row's last assistant turn is the reference,
the conversation before it the prompt; replies are greedy, batched by glm_sft.inference.generate_replies.
"""

import json
from pathlib import Path

from glm_sft.inference import generate_replies
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
    family: str | None = None,
    template_kwargs: dict | None = None,
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
        family=family,  # a thinking family is scored on its answers, the reasoning left out
        template_kwargs=template_kwargs,
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


def generation_sync(trainer, is_main: bool) -> bool | None:
    """Which processes generate with trainer.model: None when this one sits out, else generate_replies' synced_gpus.

    With the parameters spread over the processes (DeepSpeed ZeRO-3, FSDP) every process takes part, in step when
    there are several, as the parameters are gathered collectively; otherwise only the main process generates.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    sharded = is_deepspeed_zero3_enabled() or bool(getattr(trainer, "is_fsdp_enabled", False))
    if not (sharded or is_main):
        return None
    return sharded and trainer.args.world_size > 1


def predict_after_training(
    trainer,
    rows: list[dict],
    output_dir,
    *,
    stop_ids,
    max_new_tokens: int,
    family: str | None = None,
    template_kwargs: dict | None = None,
) -> dict | None:
    """do_predict: predict() with the trained model, batched by per_device_eval_batch_size. With a sharded model
    every process takes part; otherwise only the main one generates. The main process writes and gets the metrics."""
    is_main = trainer.is_world_process_zero()
    synced_gpus = generation_sync(trainer, is_main)
    if synced_gpus is None:
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
        synced_gpus=synced_gpus,
        write=is_main,
        family=family,
        template_kwargs=template_kwargs,
    )
