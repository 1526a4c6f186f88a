"""The template switches (chat_template_kwargs): which each family's template reads, checking a user's, and which a
trained model answers with, from the reasoning its data held."""

from functools import cache

from glm_sft import UserError
from glm_sft.template import family_template, family_thinks

# The switches a user may pass to a family's template (the recipe's chat_template_kwargs, chat_cli's flags, a request's
# chat_template_kwargs), with the type of their value; each family takes those its template reads (family_switches).
TEMPLATE_SWITCHES = {"enable_thinking": bool, "clear_thinking": bool, "reasoning_effort": str}


@cache
def family_switches(family: str) -> tuple[str, ...]:
    """The TEMPLATE_SWITCHES the family's template reads (GLM-4.5: enable_thinking; GLM-4.7 and later: also
    clear_thinking; GLM-5.2: also reasoning_effort; the others none)."""
    import jinja2.meta
    from transformers.utils.chat_template_utils import _compile_jinja_template

    text = family_template(family)
    read = jinja2.meta.find_undeclared_variables(_compile_jinja_template(text).environment.parse(text))
    return tuple(name for name in TEMPLATE_SWITCHES if name in read)


def always_thinks(family: str) -> bool:
    """Whether the family's generation prompt opens the thinking of every reply, with no switch to turn it off
    (GLM-Z1's `<|assistant|>\n<think>`)."""
    return family_thinks(family) and "enable_thinking" not in family_switches(family)


def check_switches(switches, family: str, where: str = "chat_template_kwargs") -> dict:
    """`switches` ({} for None) when every key is a switch the family's template reads with a value of its type;
    otherwise a UserError that names the key and the switches there are."""
    if switches is None:
        return {}
    if not isinstance(switches, dict):
        raise UserError(f'{where} must be a mapping such as {{"enable_thinking": false}}, not {switches!r}')
    known = family_switches(family)
    for key, value in switches.items():
        if key not in known:
            reads = f"reads only {', '.join(known)}" if known else "reads none"
            raise UserError(f"{where}: the {family} template has no switch {key!r} (it {reads})")
        kind = TEMPLATE_SWITCHES[key]
        if not isinstance(value, kind):
            raise UserError(f"{where}: {key} must be {'true or false' if kind is bool else 'a string'}, not {value!r}")
    return dict(switches)


def reasoning_in(rows: list[dict]) -> str:
    """What the trained replies of `rows` hold: "all" (every one reasons first), "none" or "mixed"; "none" also when
    there is no trained reply."""
    trained = [
        bool(message.get("reasoning_content"))
        for row in rows
        for message in row["messages"]
        if message["role"] == "assistant" and message.get("loss", True) is not False
    ]
    return "all" if trained and all(trained) else "mixed" if any(trained) else "none"


def answering_switches(family: str, trained: dict, reasoning: str) -> dict:
    """The template switches a model trained with the switches `trained` on data with `reasoning` ("all", "none",
    "mixed": reasoning_in) answers with by default: `trained`, plus enable_thinking=false where the data had no
    reasoning and the default generation prompt opens a reply differently from how the replies were trained (GLM-4.7
    and later prompt `<|assistant|><think>`, while a reply without reasoning trained after `<|assistant|></think>`)."""
    switches = dict(trained)
    if reasoning != "none" or "enable_thinking" in switches or "enable_thinking" not in family_switches(family):
        return switches
    thinking_off = {**switches, "enable_thinking": False}
    if not _prompt_opens_reply(family, switches) and _prompt_opens_reply(family, thinking_off):
        return thinking_off
    return switches


def _prompt_opens_reply(family: str, switches: dict) -> bool:
    """Whether the generation prompt under `switches` is the start of a reply without reasoning as it trained."""
    from transformers.utils.chat_template_utils import render_jinja_template

    template = family_template(family)
    question, answer = {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}

    def render(messages, generation_prompt, **extra):
        return render_jinja_template(
            [messages], chat_template=template, add_generation_prompt=generation_prompt, **extra
        )[0][0]

    trained = render([question, answer], False, **switches)
    return trained.startswith(render([question], True, **switches))
