"""Chat formats: which GLM family a tokenizer belongs to, its template, its stop tokens, the exact training labels."""

from functools import cache
from pathlib import Path

from transformers.utils.chat_template_utils import render_jinja_template

from glm_sft import UserError

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
FAMILIES = ("glm4", "chatglm3")
# The tokens that end a model's turn: generation stops at any of them.
STOP_TOKENS = {
    "glm4": ["<|endoftext|>", "<|user|>", "<|observation|>"],
    "chatglm3": ["</s>", "<|user|>", "<|observation|>"],
}
# Tokens only one family's tokenizer has, to tell them apart.
FAMILY_MARKERS = {"glm4": "<sop>", "chatglm3": "sop"}
IGNORE_INDEX = -100


@cache
def family_template(family: str) -> str:
    return (TEMPLATE_DIR / f"{family}.jinja").read_text(encoding="utf-8")


def detect_family(tokenizer, override: str = "auto") -> str:
    """`glm4` or `chatglm3`, from the tokenizer's special tokens unless `override` names one."""
    if override != "auto":
        if override not in FAMILIES:
            raise UserError(f"template {override!r} is unknown; use one of auto, {', '.join(FAMILIES)}")
        return override
    vocab = tokenizer.get_vocab()
    if "[gMASK]" in vocab:
        for family in FAMILIES:
            if FAMILY_MARKERS[family] in vocab:
                return family
    raise UserError(
        f"the tokenizer of {tokenizer.name_or_path} is not a GLM tokenizer (no [gMASK]/<sop> or [gMASK]/sop tokens); "
        "set template: glm4 or template: chatglm3 if it really is one"
    )


def template_family(tokenizer) -> str:
    """The family whose template the tokenizer carries (as attach_template left it), else the detected one."""
    for family in FAMILIES:
        if tokenizer.chat_template == family_template(family):
            return family
    return detect_family(tokenizer)


def attach_template(tokenizer, family: str) -> None:
    """Give the tokenizer the family's training-ready template (the same text as the official one) and a pad token."""
    tokenizer.chat_template = family_template(family)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def stop_token_ids(tokenizer, family: str) -> list[int]:
    vocab = tokenizer.get_vocab()
    missing = [token for token in STOP_TOKENS[family] if token not in vocab]
    if missing:
        raise UserError(f"the tokenizer of {tokenizer.name_or_path} lacks the {family} stop tokens {missing}")
    return [vocab[token] for token in STOP_TOKENS[family]]


def render_training_example(
    tokenizer, messages: list[dict], tools: list[dict] | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text, final turn closed by its end token, and the character span of each assistant turn.

    Each tool call is an assistant turn of its own, so it has its own span.
    """
    rendered, spans = render_jinja_template(
        [messages],
        tools=tools or None,
        chat_template=tokenizer.chat_template,
        return_assistant_tokens_mask=True,
        close_final_turn=True,
        **tokenizer.special_tokens_map,
    )
    return rendered[0], spans[0]


def encode_conversation(
    tokenizer,
    messages: list[dict],
    *,
    tools: list[dict] | None = None,
    max_length: int | None = None,
    last_turn_only: bool = False,
) -> dict:
    """Token ids and labels for one conversation.

    Labels hold the token id for exactly what the model generates after each `<|assistant|>`: the metadata line, the
    content and the token that ends the turn (the next message's role token, or the family's end token after the last
    message). A tool call is trained the same way, up to the `<|observation|>` that ends it; tool definitions and
    results are not. Everything else is IGNORE_INDEX. With `last_turn_only`, only the final assistant turn is trained.
    """
    text, spans = render_training_example(tokenizer, messages, tools)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoding["input_ids"]
    labels = [IGNORE_INDEX] * len(input_ids)
    trained_spans = spans[-1:] if last_turn_only else spans
    span = 0  # spans and token offsets both run left to right: one pass over the tokens
    for index, (start, end) in enumerate(encoding["offset_mapping"]):
        while span < len(trained_spans) and trained_spans[span][1] <= start:
            span += 1
        if span == len(trained_spans):
            break
        span_start, span_end = trained_spans[span]
        if start < span_end and end > span_start:
            if start < span_start or end > span_end:
                raise AssertionError(f"token {index} straddles the boundary of a trained span in {text!r}")
            labels[index] = input_ids[index]
    truncated = max_length is not None and len(input_ids) > max_length
    if truncated:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels, "text": text, "truncated": truncated}
