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

ROWS_SHOWN = 3  # reports and errors name the first few rows (file:line), then how many more
ENCODE_BATCH_ROWS = 1000  # rows whose text pieces go to the tokenizer in one batch


TRUNCATION_MODES = ("keep_start", "keep_end")


def check_truncation_mode(mode: str) -> None:
    if mode not in TRUNCATION_MODES:
        raise UserError(
            f"truncation_mode {mode!r} is unknown; use keep_start (cut the end of a long row) or keep_end (drop its "
            "earliest rounds, keeping the system prompt and tools)"
        )


def encode_conversation(
    tokenizer,
    messages: list[dict],
    *,
    tools: list[dict] | None = None,
    max_length: int | None = None,
    last_turn_only: bool = False,
    template_kwargs: dict | None = None,
    truncation_mode: str = "keep_start",
) -> dict:
    """{"input_ids", "labels", "truncated", "length"} for one conversation (see the module's docstring for the labels);
    `length` counts the tokens before truncation.

    The final assistant turn is closed by its end token (`close_final_turn`). With `last_turn_only`, only the final
    assistant turn is trained. Truncation to `max_length`:
    - keep_start (the default) keeps the start: a reply cut short is trained on the tokens that remain, without its
      end token (the model is not taught to stop where the cut fell);
    - keep_end drops whole rounds (a user message and what follows it up to the next one) from the start, keeping the
      system messages and the tools, until the rest fits; the conversation left is rendered and trained as if it were
      the whole row. When even the last round does not fit, it is cut as keep_start cuts it.
    """
    return encode_conversations(
        tokenizer,
        [(messages, tools)],
        max_length=max_length,
        last_turn_only=last_turn_only,
        template_kwargs=template_kwargs,
        truncation_mode=truncation_mode,
    )[0]


def encode_conversations(
    tokenizer,
    conversations: list[tuple[list[dict], list[dict] | None]],
    *,
    max_length: int | None = None,
    last_turn_only: bool = False,
    template_kwargs: dict | None = None,
    truncation_mode: str = "keep_start",
) -> list[dict]:
    """encode_conversation for many (messages, tools) pairs at once: their text pieces go to the tokenizer in one
    batch (the tokenizers library encodes a batch on all cores)."""
    check_truncation_mode(truncation_mode)
    encoded = _encode_chats(tokenizer, conversations, template_kwargs=template_kwargs)
    results = []
    for (messages, tools), (input_ids, mask) in zip(conversations, encoded, strict=True):
        length = len(input_ids)
        truncated = max_length is not None and length > max_length
        if truncated and truncation_mode == "keep_end":
            rounds = _last_rounds(tokenizer, messages, tools, max_length, template_kwargs)
            if rounds is not None:
                input_ids, mask = rounds
        labels = [token if trained else IGNORE_INDEX for token, trained in zip(input_ids, mask, strict=True)]
        if last_turn_only:
            labels = _last_span_only(labels)
        if truncated:
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        results.append({"input_ids": input_ids, "labels": labels, "truncated": truncated, "length": length})
    return results


def _last_rounds(tokenizer, messages: list[dict], tools, max_length: int, template_kwargs):
    """(ids, mask) of the leading system messages and the most last rounds that fit in max_length (the last round
    alone when none fits); None when there is no earlier round to drop."""
    head = next((index for index, message in enumerate(messages) if message["role"] != "system"), len(messages))
    starts = [index for index in range(head + 1, len(messages)) if messages[index]["role"] == "user"]
    if not starts:
        return None

    def encoded(start: int):
        return _encode_chats(
            tokenizer, [(messages[:head] + messages[start:], tools)], template_kwargs=template_kwargs
        )[0]

    # Fewer rounds, fewer tokens: the earliest start that fits, found by bisection over the round starts.
    low, high, best = 0, len(starts) - 1, None
    while low <= high:
        middle = (low + high) // 2
        candidate = encoded(starts[middle])
        if len(candidate[0]) <= max_length:
            best, high = candidate, middle - 1
        else:
            low = middle + 1
    return best or encoded(starts[-1])


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
    return _encode_chats(
        tokenizer,
        [(messages, tools)],
        add_generation_prompt=add_generation_prompt,
        close_final_turn=close_final_turn,
        template_kwargs=template_kwargs,
    )[0]


def _encode_chats(
    tokenizer,
    conversations,
    *,
    add_generation_prompt: bool = False,
    close_final_turn: bool = True,
    template_kwargs: dict | None = None,
) -> list[tuple[list[int], list[int]]]:
    """encode_chat of each (messages, tools) pair: each rendered and cut at the template's control tokens, then the
    text pieces of all of them encoded in one batch."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from glm_sft.template import family_messages, family_of_template

    family = family_of_template(tokenizer.chat_template)  # e.g. GLM-4-0414 / GLM-Z1 read tool rows in the native form
    spellings = _control_spellings(tokenizer)
    pattern, spelling = _control_pattern(spellings), _spelling_pattern(spellings)
    control_ids = _control_ids(tokenizer, spellings)
    switches = {**tokenizer.special_tokens_map, **(template_kwargs or {})}
    layouts, texts = [], []  # per conversation: (its text pieces, its control tokens, its spans); all text pieces
    for messages, tools in conversations:
        # As apply_chat_template does: keys whose value is None are left out (`"content": null` beside tool calls).
        messages = family_messages(
            [{key: value for key, value in message.items() if value is not None} for message in messages], family
        )
        marked = _mark(messages, spelling)
        rendered, spans = render_jinja_template(
            conversations=[marked],
            tools=_mark(tools, spelling) if tools else None,
            chat_template=tokenizer.chat_template,
            return_assistant_tokens_mask=True,
            add_generation_prompt=add_generation_prompt,
            close_final_turn=close_final_turn,
            **switches,
        )
        text = rendered[0]
        # Pieces between the template's own control tokens; each is encoded alone, as the tokenizer would split it.
        pieces, controls, position = [], [], 0
        has_marks = _TEXT_START in text
        for match in pattern.finditer(text):
            control = match.group("control")
            if control is None:  # a marked spelling: text
                continue
            pieces.append(_piece(text, position, match.start(), texts, has_marks))
            controls.append((match.start(), control_ids[control]))
            position = match.end()
        pieces.append(_piece(text, position, len(text), texts, has_marks))
        layouts.append((pieces, controls, sorted(spans[0])))
    encodings = iter(_encode_as_text(tokenizer, texts))
    results = []
    for pieces, controls, spans in layouts:
        ids, mask = [], []
        for index, (start, end, origins) in enumerate(pieces):
            encoding = next(encodings)
            piece_ids = encoding.ids
            ids += piece_ids
            # A token is trained when its first character is in a span: a piece wholly inside one span or outside
            # all of them needs no offsets; only a piece a span starts or ends in is looked at token by token.
            inside = _span_cover(start, end, spans)
            if inside is not None:
                mask += [inside] * len(piece_ids)
            else:
                if origins is None:  # an unmarked piece: text[start:end] itself
                    starts = [start + begin for begin, _ in encoding.offsets]
                else:
                    starts = [origins[min(begin, len(origins) - 1)] for begin, _ in encoding.offsets]
                mask += _in_spans(starts, spans)
            if index < len(controls):
                position, control_id = controls[index]
                ids.append(control_id)
                mask += _in_spans([position], spans)
        results.append((ids, mask))
    return results


def _piece(text: str, start: int, end: int, texts: list[str], has_marks: bool):
    """Append text[start:end] (without markers) to `texts`; (start, end, origins): origins None when the piece holds
    no marker, else, for each of its characters (and its end), where it is in `text`."""
    if not has_marks or (_TEXT_START not in text[start:end] and _TEXT_END not in text[start:end]):
        texts.append(text[start:end])
        return start, end, None
    segment, origins = _unmarked(text, start, end)
    texts.append(segment)
    return start, end, origins


def _span_cover(start: int, end: int, spans: list[tuple[int, int]]) -> int | None:
    """1 when [start, end) lies inside one span, 0 when it meets none, None when a span starts or ends inside it."""
    for span_start, span_end in spans:
        if span_start <= start and end <= span_end:
            return 1
        if span_start < end and start < span_end:
            return None
    return 0


def _in_spans(starts: list[int], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each character position in `starts` that lies in one of the sorted, disjoint [start, end) spans."""
    import numpy

    if not spans:
        return [0] * len(starts)
    bounds = numpy.asarray(spans)
    positions = numpy.asarray(starts)
    span = numpy.searchsorted(bounds[:, 0], positions, side="right") - 1
    inside = (span >= 0) & (positions < bounds[numpy.maximum(span, 0), 1])
    return inside.astype(int).tolist()


def _control_spellings(tokenizer) -> tuple[str, ...]:
    return tuple(sorted(tokenizer.added_tokens_encoder, key=len, reverse=True))


def _control_ids(tokenizer, spellings: tuple[str, ...]) -> dict[str, int]:
    return dict(zip(spellings, tokenizer.convert_tokens_to_ids(list(spellings)), strict=True))


@cache
def _control_pattern(spellings: tuple[str, ...]) -> re.Pattern:
    alternatives = "|".join(map(re.escape, spellings)) or "(?!)"
    marked = f"{_TEXT_START}(?:{alternatives}){_TEXT_END}"
    return re.compile(f"{marked}|(?P<control>{alternatives})")


@cache
def _spelling_pattern(spellings: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(map(re.escape, spellings)) or "(?!)")


def _mark(value, spelling: re.Pattern):
    """`value` (messages, tools) with every control-token spelling (`spelling`: _spelling_pattern) in its strings and
    keys wrapped in the markers."""
    if isinstance(value, str):
        if spelling.search(value) is None:
            return value
        return spelling.sub(lambda match: _TEXT_START + match.group(0) + _TEXT_END, value)
    if isinstance(value, dict):
        return {_mark(key, spelling): _mark(item, spelling) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_mark(item, spelling) for item in value]
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
    template_kwargs: dict | None = None,
    truncation_mode: str = "keep_start",
):
    """A datasets.Dataset with input_ids, labels and source; rows left without a trained token are dropped.

    Without a launch, the rows are encoded in batches straight from memory (the text pieces of a batch go to the
    tokenizer at once, which encodes them on all cores), each batch becomes Arrow columns at once, and the dataset is
    built once from them. With num_proc > 1 the batches are encoded in num_proc forked processes, which inherit the
    rows (nothing is pickled to them) and send back each batch's Arrow columns.

    Under a launch with several processes (`training_args.world_size > 1`) the main process of each machine
    tokenizes with datasets' map and writes the result to datasets' cache file under GLM_SFT_CACHE, named by a
    fingerprint of the rows, the tokenizer and the settings; the other processes then load that file
    (`main_process_first`). Only the main process prints the report.
    """
    check_truncation_mode(truncation_mode)
    settings = dict(max_length=max_length, last_turn_only=last_turn_only, template_kwargs=template_kwargs)
    if truncation_mode != "keep_start":
        settings["truncation_mode"] = truncation_mode
    launched = training_args is not None and training_args.world_size > 1
    if launched:
        dataset, truncated, dropped = _tokenize_launched(rows, tokenizer, name, settings, num_proc, training_args)
    else:
        dataset, truncated, dropped = _tokenize_in_memory(rows, tokenizer, settings, num_proc or 1)
    if not launched or training_args.process_index == 0:
        report = f"{name}: {len(dataset)} rows used, {len(truncated)} truncated to max_length={max_length}"
        if truncated:
            report += f" ({first_rows(truncated)})"
        if truncated and truncation_mode == "keep_end":
            report += ", earliest rounds dropped (truncation_mode keep_end)"
        if dropped:
            report += f", {dropped} dropped because truncation left no trained token (raise max_length)"
        print(report, file=sys.stderr)
    if len(dataset) == 0:
        raise UserError(f"no {name} rows left to train on; raise max_length (now {max_length})")
    return dataset


# What the forked encoding processes inherit: (rows, tokenizer, settings), set only while they run.
_FORKED = None


def _tokenize_in_memory(rows, tokenizer, settings: dict, num_proc: int):
    """(dataset, the truncated rows' "source (length tokens)", how many rows were dropped), encoded a batch at a time
    in this process or in num_proc forked ones."""
    import multiprocessing
    import os

    import pyarrow
    from datasets import Dataset
    from datasets.fingerprint import generate_random_fingerprint
    from datasets.table import InMemoryTable

    global _FORKED
    bounds = [(begin, min(begin + ENCODE_BATCH_ROWS, len(rows))) for begin in range(0, len(rows), ENCODE_BATCH_ROWS)]
    if num_proc > 1 and len(bounds) > 1:
        _FORKED = (rows, tokenizer, settings)
        parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process, and no warning from tokenizers
        try:
            with multiprocessing.get_context("fork").Pool(min(num_proc, len(bounds))) as pool:
                batches = list(pool.imap(_encode_forked, bounds))
        finally:
            _FORKED = None
            if parallelism is None:
                del os.environ["TOKENIZERS_PARALLELISM"]
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = parallelism
    else:
        batches = [_encode_rows(rows[begin:end], tokenizer, settings) for begin, end in bounds]
    tables = [table for table, _, _ in batches if table.num_rows]
    table = pyarrow.concat_tables(tables) if tables else _arrow_columns([], [], [])
    truncated = [name for _, names, _ in batches for name in names]
    # A random fingerprint, as datasets gives a dataset it cannot hash: hashing all the tokens would take seconds.
    dataset = Dataset(InMemoryTable(table), fingerprint=generate_random_fingerprint())
    return dataset, truncated, sum(dropped for _, _, dropped in batches)


def _encode_forked(bounds: tuple[int, int]):
    rows, tokenizer, settings = _FORKED
    return _encode_rows(rows[bounds[0] : bounds[1]], tokenizer, settings)


def _encode_rows(rows, tokenizer, settings: dict):
    """(Arrow table of input_ids, labels and source of the rows that keep a trained token, the truncated rows'
    "source (length tokens)", how many rows were dropped)."""
    encoded = _encode_batch(tokenizer, [(row["messages"], row.get("tools")) for row in rows], settings)
    sources = [row.get("source", "") for row in rows]
    truncated = _truncated_rows(sources, encoded["length"], encoded["truncated"])
    keep = encoded["trained"]
    columns = (encoded["input_ids"], encoded["labels"], sources)
    if not all(keep):
        columns = tuple([item for item, kept in zip(column, keep, strict=True) if kept] for column in columns)
    return _arrow_columns(*columns), truncated, len(keep) - sum(keep)


def _truncated_rows(sources: list, lengths: list, cuts: list) -> list[str]:
    """The report's "source (length tokens)" of each row that truncation cut."""
    return [f"{source} ({length} tokens)" for source, length, cut in zip(sources, lengths, cuts, strict=True) if cut]


def _arrow_columns(input_ids: list, labels: list, sources: list):
    """The Arrow table of the three columns, with the types datasets gives them (lists of int64, strings)."""
    import pyarrow

    tokens = pyarrow.list_(pyarrow.int64())
    return pyarrow.table(
        {
            "input_ids": pyarrow.array(input_ids, type=tokens),
            "labels": pyarrow.array(labels, type=tokens),
            "source": pyarrow.array(sources, type=pyarrow.string()),
        }
    )


def _tokenize_launched(rows, tokenizer, name: str, settings: dict, num_proc, training_args):
    """tokenize_dataset under a launch: datasets' map into the cache file the machine's other processes load."""
    from datasets import Dataset

    def encode(batch):
        conversations = [json.loads(text) for text in batch["conversation"]]
        pairs = [(conversation["messages"], conversation.get("tools")) for conversation in conversations]
        return _encode_batch(tokenizer, pairs, settings)

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
    fingerprint = {"name": name, "max_length": settings["max_length"], "last_turn_only": settings["last_turn_only"]}
    if settings["template_kwargs"]:
        fingerprint["template_kwargs"] = settings["template_kwargs"]
    if "truncation_mode" in settings:
        fingerprint["truncation_mode"] = settings["truncation_mode"]
    cache_file = str(_cache_file(rows, tokenizer, fingerprint))
    with training_args.main_process_first(local=True, desc=f"tokenizing {name} rows"):
        dataset = Dataset.from_list(conversations).map(
            encode,
            batched=True,
            batch_size=ENCODE_BATCH_ROWS,
            remove_columns=["conversation"],
            num_proc=num_proc,
            desc=f"Tokenizing {name} rows",
            cache_file_name=cache_file,
        )
    sources, lengths, cuts, keep = (dataset[key] for key in ("source", "length", "truncated", "trained"))
    dropped = len(keep) - sum(keep)
    if dropped:
        dataset = dataset.select([index for index, kept in enumerate(keep) if kept])
    truncated = _truncated_rows(sources, lengths, cuts)
    return dataset.remove_columns(["truncated", "length", "trained"]), truncated, dropped


def _encode_batch(tokenizer, pairs, settings: dict) -> dict[str, list]:
    """Columns input_ids, labels, truncated, length and trained (whether a row keeps a trained token) of the pairs."""
    encoded = encode_conversations(tokenizer, pairs, **settings)
    columns = {key: [row[key] for row in encoded] for key in ("input_ids", "labels", "truncated", "length")}
    columns["trained"] = [any(label != IGNORE_INDEX for label in row["labels"]) for row in encoded]
    return columns


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


def first_rows(names: list[str]) -> str:
    """The first ROWS_SHOWN names (file:line), and how many more there are."""
    more = len(names) - ROWS_SHOWN
    return ", ".join(names[:ROWS_SHOWN]) + (f" and {more} more" if more > 0 else "")
