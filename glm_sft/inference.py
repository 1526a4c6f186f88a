"""Put a chat model to work, the one path chat_cli, evaluate, sample generation and the server share.

Load a chat model (a base or fully fine-tuned model, or a base with a train.py adapter), fit a conversation into the
model's context (the oldest rounds go first; `[gMASK]<sop>`, the system prompt and the tools always stay), and
generate with the family's stop ids: streamed piece by piece, batched (left-padded), or raw with the special tokens
kept (for tool calls). A thinking family's reply is streamed in parts, its reasoning apart from its answer; the
template's switches (`enable_thinking`) go into every prompt the model renders.
"""

import contextlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

from glm_sft import UserError
from glm_sft.replies import ReasoningStream, split_reasoning
from glm_sft.switches import check_switches
from glm_sft.template import family_thinks
from glm_sft.tokenization import encode_chat

DEFAULT_CONTEXT = 4096  # for a config that does not say (max_position_embeddings)
GENERATION_THREAD = "glm-sft-generate"  # the thread ChatModel.stream generates in


def model_context(model) -> int:
    """The tokens the model reads at once: prompt and reply together."""
    return getattr(model.config, "max_position_embeddings", None) or DEFAULT_CONTEXT


def prompt_budget(model, max_new_tokens: int) -> int:
    """The tokens a prompt may take and still leave max_new_tokens for the reply (at least one)."""
    return max(model_context(model) - max_new_tokens, 1)


@dataclass
class ChatModel:
    model: object
    tokenizer: object
    family: str
    stop_ids: list[int]
    name: str = ""
    # The template's switches for every prompt ({"enable_thinking": False}); a call's `template_kwargs` add to them.
    template_kwargs: dict = field(default_factory=dict)

    @property
    def context(self) -> int:
        return model_context(self.model)

    @property
    def thinks(self) -> bool:
        """Whether the family's replies open with reasoning (`<think>...</think>`)."""
        return family_thinks(self.family)

    def switches(self, template_kwargs: dict | None = None) -> dict:
        return {**self.template_kwargs, **(template_kwargs or {})}

    def prompt_ids(
        self, messages: list[dict], tools=None, max_new_tokens: int = 512, template_kwargs: dict | None = None
    ) -> tuple[list[int], list[dict]]:
        """(prompt ids, the messages kept) for the conversation, leaving room for max_new_tokens."""
        budget = prompt_budget(self.model, max_new_tokens)
        return fit_prompt(self.tokenizer, messages, budget, tools, template_kwargs=self.switches(template_kwargs))

    def generation_kwargs(
        self,
        messages,
        *,
        tools=None,
        max_new_tokens=512,
        temperature=0.0,
        top_p=1.0,
        template_kwargs=None,
        encoded: list[int] | None = None,
    ) -> dict:
        """model.generate's arguments for one conversation; `messages` is trimmed in place to what fits. `encoded`:
        the prompt's ids when the caller has already encoded and fitted them (the server counts every prompt)."""
        import torch

        if encoded is None:
            prompt_ids, kept = self.prompt_ids(messages, tools, max_new_tokens, template_kwargs)
            messages[:] = kept
        else:
            prompt_ids = encoded
        input_ids = torch.tensor([prompt_ids], device=self.model.device)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {}
        sampling.setdefault("do_sample", False)
        return dict(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            eos_token_id=self.stop_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            **sampling,
        )

    def opening(self, prompt_ids: list[int]) -> str:
        """What a thinking family's generation prompt wrote after its last <|assistant|> (`<think>` for GLM-Z1 and
        GLM-4.7, `\n<think></think>` with thinking off): the start of the reply the model goes on with. "" for the
        other families, whose generation prompt is <|assistant|> alone."""
        return generation_opening(self.tokenizer, prompt_ids) if self.thinks else ""

    def stream_parts(
        self, messages, *, tools=None, stop: threading.Event | None = None, usage: dict | None = None, **settings
    ):
        """The reply piece by piece as ("reasoning" | "answer", text): a thinking family's `<think>` block apart from
        its answer (see glm_sft.replies.ReasoningStream), all of it answer for the other families. Leading and trailing
        whitespace of each part is not sent. Setting `stop` ends generation at the next token; closing the generator
        early (Ctrl-C in the loop that reads it) does the same. A `usage` dict is filled once generation has ended
        (see generation_usage)."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        stop = stop or threading.Event()
        stop_ids = torch.tensor(self.stop_ids)

        class Stopped(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return stop.is_set()

        class ReplyStreamer(TextIteratorStreamer):  # the end-of-turn token is not text, even with special tokens kept
            def put(self, value):
                if not self.next_tokens_are_prompt:
                    value = value.reshape(-1)
                    value = value[~torch.isin(value, stop_ids.to(value.device))]
                super().put(value)

        # A thinking family's <think> and </think> may be special tokens: kept, to tell the reasoning apart.
        streamer = ReplyStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=not self.thinks)
        kwargs = self.generation_kwargs(messages, tools=tools, **settings)
        kwargs.update(streamer=streamer, stopping_criteria=StoppingCriteriaList([Stopped()]))
        outputs, failures = [], []

        def generate():
            try:
                outputs.append(self.model.generate(**kwargs))
            except BaseException as error:  # raised again in the reading thread; the stream must still end
                failures.append(error)
                streamer.end()

        parts = ReasoningStream(thinking=self.thinks)
        thread = threading.Thread(target=generate, name=GENERATION_THREAD, daemon=True)
        thread.start()
        try:
            yield from parts.feed(self.opening(kwargs["input_ids"][0].tolist()))
            for piece in streamer:
                yield from parts.feed(piece)
            if not failures:
                yield from parts.finish()
        finally:
            stop.set()
            thread.join()
            if usage is not None and outputs:
                usage.update(generation_usage(kwargs, outputs[0][0].tolist(), self.stop_ids))
        if failures:
            raise failures[0]

    def stream(self, messages, **settings):
        """The answer's text piece by piece (a thinking family's reasoning left out; see stream_parts)."""
        with contextlib.closing(self.stream_parts(messages, **settings)) as parts:
            for kind, piece in parts:
                if kind == "answer":
                    yield piece

    def reply(self, messages, **settings) -> str:
        """The whole answer as text."""
        return "".join(self.stream(messages, **settings)).strip()

    def raw_reply(self, messages, *, tools=None, usage: dict | None = None, **settings) -> str:
        """The reply as written after <|assistant|> ({metadata}\n{content}, special tokens kept; for a thinking
        family, with what its generation prompt wrote after <|assistant|>: see opening), not streamed. A `usage`
        dict is filled as stream fills it."""
        import torch

        kwargs = self.generation_kwargs(messages, tools=tools, **settings)
        with torch.no_grad():
            output = self.model.generate(**kwargs)
        if usage is not None:
            usage.update(generation_usage(kwargs, output[0].tolist(), self.stop_ids))
        prompt_ids = kwargs["input_ids"][0].tolist()
        new_ids = output[0, len(prompt_ids) :].tolist()
        return self.opening(prompt_ids) + self.tokenizer.decode(
            cut_at_stop(new_ids, self.stop_ids), skip_special_tokens=False
        )

    def replies(self, prompts: list[dict], **settings) -> list[str]:
        """Greedy answers to prompts ({"messages", optional "tools"}), batched: see generate_replies."""
        settings["template_kwargs"] = self.switches(settings.get("template_kwargs"))
        return generate_replies(
            self.model, self.tokenizer, prompts, stop_ids=self.stop_ids, family=self.family, **settings
        )


def fit_prompt(
    tokenizer, messages: list[dict], budget: int, tools=None, template_kwargs: dict | None = None
) -> tuple[list[int], list[dict]]:
    """Prompt ids of at most `budget` tokens for the conversation, and the messages kept (`template_kwargs`: the
    template's switches, such as enable_thinking).

    The oldest rounds go first (a round is a user message and everything up to the next one: replies, calls,
    results). When the last round alone is still too long, its beginning is cut: the prompt keeps the leading
    `[gMASK]<sop>`, the system prompt and the tools, the round's role token, and as much of the end as fits.
    """
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]

    def render(conversation, generation_prompt=True):
        return encode_prompt(tokenizer, conversation, tools, template_kwargs, generation_prompt=generation_prompt)

    while True:
        ids = render(system + turns)
        if len(ids) <= budget:
            return ids, system + turns
        if len(turns) <= 1:
            break
        next_round = next((i for i, turn in enumerate(turns[1:], 1) if turn["role"] == "user"), len(turns) - 1)
        turns = turns[next_round:]
    prefix = render(system, generation_prompt=False)  # [gMASK]<sop>, the tools block and the system prompt
    room = budget - len(prefix) - 1
    if room < 1 or ids[: len(prefix)] != prefix:
        raise UserError(
            f"the system prompt and tools take {len(prefix)} tokens, more than the {budget} the context leaves for "
            "the prompt; shorten them or lower max_new_tokens"
        )
    return prefix + [ids[len(prefix)]] + ids[-room:], system + turns


def generation_opening(tokenizer, prompt_ids: list[int]) -> str:
    """What the generation prompt wrote after its last <|assistant|> (GLM-Z1's `\n<think>`, GLM-4.7's `<think>`)."""
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    if assistant not in prompt_ids:
        return ""
    last = len(prompt_ids) - 1 - prompt_ids[::-1].index(assistant)
    return tokenizer.decode(prompt_ids[last + 1 :], skip_special_tokens=False)


def encode_prompt(tokenizer, messages, tools=None, template_kwargs=None, *, generation_prompt=True) -> list[int]:
    """The whole prompt's ids, as training encodes the conversation: text in messages stays text."""
    ids, _ = encode_chat(
        tokenizer,
        messages,
        tools=tools,
        add_generation_prompt=generation_prompt,
        close_final_turn=False,
        template_kwargs=template_kwargs,
    )
    return ids


def generation_usage(generate_kwargs: dict, output_ids: list[int], stop_ids) -> dict:
    """What one generation used, in the OpenAI API's terms: prompt_tokens, completion_tokens (the new tokens, the
    end-of-turn token included), and finish_reason: "stop" when an end-of-turn token (or a stop request) ended it,
    "length" when it ran to max_new_tokens without one."""
    prompt_tokens = generate_kwargs["input_ids"].shape[1]
    new_ids = output_ids[prompt_tokens:]
    ended_by_stop_token = len(cut_at_stop(new_ids, stop_ids)) < len(new_ids)
    ran_to_the_limit = len(new_ids) >= generate_kwargs["max_new_tokens"]
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(new_ids),
        "finish_reason": "length" if ran_to_the_limit and not ended_by_stop_token else "stop",
    }


def cut_at_stop(ids: list[int], stop_ids) -> list[int]:
    """The generated ids before the first end-of-turn token (what follows is padding)."""
    stops = set(stop_ids)
    for index, token in enumerate(ids):
        if token in stops:
            return ids[:index]
    return ids


def generate_replies(
    model,
    tokenizer,
    prompts: list[dict],
    *,
    stop_ids,
    max_new_tokens: int,
    batch_size: int = 8,
    synced_gpus: bool = False,
    progress: bool = False,
    family: str | None = None,
    template_kwargs: dict | None = None,
) -> list[str]:
    """Greedy replies to `prompts` ({"messages", optional "tools"}), `batch_size` at a time, left-padded; each prompt
    fitted to the context as fit_prompt does, with the template's switches `template_kwargs`. For a thinking `family`,
    the answers alone (the reasoning split off, see glm_sft.replies.split_reasoning).

    synced_gpus: every process of a sharded model (DeepSpeed ZeRO-3, FSDP) calls this with the same prompts, and
    each keeps running forward passes until all are done, as the parameters are gathered collectively.
    """
    import sys

    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    budget = prompt_budget(model, max_new_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    replies = []
    batches = range(0, len(prompts), max(batch_size, 1))
    for start in tqdm(batches, desc="generating", unit="batch", disable=not progress, file=sys.stderr):
        batch = prompts[start : start + batch_size]
        encoded = [
            fit_prompt(tokenizer, prompt["messages"], budget, prompt.get("tools"), template_kwargs)[0]
            for prompt in batch
        ]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in encoded], device=device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
        with torch.no_grad():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=list(stop_ids),
                pad_token_id=pad_id,
                use_cache=True,  # training may have turned the cache off for gradient checkpointing
                synced_gpus=synced_gpus,
            )
        for ids, row in zip(encoded, output[:, width:].tolist(), strict=True):
            if family_thinks(family):  # <think> may be a special token: kept to split the reasoning off
                text = generation_opening(tokenizer, ids) + tokenizer.decode(cut_at_stop(row, stop_ids))
                replies.append(split_reasoning(text)[1])
            else:
                replies.append(tokenizer.decode(cut_at_stop(row, stop_ids), skip_special_tokens=True).strip())
    return replies


def generation_config_for(tokenizer, family: str):
    """Greedy-by-default generation settings whose stop ids are the family's end-of-turn tokens."""
    from transformers import GenerationConfig

    from glm_sft.template import stop_token_ids

    return GenerationConfig(
        eos_token_id=stop_token_ids(tokenizer, family), pad_token_id=tokenizer.pad_token_id, max_new_tokens=512
    )


def load_chat_model(model: str | None = None, adapter: str | None = None, *, template=None, trust_remote_code=False):
    """A ChatModel for a base or fully fine-tuned model (`model`), or a base with a train.py adapter applied.

    The adapter directory names its base (`model` overrides it) and carries the run's tokenizer and template.
    """
    import torch

    from glm_sft.loading import load_adapter_model, load_model, load_tokenizer, quiet_transformers, read_run_recipe
    from glm_sft.template import stop_token_ids

    quiet_transformers()
    adapter_dir = Path(adapter) if adapter else None
    recipe, base, recorded_base = {}, model, None
    if adapter_dir is not None:
        recipe = read_run_recipe(adapter_dir)  # first: it finishes a save a killed run left half-done
        recorded_base = adapter_base(adapter_dir)
        base = model or recorded_base
        if not base:
            raise UserError(f"{adapter_dir}: the adapter does not name its base model; pass --model")
    elif base and (Path(base) / "adapter_config.json").is_file():
        raise UserError(f"{base} is an adapter directory, not a model; use --adapter {base}")
    tokenizer, family = load_tokenizer(
        str(adapter_dir) if adapter_dir is not None else base,
        template or recipe.get("template", "auto"),
        trust_remote_code,
    )
    dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    if adapter_dir is not None:
        loaded = load_adapter_model(adapter_dir, base, recorded_base, dtype=dtype, trust_remote_code=trust_remote_code)
    else:
        loaded = load_model(base, dtype=dtype, trust_remote_code=trust_remote_code)
    if torch.cuda.is_available():
        loaded = loaded.to("cuda")
    loaded.eval()
    switches = run_switches(adapter_dir or Path(base), recipe) if adapter_dir or Path(base).is_dir() else {}
    return ChatModel(
        loaded,
        tokenizer,
        family,
        stop_token_ids(tokenizer, family),
        name=str(adapter_dir or base),
        template_kwargs=check_switches(switches, family, f"{adapter_dir or base}/{RUN_FACTS}: chat_template_kwargs"),
    )


RUN_FACTS = "run.json"  # what train.py writes beside its result (glm_sft.run.Run.facts); exports carry it


def read_run_facts(folder) -> dict:
    """The run.json train.py wrote with a result (rows used, steps, final losses, the switches it answers with): in
    the folder or, for a checkpoint-N, in the run's output_dir; {} for other models and for results of older
    versions."""
    for candidate in (Path(folder), Path(folder).parent):
        path = candidate / RUN_FACTS
        if path.is_file():
            try:
                facts = json.loads(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                return {}
            return facts if isinstance(facts, dict) else {}
    return {}


def run_switches(folder, recipe: dict | None = None) -> dict:
    """The template switches a train.py result answers with unless told otherwise: what its run recorded
    (run.json), else the chat_template_kwargs of its recipe (a checkpoint saved before the run ended)."""
    facts = read_run_facts(folder)
    if "chat_template_kwargs" in facts:
        return facts["chat_template_kwargs"]
    return dict((recipe or {}).get("chat_template_kwargs") or {})


def adapter_base(adapter_dir: Path) -> str | None:
    """The base model an adapter directory names; a clear error when the directory is not an adapter."""
    if not adapter_dir.exists():
        raise UserError(f"{adapter_dir}: no such adapter directory")
    config = adapter_dir / "adapter_config.json"
    if not config.is_file():
        raise UserError(
            f"{adapter_dir}: not an adapter directory (no adapter_config.json); use --model for full models"
        )
    return json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")


def add_model_arguments(parser) -> None:
    """--model/--adapter/--template/--trust_remote_code: the arguments load_from_arguments reads (every script that
    talks to a model takes them)."""
    parser.add_argument("--model", help="base or fully fine-tuned model: directory, hub id or builtin:tiny-glm4")
    parser.add_argument("--adapter", help="adapter directory written by train.py (it knows its base model)")
    parser.add_argument(
        "--template", default=None, help="auto or a family such as glm47 (default: the run's, else detected)"
    )
    parser.add_argument("--trust_remote_code", "--trust-remote-code", action="store_true")
    parser.add_argument(
        "--chat_template_kwargs",
        "--chat-template-kwargs",
        type=json_object,
        default=None,
        help='the template\'s switches as JSON, e.g. \'{"reasoning_effort": "high"}\' (enable_thinking, '
        "clear_thinking, reasoning_effort; default: those the run trained with, from its run.json)",
    )


def json_object(text: str) -> dict:
    """argparse type of a flag that takes a JSON object."""
    import argparse

    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"enable_thinking\": false}}': {text!r}")
    return value


def add_tool_arguments(parser) -> None:
    """--tools/--tool_results for the scripts that let a model call functions (chat_cli, webchat)."""
    parser.add_argument("--tools", help="JSON file with the function definitions the model may call (a list)")
    parser.add_argument("--tool_results", "--tool-results", help="JSON file {function name: result} for the calls")


def check_model_arguments(parser, args) -> None:
    """The checks of add_model_arguments' flags and, where a script has them, of the generation and tool flags."""
    if not args.model and not args.adapter:
        parser.error("give --model DIR, --adapter DIR, or both")
    if getattr(args, "tool_results", None) and not getattr(args, "tools", None):
        parser.error("--tool_results needs --tools")
    if getattr(args, "max_new_tokens", 1) < 1:
        parser.error("--max_new_tokens must be at least 1")
    if not 0 <= getattr(args, "temperature", 0) <= 2:
        parser.error("--temperature must be between 0 (greedy) and 2")
    if not 0 < getattr(args, "top_p", 1) <= 1:
        parser.error("--top_p must be above 0 and at most 1")


def load_from_arguments(args) -> ChatModel:
    chat = load_chat_model(args.model, args.adapter, template=args.template, trust_remote_code=args.trust_remote_code)
    given = check_switches(args.chat_template_kwargs, chat.family, "--chat_template_kwargs")
    chat.template_kwargs.update(given)  # over the run's own
    return chat


def switches_lines(facts: dict) -> list[str]:
    """A model card's lines on what the run's replies held of reasoning and the template switches the model answers
    with (run.json); none for a result of an older version."""
    if "chat_template_kwargs" not in facts:
        return []
    switches = ", ".join(f"`{key}={json.dumps(value)}`" for key, value in facts["chat_template_kwargs"].items())
    return [
        f"- reasoning in the trained replies: {facts.get('reasoning', 'not recorded')}",
        f"- template switches it answers with by default: {switches or 'none'}",
    ]


def switches_note(facts: dict) -> list[str]:
    """A model card's note on serving a model that answers with template switches (none when it has none)."""
    switches = facts.get("chat_template_kwargs")
    if not switches:
        return []
    return [
        "It answers as it trained with the template switches above: glm-sft's chat_cli, serve.py and webchat.py pass "
        "them by themselves (run.json); with vLLM, `transformers serve` or another OpenAI-compatible server, send "
        f'`"chat_template_kwargs": {json.dumps(switches)}` with each request.',
        "",
    ]
