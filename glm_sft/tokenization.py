"""From conversations to what the trainer sees: token ids and labels, tokenized once per machine, truncation counted.

Labels hold the token id for exactly what the model generates after each `<|assistant|>`: the metadata line, the
content and the token that ends the turn (the next message's role token, or the family's end token after the last
message). A tool call is trained the same way, up to the `<|observation|>` that ends it; tool definitions and results
are not. Everything else is IGNORE_INDEX. The spans come from the `{% generation %}` marks of our training-ready
templates, through transformers' own `apply_chat_template(..., return_assistant_tokens_mask=True)`.
"""

import json
import sys

from glm_sft import UserError
from glm_sft.template import IGNORE_INDEX


def encode_conversation(
    tokenizer,
    messages: list[dict],
    *,
    tools: list[dict] | None = None,
    max_length: int | None = None,
    last_turn_only: bool = False,
) -> dict:
    """{"input_ids", "labels", "truncated"} for one conversation (see the module's docstring for the labels).

    The final assistant turn is closed by its end token (`close_final_turn`). With `last_turn_only`, only the final
    assistant turn is trained.
    """
    encoding = tokenizer.apply_chat_template(
        messages,
        tools=tools or None,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        close_final_turn=True,
    )
    input_ids, mask = list(encoding["input_ids"]), encoding["assistant_masks"]
    labels = [token if trained else IGNORE_INDEX for token, trained in zip(input_ids, mask, strict=True)]
    if last_turn_only:
        labels = _last_span_only(labels)
    truncated = max_length is not None and len(input_ids) > max_length
    if truncated:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels, "truncated": truncated}


def _last_span_only(labels: list[int]) -> list[int]:
    """The labels with every trained span but the last one set to IGNORE_INDEX."""
    end = len(labels)
    while end and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    start = end
    while start and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return [IGNORE_INDEX] * start + labels[start:end] + [IGNORE_INDEX] * (len(labels) - end)


def tokenize_dataset(
    rows: list[dict],
    tokenizer,
    *,
    name: str,
    max_length: int | None,
    last_turn_only: bool = False,
    num_proc: int | None = None,
    training_args=None,
):
    """A datasets.Dataset with input_ids, labels and source; rows left without a trained token are dropped.

    Under a launch with several processes (`training_args.world_size > 1`) the main process of each machine
    tokenizes and writes the result to datasets' cache file under GLM_SFT_CACHE, named by a fingerprint of the rows,
    the tokenizer and the settings; the other processes then load that file (`main_process_first`). Only the main
    process prints the report.
    """
    import contextlib

    from datasets import Dataset

    def encode(row):
        conversation = json.loads(row["conversation"])
        return encode_conversation(
            tokenizer,
            conversation["messages"],
            tools=conversation.get("tools"),
            max_length=max_length,
            last_turn_only=last_turn_only,
        )

    # As JSON text: Arrow would merge the shapes of every row's tools and arguments into one schema.
    conversations = [
        {
            "conversation": json.dumps(
                {key: row[key] for key in ("messages", "tools") if key in row}, ensure_ascii=False
            ),
            "source": row.get("source", ""),
        }
        for row in rows
    ]
    launched = training_args is not None and training_args.world_size > 1
    cache, first = {}, contextlib.nullcontext()
    if launched:
        settings = {"name": name, "max_length": max_length, "last_turn_only": last_turn_only}
        cache = {"cache_file_name": str(_cache_file(rows, tokenizer, settings))}
        first = training_args.main_process_first(local=True, desc=f"tokenizing {name} rows")
    is_main = not launched or training_args.process_index == 0
    with first:
        dataset = Dataset.from_list(conversations).map(
            encode,
            remove_columns=["conversation"],
            num_proc=num_proc,
            desc=f"Tokenizing {name} rows",
            **cache,
        )
    truncated = sum(dataset["truncated"])
    trained = [any(label != IGNORE_INDEX for label in labels) for labels in dataset["labels"]]
    dropped = len(trained) - sum(trained)
    dataset = dataset.select([index for index, keep in enumerate(trained) if keep]).remove_columns("truncated")
    if is_main:
        report = f"{name}: {len(dataset)} rows used, {truncated} truncated to max_length={max_length}"
        if dropped:
            report += f", {dropped} dropped because truncation left no trained token (raise max_length)"
        print(report, file=sys.stderr)
    if len(dataset) == 0:
        raise UserError(f"no {name} rows left to train on; raise max_length (now {max_length})")
    return dataset


def _cache_file(rows: list[dict], tokenizer, settings: dict):
    """Where datasets keeps the tokens of these rows: a name that only the same rows, tokenizer and settings give."""
    from datasets.fingerprint import Hasher

    from glm_sft.builtin import cache_root

    hasher = Hasher()
    hasher.update(rows)
    hasher.update(tokenizer)
    hasher.update(settings)
    folder = cache_root() / "tokenized"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{settings['name']}-{hasher.hexdigest()}.arrow"
