"""Response templates: each family's replies as transformers reads them back, stored as data in
templates/response/{family}.json.

transformers 5 parses a generated reply declaratively (`tokenizer.parse_response`, which `transformers serve` and the
text-generation pipelines call): the `response_template` in tokenizer_config.json names the regions of an assistant
turn, where each starts and ends and how it is read. Parsing starts after the prompt's last `<|assistant|>` (the
`prefix`), so what the generation prompt already wrote (GLM-Z1's `\\n<think>`, GLM-4.7's `<think>` or `</think>`) is
read as part of the reply. Ours give what glm_sft.replies.parse_reply gives, as a message: `content` (absent when
empty), `reasoning_content`, `tool_calls` ([{"type": "function", "function": {"name", "arguments"}}]):
- glm4, glm4_0414: `{metadata}\\n{content}`; a first line that is not empty, at the start or after an `<|assistant|>`
  the model writes, is a call's function name, and what follows up to the turn's end its JSON arguments.
- glmz1: the same after `<think>...</think>`; a call after the reasoning follows an `<|assistant|>`.
- chatglm3: a call is `{name}\\n` and a fenced python `tool_call(key=value, ...)`, read only when every value is a
  number or a quoted string with no quote, backslash or ", " inside; any other call stays text in `content`.
- glm45 to glm52: `<think>...</think>`, the text, then XML calls (several per reply); a value that reads as JSON is
  that value, any other a string.
Every text part of a reply is stripped and the parts are joined with a newline. What cannot be expressed, and why, is
in docs/serving.md ("Parsing replies with transformers"); save_tokenizer (glm_sft.template) writes the family's
template with every tokenizer a run or an export saves.
"""

import json

from glm_sft.template import FAMILIES, TEMPLATE_DIR

RESPONSE_DIR = TEMPLATE_DIR / "response"


def response_template(family: str) -> dict:
    """The family's response template, as tokenizer.response_template takes it (a fresh copy on every call)."""
    if family not in FAMILIES:
        raise ValueError(f"no response template for {family!r}; the families are {', '.join(FAMILIES)}")
    return json.loads((RESPONSE_DIR / f"{family}.json").read_text(encoding="utf-8"))
