"""Chat formats: which GLM family a tokenizer belongs to, its special tokens, its template and its stop tokens."""

import json
from functools import cache
from pathlib import Path

from glm_sft import UserError

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
# glm4: glm-4-9b-chat (and -hf); chatglm3: ChatGLM3-6B; glm4_0414: GLM-4-9B/32B-0414; glmz1: GLM-Z1-9B/32B-0414
# (reasoning); glm45: GLM-4.5 and GLM-4.5-Air; glm46: GLM-4.6; glm47: GLM-4.7 and GLM-4.7-Flash.
FAMILIES = ("glm4", "chatglm3", "glm4_0414", "glmz1", "glm45", "glm46", "glm47")
# Families whose format has the model think first (`<think>...</think>` before the answer) and that read assistant
# messages' `reasoning_content`; families whose tool calls are XML (`<tool_call>name<arg_key>k</arg_key>...`).
THINKING_FAMILIES = ("glmz1", "glm45", "glm46", "glm47")
XML_TOOL_FAMILIES = ("glm45", "glm46", "glm47")
# Which assistant turns keep their reasoning when the template renders a conversation: GLM-4.5 and later keep it for
# the turns after the last user message (earlier ones get an empty <think></think>); GLM-Z1 only for the final one
# (its template strips reasoning from history).
REASONING_KEPT = {"glmz1": "final turn", **dict.fromkeys(("glm45", "glm46", "glm47"), "after last user")}
# Which families a checkpoint's model type can be; the first is the one a checkpoint without a chat template gets.
MODEL_TYPE_FAMILIES = {
    "chatglm": ("glm4", "chatglm3"),  # remote-code checkpoints: told apart by their tokenizer's tokens
    "glm": ("glm4", "chatglm3"),  # the -hf checkpoints (GlmForCausalLM) and our converted ChatGLM3
    "glm4": ("glm4_0414", "glmz1"),  # Glm4ForCausalLM
    "glm4_moe": ("glm45", "glm46", "glm47"),  # Glm4MoeForCausalLM
    "glm4_moe_lite": ("glm47",),  # Glm4MoeLiteForCausalLM: GLM-4.7-Flash
}
# The generations after GLM-4-9B: their shipped template is probe-checked, and results ship it.
NEWER_FAMILIES = tuple(family for family in FAMILIES if family not in MODEL_TYPE_FAMILIES["glm"])
NEWER_MODEL_TYPES = tuple(
    kind for kind, families in MODEL_TYPE_FAMILIES.items() if set(families) <= set(NEWER_FAMILIES)
)
# The mixture-of-experts generations (GLM-4.5 and later, Flash included).
MOE_FAMILIES = tuple(dict.fromkeys(MODEL_TYPE_FAMILIES["glm4_moe"] + MODEL_TYPE_FAMILIES["glm4_moe_lite"]))
# The families whose template (the GLM-Z1 copy, and ours for GLM-4-0414 after it) renders no calls or results from
# canonical tool rows.
NO_TOOL_ROW_FAMILIES = ("glm4_0414", "glmz1")
# GLM-4's 14 added tokens, which every later generation keeps with the same spelling and order (ids 151329-151342
# in the released tokenizers).
_GLM4_TOKENS = [
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
]
# GLM-4.5's tokenizer (shared by 4.6, 4.7 and 4.7-Flash) adds audio, code, thinking, tool and box tokens after them
# (ids 151343-151364).
_GLM45_TOKENS = [
    *_GLM4_TOKENS,
    "<|begin_of_audio|>",
    "<|end_of_audio|>",
    "<|begin_of_transcription|>",
    "<|end_of_transcription|>",
    "<|code_prefix|>",
    "<|code_middle|>",
    "<|code_suffix|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
    "/nothink",
    "<|begin_of_box|>",
    "<|end_of_box|>",
    "<|image|>",
    "<|video|>",
]
# The special tokens of each family as the released tokenizers spell and number them (ChatGLM3's right after its
# 64789 sentencepiece pieces, so [MASK] is 64789 and <|observation|> 64797). The built-in models carry the same.
SPECIAL_TOKENS = {
    "glm4": _GLM4_TOKENS,
    "glm4_0414": _GLM4_TOKENS,
    "glmz1": _GLM4_TOKENS,
    "glm45": _GLM45_TOKENS,
    "glm46": _GLM45_TOKENS,
    "glm47": _GLM45_TOKENS,
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
CONTROL_TOKENS = tuple(_GLM4_TOKENS)
# The tokens that end a model's turn: generation stops at any of them.
STOP_TOKENS = {
    "chatglm3": ["</s>", "<|user|>", "<|observation|>"],
    **{family: ["<|endoftext|>", "<|user|>", "<|observation|>"] for family in FAMILIES if family != "chatglm3"},
}
# Tokens only one family's tokenizer has, to tell them apart.
FAMILY_MARKERS = {"glm4": "<sop>", "chatglm3": "sop"}
IGNORE_INDEX = -100


@cache
def family_template(family: str) -> str:
    return (TEMPLATE_DIR / f"{family}.jinja").read_text(encoding="utf-8")


def detect_family(tokenizer, override: str = "auto", model_type: str | None = None) -> str:
    """The chat format to train in: `override` when it names one, else from the checkpoint's model type and the
    template its tokenizer ships (for the newer generations), else from the tokenizer's special tokens."""
    candidates = MODEL_TYPE_FAMILIES.get(model_type)
    if override != "auto":
        if override not in FAMILIES:
            raise UserError(f"template {override!r} is unknown; use one of auto, {', '.join(FAMILIES)}")
        if candidates and override not in candidates:
            raise UserError(
                f"template {override!r} does not fit {tokenizer.name_or_path}, a {model_type} checkpoint; "
                f"use one of {', '.join(candidates)} (or auto)"
            )
        return override
    shipped = shipped_template(tokenizer)
    if model_type in NEWER_MODEL_TYPES and not shipped:  # a base checkpoint: its generation's first format
        return candidates[0]
    if model_type in NEWER_MODEL_TYPES or (model_type is None and shipped):
        # The newer generations by the template they ship; with no model type at hand (an adapter or export whose
        # base is elsewhere) every newer family is tried, and a template that is none of them falls through.
        differences = {
            family: template_difference(shipped, family, tokenizer) for family in candidates or NEWER_FAMILIES
        }
        if matching := [family for family, difference in differences.items() if difference is None]:
            return matching[0]
        if candidates:
            raise UserError(_probe_message(tokenizer, candidates[0], differences[candidates[0]]))
    vocab = tokenizer.get_vocab()
    if "[gMASK]" in vocab:
        for family in MODEL_TYPE_FAMILIES["glm"]:
            if FAMILY_MARKERS[family] in vocab:
                return family
    raise UserError(
        f"the tokenizer of {tokenizer.name_or_path} is not a GLM tokenizer (no [gMASK]/<sop> or [gMASK]/sop tokens); "
        f"set template to one of {', '.join(FAMILIES)} if it really is one"
    )


def shipped_template(tokenizer) -> str | None:
    """The chat template the checkpoint's tokenizer came with (before attach_template gave it ours)."""
    return getattr(tokenizer, "shipped_chat_template", tokenizer.chat_template)


def check_explicit_template(tokenizer, family: str) -> str | None:
    """For a `template` the user named: a warning when the checkpoint ships a template that renders otherwise."""
    shipped = shipped_template(tokenizer)
    if not shipped or family not in NEWER_FAMILIES:
        return None
    difference = template_difference(shipped, family, tokenizer)
    if difference is None:
        return None
    return (
        f"warning: training in the {family} format as `template` asks, although the template shipped with "
        f"{tokenizer.name_or_path} renders otherwise ({difference})"
    )


@cache
def probe_conversations() -> list[dict]:
    """The fixed probes the shipped and our templates must render alike: system, multi-turn, tools, results,
    reasoning (templates/probes.json)."""
    return json.loads((TEMPLATE_DIR / "probes.json").read_text(encoding="utf-8"))


def template_difference(shipped: str, family: str, tokenizer=None) -> str | None:
    """None when `shipped` renders every probe of `family` as our template does (transformers' way: jinja with
    trim_blocks and lstrip_blocks; with and without the generation prompt), else where they first differ."""
    from transformers.utils.chat_template_utils import render_jinja_template

    ours = family_template(family)
    tokens = dict(tokenizer.special_tokens_map) if tokenizer is not None else {}
    for probe in probe_conversations():
        if "families" in probe and family not in probe["families"]:
            continue
        messages = probe["messages"]
        cuts = [(messages, False)]
        if messages[-1]["role"] == "assistant":
            last_user = max(index for index, message in enumerate(messages) if message["role"] != "assistant")
            cuts.append((messages[: last_user + 1], True))
        for conversation, generation_prompt in cuts:
            texts = []
            for template in (shipped, ours):
                try:
                    texts.append(
                        render_jinja_template(
                            [conversation],
                            tools=probe.get("tools"),
                            chat_template=template,
                            add_generation_prompt=generation_prompt,
                            close_final_turn=False,
                            **tokens,
                            **probe.get("template_kwargs", {}),
                        )[0][0]
                    )
                except Exception as error:  # an edited template that fails on a probe differs from ours
                    texts.append(f"<rendering failed: {type(error).__name__}: {error}>")
            if texts[0] != texts[1]:
                where = "generation prompt" if generation_prompt else "whole conversation"
                return f"probe {probe['name']!r} ({where}): {_first_difference(*texts)}"
    return None


def _first_difference(shipped: str, ours: str, context: int = 30) -> str:
    pairs = enumerate(zip(shipped, ours, strict=False))
    at = next((index for index, (a, b) in pairs if a != b), min(len(shipped), len(ours)))
    start = max(0, at - context)
    return (
        f"at character {at} the shipped template gives {shipped[start : at + context]!r} "
        f"where the released format gives {ours[start : at + context]!r}"
    )


def _probe_message(tokenizer, family: str, difference: str) -> str:
    return (
        f"the chat template shipped with {tokenizer.name_or_path} is not the released {family} format: {difference}. "
        f"Restore the checkpoint's released tokenizer_config.json / chat_template.jinja, or set template: {family} to "
        "train in the released format anyway"
    )


def attach_template(tokenizer, family: str) -> None:
    """Give the tokenizer the family's training-ready template (the same text as the official one) and a pad token;
    the template it shipped with stays in `shipped_chat_template`, for the output directory."""
    if not hasattr(tokenizer, "shipped_chat_template"):
        tokenizer.shipped_chat_template = tokenizer.chat_template
    tokenizer.chat_template = family_template(family)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def save_tokenizer(tokenizer, family: str, folder) -> None:
    """The tokenizer as a result ships it: the newer generations with the checkpoint's own template when it came with
    one (it passed the probe check, or the user chose our format over it), else with ours."""
    ours = tokenizer.chat_template
    shipped = shipped_template(tokenizer)
    own = shipped and family in NEWER_FAMILIES
    tokenizer.chat_template = shipped if own else ours
    try:
        tokenizer.save_pretrained(folder)
    finally:
        tokenizer.chat_template = ours


def stop_token_ids(tokenizer, family: str) -> list[int]:
    vocab = tokenizer.get_vocab()
    missing = [token for token in STOP_TOKENS[family] if token not in vocab]
    if missing:
        raise UserError(f"the tokenizer of {tokenizer.name_or_path} lacks the {family} stop tokens {missing}")
    return [vocab[token] for token in STOP_TOKENS[family]]
