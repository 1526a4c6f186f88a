"""Rows with reasoning, as each family trains them: a reply whose reasoning the template drops from later history is
split into a sample of its own (see reasoning_samples)."""

from glm_sft import UserError
from glm_sft.tokenization import first_rows


def reasoning_samples(
    rows: list[dict], family: str, last_turn_only: bool = False, switches: dict | None = None
) -> list[dict]:
    """The rows as the family trains them: a row whose reasoning the template would drop from its history is split.

    The thinking templates drop the reasoning of earlier turns (template.REASONING_KEPT), so in one rendering of a
    multi-turn row an earlier reply shows no thinking, while at inference the model thinks before it. Each such reply
    becomes a sample of its own: the conversation up to the end of its round (GLM-4.5 and later: up to the next user
    message; GLM-Z1: up to the reply), only that round trained; in the full row those rounds are not trained again
    ("loss": false). GLM-Z1's generation prompt opens the thinking of every reply, so each of its replies is split
    off so, with reasoning or without (then trained as `</think>\n{answer}` after that prompt). Every trained token is
    then one the model produces at inference with that history. Reasoning for
    a family without thinking is an error naming the rows. With `last_turn_only` nothing is split (only the final
    reply trains, and it keeps its reasoning), nor with the template switch clear_thinking=false (`switches`), which
    keeps every turn's reasoning; the error stays.
    """
    from glm_sft.switches import always_thinks, family_switches
    from glm_sft.template import NATIVE_TOOL_FAMILIES, REASONING_KEPT

    def reasons(message):
        return message["role"] == "assistant" and bool(message.get("reasoning_content"))

    def splits(message):
        # GLM-Z1 renders a call as `<|assistant|>{name}\n{arguments}`, with no reasoning: its template drops the
        # reasoning of a call turn wherever the row ends, so such a turn is not split off.
        if family in NATIVE_TOOL_FAMILIES and (message.get("tool_calls") or message.get("metadata")):
            return False
        trained = message["role"] == "assistant" and message.get("loss") is not False
        return reasons(message) or (always_thinks(family) and trained)

    if family not in REASONING_KEPT:
        found = [row.get("source", "?") for row in rows if any(map(reasons, row["messages"]))]
        if found:
            raise UserError(
                f"{first_rows(found)}: assistant messages with reasoning (reasoning_content or "
                f"<think>...</think>), but the {family} format has no thinking; train a thinking model (GLM-Z1, "
                "GLM-4.5 and later) or remove the reasoning"
            )
        return rows
    keeps_all = (switches or {}).get("clear_thinking") is False and "clear_thinking" in family_switches(family)
    if last_turn_only or keeps_all:
        return rows
    samples = []
    for row in rows:
        messages = row["messages"]
        rounds = _rounds(messages, REASONING_KEPT[family])
        split = sorted({rounds[i] for i, message in enumerate(messages) if splits(message) and rounds[i] is not None})
        for end in split:
            samples.append({**row, "messages": _trained_only(messages[:end], rounds, {end})})
        samples.append({**row, "messages": _trained_only(messages, rounds, set(split), keep=False)} if split else row)
    return samples


def _rounds(messages: list[dict], kept: str) -> list[int | None]:
    """For each message, where the sample that would keep its reasoning ends (None: the full row keeps it)."""
    if kept == "final turn":
        return [index + 1 if index < len(messages) - 1 else None for index in range(len(messages))]
    users = [index for index, message in enumerate(messages) if message["role"] == "user"]
    return [next((user for user in users if user > index), None) for index in range(len(messages))]


def _trained_only(messages: list[dict], rounds: list, chosen: set, keep: bool = True) -> list[dict]:
    """The messages with "loss": false on the assistant replies outside the chosen rounds (keep) or inside them."""
    return [
        dict(message, loss=False) if message["role"] == "assistant" and (rounds[index] in chosen) != keep else message
        for index, message in enumerate(messages)
    ]
