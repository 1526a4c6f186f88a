"""From conversations to what the trainer sees: token ids and labels, tokenized once per machine, truncation counted.

Labels hold the token id for exactly what the model generates after each `<|assistant|>`: the metadata line, the
content and the token that ends the turn (the next message's role token, or the family's end token after the last
message). A tool call is trained the same way, up to the `<|observation|>` that ends it; tool definitions and results
are not. Everything else is IGNORE_INDEX. The spans come from the `{% generation %}` marks of our training-ready
templates (transformers' `render_jinja_template`).

Message text is tokenized as text: a special token's spelling inside content, metadata, tools or arguments (`sop`,
`</s>` in a ChatGLM3 reply) gives the pieces of that text, as ChatGLM3's own message builder encodes it, never the
control token; only the control tokens the template writes itself are encoded as special tokens.
"""

import json
import re
import sys
from functools import cache

from glm_sft import UserError
from glm_sft.template import IGNORE_INDEX

TRUNCATED_ROWS_SHOWN = 3  # the report names the first few truncated rows (file:line and full length)


def encode_conversation(
    tokenizer,
    messages: list[dict],
    *,
    tools: list[dict] | None = None,
    max_length: int | None = None,
    last_turn_only: bool = False,
    template_kwargs: dict | None = None,
) -> dict:
    """{"input_ids", "labels", "truncated", "length"} for one conversation (see the module's docstring for the labels);
    `length` counts the tokens before truncation.

    The final assistant turn is closed by its end token (`close_final_turn`). With `last_turn_only`, only the final
    assistant turn is trained. Truncation to `max_length` keeps the start: a reply cut short is trained on the tokens
    that remain, without its end token (the model is not taught to stop where the cut fell).
    """
    input_ids, mask = encode_chat(tokenizer, messages, tools=tools, template_kwargs=template_kwargs)
    labels = [token if trained else IGNORE_INDEX for token, trained in zip(input_ids, mask, strict=True)]
    if last_turn_only:
        labels = _last_span_only(labels)
    length = len(input_ids)
    truncated = max_length is not None and length > max_length
    if truncated:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels, "truncated": truncated, "length": length}


# Private-use characters around a control token's spelling in the data, so that it is told apart from the control
# tokens the template writes (the same idea as transformers' `sanitize_control_tokens`, which cannot give the assistant
# mask, and which encodes each marked token apart from the text around it).
_TEXT_START, _TEXT_END = "\U000f0000", "\U000f0001"


def encode_chat(
    tokenizer,
    messages: list[dict],
    *,
    tools: list[dict] | None = None,
    add_generation_prompt: bool = False,
    close_final_turn: bool = True,
    template_kwargs: dict | None = None,
) -> tuple[list[int], list[int]]:
    """(ids, assistant mask) of a conversation as the template renders it (by default with the final turn closed);
    the mask is 1 on the tokens of the template's `{% generation %}` spans. Control tokens are those the template
    writes; the same spellings in the conversation's strings are encoded as text. `template_kwargs` are the
    template's own switches (`enable_thinking`), as apply_chat_template passes them. Needs a fast tokenizer."""
    from transformers.utils.chat_template_utils import render_jinja_template

    spellings = _control_spellings(tokenizer)
    # As apply_chat_template does: keys whose value is None are left out (`"content": null` beside tool calls).
    marked = _mark(
        [{key: value for key, value in message.items() if value is not None} for message in messages], spellings
    )
    rendered, spans = render_jinja_template(
        conversations=[marked],
        tools=_mark(tools, spellings) if tools else None,
        chat_template=tokenizer.chat_template,
        return_assistant_tokens_mask=True,
        add_generation_prompt=add_generation_prompt,
        close_final_turn=close_final_turn,
        **tokenizer.special_tokens_map,
        **(template_kwargs or {}),
    )
    text, spans = rendered[0], spans[0]
    # Pieces between the template's own control tokens; each is encoded alone, as the tokenizer would split it.
    pieces, controls, position = [], [], 0
    for match in _control_pattern(spellings).finditer(text):
        if match.group("control") is None:  # a marked spelling: text
            continue
        pieces.append((position, match.start()))
        controls.append((match.start(), tokenizer.convert_tokens_to_ids(match.group("control"))))
        position = match.end()
    pieces.append((position, len(text)))
    ids, starts = [], []  # token ids, and where each token starts in `text`
    segments = [_unmarked(text, start, end) for start, end in pieces]
    encodings = _encode_as_text(tokenizer, [segment for segment, _ in segments])
    for index, ((_, origins), encoding) in enumerate(zip(segments, encodings, strict=True)):
        ids += encoding.ids
        starts += [origins[min(begin, len(origins) - 1)] for begin, _ in encoding.offsets]
        if index < len(controls):
            ids.append(controls[index][1])
            starts.append(controls[index][0])
    mask = [int(any(start <= char < end for start, end in spans)) for char in starts]
    return ids, mask


def _control_spellings(tokenizer) -> tuple[str, ...]:
    return tuple(sorted(tokenizer.added_tokens_encoder, key=len, reverse=True))


@cache
def _control_pattern(spellings: tuple[str, ...]) -> re.Pattern:
    alternatives = "|".join(map(re.escape, spellings)) or "(?!)"
    marked = f"{_TEXT_START}(?:{alternatives}){_TEXT_END}"
    return re.compile(f"{marked}|(?P<control>{alternatives})")


@cache
def _spelling_pattern(spellings: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(map(re.escape, spellings)))


def _mark(value, spellings: tuple[str, ...]):
    """`value` (messages, tools) with every control-token spelling in its strings and keys wrapped in the markers."""
    if isinstance(value, str):
        if not any(spelling in value for spelling in spellings):
            return value
        return _spelling_pattern(spellings).sub(lambda match: _TEXT_START + match.group(0) + _TEXT_END, value)
    if isinstance(value, dict):
        return {_mark(key, spellings): _mark(item, spellings) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_mark(item, spellings) for item in value]
    return value


def _unmarked(text: str, start: int, end: int) -> tuple[str, list[int]]:
    """text[start:end] without the markers, and for each of its characters (and its end) where it is in `text`."""
    kept = [index for index in range(start, end) if text[index] not in (_TEXT_START, _TEXT_END)]
    return "".join(text[index] for index in kept), [*kept, end]


def _encode_as_text(tokenizer, texts: list[str]):
    """The tokenizers encodings of `texts`, no added token matched (the control tokens are between the texts)."""
    backend = tokenizer.backend_tokenizer
    before = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        return backend.encode_batch(texts, add_special_tokens=False)
    finally:
        backend.encode_special_tokens = before


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
    truncated = [
        f"{source} ({length} tokens)"
        for source, length, cut in zip(dataset["source"], dataset["length"], dataset["truncated"], strict=True)
        if cut
    ]
    trained = [any(label != IGNORE_INDEX for label in labels) for labels in dataset["labels"]]
    dropped = len(trained) - sum(trained)
    dataset = dataset.select([index for index, keep in enumerate(trained) if keep])
    dataset = dataset.remove_columns(["truncated", "length"])
    if is_main:
        report = f"{name}: {len(dataset)} rows used, {len(truncated)} truncated to max_length={max_length}"
        if truncated:
            shown = ", ".join(truncated[:TRUNCATED_ROWS_SHOWN])
            more = len(truncated) - TRUNCATED_ROWS_SHOWN
            report += f" ({shown}{f' and {more} more' if more > 0 else ''})"
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
