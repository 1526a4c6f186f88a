"""Chat formats: which GLM family a tokenizer belongs to, its special tokens, its template and its stop tokens."""

from functools import cache
from pathlib import Path

from glm_sft import UserError

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
FAMILIES = ("glm4", "chatglm3")
# The special tokens of each family as the released tokenizers spell and number them (ChatGLM3's right after its
# 64789 sentencepiece pieces, so [MASK] is 64789 and <|observation|> 64797). The built-in models carry the same.
SPECIAL_TOKENS = {
    "glm4": [
        "<|endoftext|>",
        "[MASK]",
        "[gMASK]",
        "[sMASK]",
        "<sop>",
        "<eop>",
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
        "<|observation|>",
        "<|begin_of_image|>",
        "<|end_of_image|>",
        "<|begin_of_video|>",
        "<|end_of_video|>",
    ],
    "chatglm3": [
        "[MASK]",
        "[gMASK]",
        "[sMASK]",
        "sop",
        "eop",
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
        "<|observation|>",
    ],
}
# Spellings refused in message text (data.py), for every family, since data is read before the family is known:
# GLM-4's tokenizer (glm-4-9b-chat's, and the -hf tokenizer.json) reads its special tokens in any text, so in content
# they would silently change the conversation's format (or, <|begin_of_image|> and the like, insert a control token).
# ChatGLM3's own builder encodes message text with sentencepiece alone, so its spellings (sop, eop, <s>, </s>, <unk>)
# stay text; glm_sft.tokenization encodes them as text too.
CONTROL_TOKENS = tuple(SPECIAL_TOKENS["glm4"])
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
