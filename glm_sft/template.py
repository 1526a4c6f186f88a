"""Chat formats: which GLM family a tokenizer belongs to, its special tokens, its template and its stop tokens."""

import json
from functools import cache
from pathlib import Path

from glm_sft import UserError

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
# glm4: glm-4-9b-chat (and -hf); chatglm3: ChatGLM3-6B; glm4_0414: GLM-4-9B/32B-0414; glmz1: GLM-Z1-9B/32B-0414
# (reasoning); glm45: GLM-4.5 and GLM-4.5-Air; glm46: GLM-4.6; glm47: GLM-4.7 and GLM-4.7-Flash; glm5, glm51, glm52:
# GLM-5, GLM-5.1 and GLM-5.2 (glm5 is GLM-4.7's text, byte for byte, so it renders with glm47's template).
FAMILIES = ("glm4", "chatglm3", "glm4_0414", "glmz1", "glm45", "glm46", "glm47", "glm5", "glm51", "glm52")
# Families whose format has the model think first (`<think>...</think>` before the answer) and that read assistant
# messages' `reasoning_content`; families whose tool calls are XML (`<tool_call>name<arg_key>k</arg_key>...`).
THINKING_FAMILIES = ("glmz1", "glm45", "glm46", "glm47", "glm5", "glm51", "glm52")
XML_TOOL_FAMILIES = ("glm45", "glm46", "glm47", "glm5", "glm51", "glm52")
# Which assistant turns keep their reasoning when the template renders a conversation: GLM-4.5 and later keep it for
# the turns after the last user message (earlier ones get <think></think>, or GLM-4.7, 5 and 5.1 a bare </think>; all
# of it with clear_thinking=false); GLM-Z1 only for the final one (its template strips reasoning from history).
# GLM-5.1's per-user-turn choice (thinking_indices) only picks <think></think> or </think> for an earlier turn
# without reasoning when clear_thinking=false: by default its earlier reasoning is dropped like GLM-4.7's.
REASONING_KEPT = {
    "glmz1": "final turn",
    **dict.fromkeys(("glm45", "glm46", "glm47", "glm5", "glm51", "glm52"), "after last user"),
}
# Which families a checkpoint's model type can be; the first is the one a checkpoint without a chat template gets.
MODEL_TYPE_FAMILIES = {
    "chatglm": ("glm4", "chatglm3"),  # remote-code checkpoints: told apart by their tokenizer's tokens
    "glm": ("glm4", "chatglm3"),  # the -hf checkpoints (GlmForCausalLM) and our converted ChatGLM3
    "glm4": ("glm4_0414", "glmz1"),  # Glm4ForCausalLM
    "glm4_moe": ("glm45", "glm46", "glm47"),  # Glm4MoeForCausalLM
    "glm4_moe_lite": ("glm47",),  # Glm4MoeLiteForCausalLM: GLM-4.7-Flash
    "glm_moe_dsa": ("glm5", "glm51", "glm52"),  # GlmMoeDsaForCausalLM: GLM-5, 5.1 and 5.2
}
# Families that render with another family's template file (the same released text).
TEMPLATE_FILES = {"glm5": "glm47"}
# The generations after GLM-4-9B: their shipped template is probe-checked, and results ship it.
NEWER_FAMILIES = tuple(family for family in FAMILIES if family not in MODEL_TYPE_FAMILIES["glm"])
NEWER_MODEL_TYPES = tuple(
    kind for kind, families in MODEL_TYPE_FAMILIES.items() if set(families) <= set(NEWER_FAMILIES)
)
# The mixture-of-experts generations (GLM-4.5 and later, Flash and GLM-5 included).
MOE_FAMILIES = tuple(
    dict.fromkeys(
        MODEL_TYPE_FAMILIES["glm4_moe"] + MODEL_TYPE_FAMILIES["glm4_moe_lite"] + MODEL_TYPE_FAMILIES["glm_moe_dsa"]
    )
)
# The families whose released template reads tool calls and results only in GLM's native form (an assistant message
# with the function name as `metadata`, an `observation` message), not `tool_calls` / `tool`: canonical rows are
# turned into that form before they are rendered (native_messages).
NATIVE_TOOL_FAMILIES = ("glm4_0414", "glmz1")
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
# (ids 151343-151364). GLM-5, 5.1 and 5.2 are given the same: their templates write no other special token (5.2's
# <reminder> and 5.1's <tools> in a tool_reference result are text).
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
    "glm5": _GLM45_TOKENS,
    "glm51": _GLM45_TOKENS,
    "glm52": _GLM45_TOKENS,
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
# Spellings refused in message text (glm_sft/data/checks.py) for every family: data is read before the family is known.
# GLM-4's tokenizer (glm-4-9b-chat's, and the -hf tokenizer.json) reads its special tokens in any text, so in content
# they would silently change the conversation's format (or, <|begin_of_image|> and the like, insert a control token).
# ChatGLM3's own builder encodes message text with sentencepiece alone, so its spellings (sop, eop, <s>, </s>, <unk>)
# stay text; glm_sft.tokenization encodes them as text too.
CONTROL_TOKENS = tuple(_GLM4_TOKENS)


def control_token_in(*texts: str) -> str | None:
    """The first of CONTROL_TOKENS that any of the texts spells out, or None: such text is refused wherever it enters
    (data rows, requests, the web chat)."""
    return next((token for token in CONTROL_TOKENS if any(token in text for text in texts)), None)


# The tokens that end a model's turn: generation stops at any of them.
STOP_TOKENS = {
    "chatglm3": ["</s>", "<|user|>", "<|observation|>"],
    **{family: ["<|endoftext|>", "<|user|>", "<|observation|>"] for family in FAMILIES if family != "chatglm3"},
}
# Tokens only one family's tokenizer has, to tell them apart.
FAMILY_MARKERS = {"glm4": "<sop>", "chatglm3": "sop"}
IGNORE_INDEX = -100


# Model types whose chat template has not been found: a checkpoint of one stops with what is known, whatever it ships.
UNSUPPORTED_MODEL_TYPES = {
    "glm5_next": "GLM-5.3-Flash (Glm5NextForConditionalGeneration, multimodal): its released chat template has not "
    "been found, so its format cannot be checked or trained exactly; it is not supported yet",
}
# The older generations' model types: their checkpoints' own templates are not stored here, so a template that is
# none of ours does not stop them; their tokenizer's tokens decide (glm4 or chatglm3).
OLDER_MODEL_TYPES = ("chatglm", "glm")
# Released variants of a family's template that render other text, as (line in ours, line in the variant's
# training-ready text): GLM-4-0414's tokenizer_config.json form writes a space after a call's metadata, where its
# chat_template.jinja (which transformers 5 loads first) writes none (released/SOURCES.md).
TEMPLATE_VARIANTS = {
    "glm4_0414": {"tokenizer_config": ("{%- set metadata_end = '\\n' -%}", "{%- set metadata_end = ' \\n' -%}")},
}


@cache
def family_template(family: str, variant: str | None = None) -> str:
    """Our training-ready template of the family, or of one of its released variants (TEMPLATE_VARIANTS)."""
    text = (TEMPLATE_DIR / f"{TEMPLATE_FILES.get(family, family)}.jinja").read_text(encoding="utf-8")
    if variant is None:
        return text
    ours, theirs = TEMPLATE_VARIANTS[family][variant]
    if text.count(ours) != 1:
        raise RuntimeError(f"templates/{family}.jinja lost the line {ours!r} its {variant} variant replaces")
    return text.replace(ours, theirs)


def training_templates(family: str) -> list[tuple[str | None, str]]:
    """(variant, text) of every training-ready template of the family: ours first, then its released variants."""
    return [(None, family_template(family))] + [
        (variant, family_template(family, variant)) for variant in TEMPLATE_VARIANTS.get(family, {})
    ]


def detect_family(tokenizer, override: str = "auto", model_type: str | None = None) -> str:
    """The chat format to train in: `override` when it names one; else the family whose template renders the
    template the checkpoint ships identically on the probes, whatever its model type; else, for a checkpoint that
    ships none (a base checkpoint), its model type's first family, or the tokenizer's tokens for the older
    generations. Nothing falls back silently: a shipped template that matches no family, and a model type we do not
    list with no template, stop with what to do."""
    if model_type in UNSUPPORTED_MODEL_TYPES:
        raise UserError(
            f"{tokenizer.name_or_path} is a {model_type} checkpoint: {UNSUPPORTED_MODEL_TYPES[model_type]}"
        )
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
    if shipped:
        # The model type's own families first, so GLM-5 (GLM-4.7's text) is glm5 and an unknown type is glm47.
        order = list(dict.fromkeys([*(candidates or ()), *FAMILIES]))
        mismatches = {}
        for family in order:
            mismatch = _template_mismatch(shipped, family, tokenizer)
            if mismatch is None:
                return family
            mismatches[family] = mismatch
        if model_type not in OLDER_MODEL_TYPES:
            pool = candidates or FAMILIES
            nearest = max(pool, key=lambda family: mismatches[family][0])
            raise UserError(_probe_message(tokenizer, nearest, mismatches[nearest][1], model_type))
    elif model_type in NEWER_MODEL_TYPES:  # a base checkpoint: its generation's first format
        return candidates[0]
    elif model_type is not None and model_type not in MODEL_TYPE_FAMILIES:
        could_be = _families_by_vocabulary(tokenizer)
        raise UserError(
            f"{tokenizer.name_or_path} is a {model_type} checkpoint, a model type glm-sft does not know, and its "
            f"tokenizer ships no chat template to tell its format by; by its tokens it could be "
            f"{', '.join(could_be) or 'none of the GLM formats'}: set template: to the one it was released with"
        )
    if family := _older_vocabulary(tokenizer):
        return family
    raise UserError(
        f"the tokenizer of {tokenizer.name_or_path} is not a GLM tokenizer (no [gMASK]/<sop> or [gMASK]/sop tokens); "
        f"set template to one of {', '.join(FAMILIES)} if it really is one"
    )


def _older_vocabulary(tokenizer) -> str | None:
    """glm4 or chatglm3 by the tokens only one of their tokenizers has, else None."""
    vocab = tokenizer.get_vocab()
    if "[gMASK]" in vocab:
        for family in MODEL_TYPE_FAMILIES["glm"]:
            if FAMILY_MARKERS[family] in vocab:
                return family
    return None


def _families_by_vocabulary(tokenizer) -> list[str]:
    """The families whose special tokens the tokenizer all has, the latest tokenizer's only (GLM-4.5's tokens hold
    GLM-4's)."""
    vocab = tokenizer.get_vocab()
    fitting = [family for family in FAMILIES if all(token in vocab for token in SPECIAL_TOKENS[family])]
    most = max((len(SPECIAL_TOKENS[family]) for family in fitting), default=0)
    return [family for family in fitting if len(SPECIAL_TOKENS[family]) == most]


def shipped_template(tokenizer) -> str | None:
    """The chat template the checkpoint's tokenizer came with (before attach_template gave it ours)."""
    return getattr(tokenizer, "shipped_chat_template", tokenizer.chat_template)


def shipped_template_warning(tokenizer, family: str, explicit: bool) -> str | None:
    """A warning when the checkpoint ships a template that renders otherwise than the family's: a `template` the user
    named, or an older generation told by its tokens (detect_family stops every other such case)."""
    shipped = shipped_template(tokenizer)
    if not explicit and family not in MODEL_TYPE_FAMILIES["glm"]:  # detected by its template: it matches
        return None
    if not shipped or (difference := template_difference(shipped, family, tokenizer)) is None:
        return None
    chosen = "as `template` asks" if explicit else "(from the tokenizer's tokens)"
    return (
        f"warning: training in the {family} format {chosen}, although the template shipped with "
        f"{tokenizer.name_or_path} renders otherwise ({difference})"
    )


@cache
def probe_conversations() -> list[dict]:
    """The fixed probes the shipped and our templates must render alike: system, multi-turn, tools, results,
    reasoning (templates/probes.json)."""
    return json.loads((TEMPLATE_DIR / "probes.json").read_text(encoding="utf-8"))


def family_of_template(chat_template: str | None) -> str | None:
    """The family one of our training-ready templates (or a variant of one) belongs to; None for any other text."""
    return _templates_by_text().get(chat_template)


@cache
def _templates_by_text() -> dict[str, str]:
    by_text = {}
    for family in FAMILIES:
        for _variant, text in training_templates(family):
            by_text.setdefault(text, family)
    return by_text


# The families whose template writes a tool result given as a list of {"output": ...} items one <tool_response> per
# item: the XML families but GLM-5.1, whose text keeps only `text` items of a list (it would write an empty result).
OUTPUT_LIST_FAMILIES = tuple(family for family in XML_TOOL_FAMILIES if family != "glm51")


def family_messages(messages: list[dict], family: str | None) -> list[dict]:
    """The messages as the family's template reads them: tool results given as a list of {"output": ...} items (the
    form GLM-5.2's template reads) as their JSON text outside OUTPUT_LIST_FAMILIES, as any other non-text result is;
    tool rows in the native form for NATIVE_TOOL_FAMILIES (native_messages). None (a template not ours): as they
    are."""
    if family is None:
        return messages
    if family not in OUTPUT_LIST_FAMILIES:
        messages = [
            dict(message, content=json.dumps(message["content"], ensure_ascii=False))
            if message["role"] == "tool" and output_items(message.get("content")) is not None
            else message
            for message in messages
        ]
    return native_messages(messages, family)


def output_items(content) -> list[str] | None:
    """The outputs of a tool result given as a list of {"output": text} items, else None."""
    if not isinstance(content, list) or not content:
        return None
    if not all(isinstance(item, dict) and set(item) == {"output"} for item in content):
        return None
    if not all(isinstance(item["output"], str) for item in content):
        return None
    return [item["output"] for item in content]


def native_messages(messages: list[dict], family: str) -> list[dict]:
    """The messages as a NATIVE_TOOL_FAMILIES template reads them: every call of an assistant message's `tool_calls`
    an assistant turn of its own (`metadata` the function name, content the JSON arguments), each `tool` result an
    `observation` turn right after its call, as the model generates them (call, result, call, result; the message's
    own text, if any, a turn before its first call). Other families' messages, and messages already native, are
    returned as they are."""
    if family not in NATIVE_TOOL_FAMILIES or not any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        return messages
    turns, waiting = [], []  # waiting: the calls of the last assistant message after the first, each after a result
    for message in messages:
        if message["role"] == "tool":
            turns.append({"role": "observation", "content": message.get("content", "")})
            if waiting:
                turns.append(waiting.pop(0))
            continue
        turns += waiting
        waiting = []
        calls = message.get("tool_calls") if message["role"] == "assistant" else None
        if not calls:
            turns.append(message)
            continue
        shared = {key: message[key] for key in ("loss",) if key in message}
        if _text(message.get("content")).strip():
            turns.append({key: value for key, value in message.items() if key != "tool_calls"})
        for index, tool_call in enumerate(calls):
            call = tool_call.get("function", tool_call)
            arguments = call.get("arguments", {})
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, ensure_ascii=False)
            turn = {"role": "assistant", "metadata": call["name"], "content": arguments, **shared}
            (turns if index == 0 else waiting).append(turn)
    return turns + waiting


def _text(content) -> str:
    return content if isinstance(content, str) else ""


def template_difference(shipped: str, family: str, tokenizer=None) -> str | None:
    """None when `shipped` renders every probe of `family` as one of our templates of it does (transformers' way:
    jinja with trim_blocks and lstrip_blocks; with and without the generation prompt), else where they first
    differ."""
    mismatch = _template_mismatch(shipped, family, tokenizer)
    return None if mismatch is None else mismatch[1]


def matching_variant(shipped: str | None, family: str, tokenizer=None) -> str | None:
    """Which training-ready variant of the family renders `shipped` (None: ours, also when none does)."""
    if shipped:
        for variant, ours in training_templates(family)[1:]:
            if _first_mismatch(shipped, ours, family, tokenizer) is None:
                return variant
    return None


def _template_mismatch(shipped: str, family: str, tokenizer=None) -> tuple[tuple, str] | None:
    """None when one of the family's training-ready templates renders like `shipped`; else (how far the nearest
    agrees, as a sortable key, where it differs)."""
    mismatches = []
    for _variant, ours in training_templates(family):
        mismatch = _first_mismatch(shipped, ours, family, tokenizer)
        if mismatch is None:
            return None
        mismatches.append(mismatch)
    return max(mismatches, key=lambda mismatch: mismatch[0])


def _first_mismatch(shipped: str, ours: str, family: str, tokenizer=None) -> tuple[tuple, str] | None:
    from transformers.utils.chat_template_utils import render_jinja_template

    tokens = dict(tokenizer.special_tokens_map) if tokenizer is not None else {}
    probes = [probe for probe in probe_conversations() if "families" not in probe or family in probe["families"]]
    for number, probe in enumerate(probes):
        messages = family_messages(probe["messages"], family)
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
                at = _difference_at(*texts)
                return (number, at), f"probe {probe['name']!r} ({where}): {_first_difference(*texts, at)}"
    return None


def _difference_at(shipped: str, ours: str) -> int:
    pairs = enumerate(zip(shipped, ours, strict=False))
    return next((index for index, (a, b) in pairs if a != b), min(len(shipped), len(ours)))


def _first_difference(shipped: str, ours: str, at: int, context: int = 30) -> str:
    start = max(0, at - context)
    return (
        f"at character {at} the shipped template gives {shipped[start : at + context]!r} "
        f"where the released format gives {ours[start : at + context]!r}"
    )


def _probe_message(tokenizer, family: str, difference: str, model_type: str | None = None) -> str:
    kind = f" (a {model_type} checkpoint)" if model_type else ""
    return (
        f"the chat template shipped with {tokenizer.name_or_path}{kind} is none of the released formats; nearest is "
        f"{family}: {difference}. "
        f"Restore the checkpoint's released tokenizer_config.json / chat_template.jinja, or set template: {family} to "
        "train in the released format anyway"
    )


def attach_template(tokenizer, family: str) -> None:
    """Give the tokenizer the family's training-ready template (the same text as the official one), its response
    template and a pad token; the template it shipped with stays in `shipped_chat_template`, for the output directory.

    The response template (glm_sft.responses; ours even over one the checkpoint came with: it is the tested one) goes
    into tokenizer_config.json with every save (results, checkpoints, exports), so that transformers
    (`parse_response`, `transformers serve`, the pipelines) reads the model's replies, reasoning and calls as
    parse_reply does."""
    from glm_sft.responses import response_template

    tokenizer.response_template = response_template(family)
    if not hasattr(tokenizer, "shipped_chat_template"):
        tokenizer.shipped_chat_template = tokenizer.chat_template
    # A checkpoint shipping a released variant of the format (GLM-4-0414's tokenizer_config form) trains in it.
    variant = matching_variant(tokenizer.shipped_chat_template, family, tokenizer)
    tokenizer.chat_template = family_template(family, variant)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def save_tokenizer(tokenizer, family: str, folder) -> None:
    """The tokenizer as a result ships it: the newer generations with the checkpoint's own template when it came with
    one (it passed the probe check, or the user chose our format over it), else with ours; with the family's response
    template (attach_template)."""
    ours = tokenizer.chat_template
    shipped = shipped_template(tokenizer)
    own = shipped and family in NEWER_FAMILIES
    tokenizer.chat_template = shipped if own else ours
    try:
        tokenizer.save_pretrained(folder)
    finally:
        tokenizer.chat_template = ours


def family_thinks(family: str) -> bool:
    """Whether the family's replies open with reasoning (`<think>...</think>`): GLM-Z1 and GLM-4.5 onwards."""
    return family in THINKING_FAMILIES


def stop_token_ids(tokenizer, family: str) -> list[int]:
    vocab = tokenizer.get_vocab()
    missing = [token for token in STOP_TOKENS[family] if token not in vocab]
    if missing:
        raise UserError(f"the tokenizer of {tokenizer.name_or_path} lacks the {family} stop tokens {missing}")
    return [vocab[token] for token in STOP_TOKENS[family]]
