"""In-flight batching: with --max_batch_size above 1, the model's thread generates the replies of the requests waiting
together, a token of each in one forward pass. A request joins the running batch between two steps (its prompt
prefilled alone, as model.generate prefills it) and leaves it when its reply ends; each reply is the one its request
gets alone (see BatchingWorker). A model that cannot share a batch (batching_problem) is answered one at a time.
"""

import queue
import sys
import threading
import traceback
from dataclasses import dataclass

from glm_sft.inference import cut_at_stop
from glm_sft.replies import ReasoningStream, call_or_text
from glm_sft.serving.worker import Job, ModelWorker, ReplyEvents, generation_failed


class BatchingWorker(ModelWorker):
    """The model thread of in-flight batching: up to `max_batch_size` replies are generated together, one token of
    each per forward pass. Between two steps the requests waiting join (each prompt prefilled alone, as generate
    would), and the replies that ended leave. Each reply is the one its request gets alone: the same prompt, the
    same logits processors as model.generate, the same greedy tokens (padding is masked, positions are each row's own);
    a sampled reply draws from a generator of its own, seeded by its `seed`."""

    def __init__(self, chat, max_batch_size: int):
        self.max_batch_size = max_batch_size
        self.most_rows = 0  # the most replies generated together so far
        self.rules = GenerationRules(chat)
        self.problem: str | None = None  # why this model cannot batch (see batching_problem): one at a time then
        self.checked = threading.Event()
        super().__init__(chat)
        self.checked.wait()

    def run(self) -> None:
        import torch

        # The check runs the model, so in the model thread: on a small CPU, a model that has run in another thread
        # (whose OpenMP threads then keep cores busy) runs about half as fast.
        with torch.no_grad():
            try:
                self.problem = batching_problem(self.chat)
            finally:
                self.checked.set()
            if self.problem:
                print(f"note: replies are generated one at a time: {self.problem}", file=sys.stderr, flush=True)
                super().serve_jobs()
            else:
                self.serve_jobs()

    def serve_jobs(self) -> None:
        batch = RunningBatch(self.chat.model)
        rows: list[Row] = []
        while True:
            waiting = self.take_jobs(block=not rows, room=self.max_batch_size - len(rows))
            if None in waiting:  # close(): every job was stopped
                return
            rows += [row for job in waiting if (row := self.start(job, batch)) is not None]
            rows = self.drop_ended(rows, batch)
            if not rows:
                continue
            self.most_rows = max(self.most_rows, len(rows))
            try:
                logits = batch.step([row.ids[-1] for row in rows])
                for index, token in enumerate(self.next_tokens(rows, logits)):
                    rows[index].take(token)
            except Exception:  # a bug (or out of memory): these replies fail, the server goes on
                traceback.print_exc()
                for row in rows:
                    row.job.emit("error", generation_failed())
                batch.keep([])
                rows = []

    @staticmethod
    def next_tokens(rows: list["Row"], logits) -> list[int]:
        """Each row's next token: greedy rows without processors all at once, the sampled rows of the same settings
        and no seed in one call, the others each on its own."""
        tokens = logits.float().argmax(-1).tolist()
        shared: dict[Decoding, list[int]] = {}
        for index, row in enumerate(rows):
            if row.shares_sampling:
                shared.setdefault(row.decoding, []).append(index)
            elif row.chooses:
                tokens[index] = row.choose(logits[index])
        for decoding, indexes in shared.items():
            for index, token in zip(indexes, decoding.sample(logits[indexes]), strict=True):
                tokens[index] = token
        return tokens

    def take_jobs(self, block: bool, room: int) -> list:
        """The jobs waiting, up to `room` (None in the list: the worker is closing); waits for one when `block`."""
        taken = []
        while len(taken) < room:
            try:
                job = self.jobs.get(block=block and not taken)
            except queue.Empty:
                break
            taken.append(job)
            if job is None:
                break
        return taken

    def start(self, job: Job, batch: "RunningBatch") -> "Row | None":
        """Begin a job: its prompt prefilled into the batch, its first token taken."""
        if not job.begin():
            return None
        job.emit("started", job.prompt.tokens)
        rows_before = batch.rows
        try:
            row = Row(job, self.chat, self.rules)
            logits = batch.add(row.prompt_ids)
            row.take(row.choose(logits[0]))
            return row
        except Exception:  # a bug (or out of memory): this reply fails, the others go on
            traceback.print_exc()
            if batch.rows > rows_before:
                batch.keep(list(range(rows_before)))
            job.emit("error", generation_failed())
            return None

    @staticmethod
    def drop_ended(rows: list["Row"], batch: "RunningBatch") -> list["Row"]:
        """The rows still generating; those whose reply ended (or whose client left) leave the batch."""
        kept = []
        for index, row in enumerate(rows):
            if not row.ended and row.job.cancelled.is_set():
                row.job.report_stop(len(row.ids))
                row.ended = True
            if not row.ended:
                kept.append(index)
        if len(kept) < len(rows):
            batch.keep(kept)
        return [rows[index] for index in kept]


class Row:
    """One reply in the batch: its tokens, how the next is chosen, and the reply on its way to the client (decoded
    piece by piece as ChatModel.stream_parts decodes it, or, with tools, read whole as call_or_text reads it)."""

    def __init__(self, job: Job, chat, rules: "GenerationRules"):
        import torch
        from transformers import TextStreamer

        request = job.request
        self.job, self.chat = job, chat
        self.prompt_ids = job.prompt.ids
        self.ids: list[int] = []  # generated so far, the end-of-turn token included
        self.ended = False
        self.stop_ids = set(chat.stop_ids)
        self.decoding = rules.for_request(request.temperature, request.top_p)
        self.generator = None  # a seed's own: the same seed, the same sample, whatever else is in the batch
        if self.decoding.sampling and request.seed is not None:
            self.generator = torch.Generator(device=chat.model.device).manual_seed(request.seed)
        # sampled from the global generator, in one call with the other rows of the same settings
        self.shares_sampling = self.decoding.sampling and self.decoding.reads_logits_only and self.generator is None
        self.chooses = self.decoding.sampling or len(self.decoding.processors) > 0  # else the batch's greedy token
        self.reply = ReplyEvents(job)
        self.whole = request.parse_calls  # a reply that may be a call is read whole
        if not self.whole:
            self.pieces: list[str] = []
            # TextStreamer's pieces, those stream_parts yields, collected instead of printed. A thinking family's
            # <think> and </think> may be special tokens: kept, to tell the reasoning apart.
            self.decoder = TextStreamer(chat.tokenizer, skip_special_tokens=not chat.thinks)
            self.decoder.on_finalized_text = lambda text, stream_end=False: self.pieces.append(text)
            self.parts = ReasoningStream(thinking=chat.thinks)
            self.send(self.parts.feed(chat.opening(self.prompt_ids)))

    def choose(self, logits) -> int:
        """The next token from this row's logits: model.generate's processors, then greedy or a sample."""
        import torch

        decoding = self.decoding
        if decoding.sampling and decoding.reads_logits_only:
            return decoding.sample(logits.unsqueeze(0), self.generator)[0]
        scores = logits.float().unsqueeze(0)
        if len(decoding.processors):
            input_ids = torch.tensor([self.prompt_ids + self.ids], device=logits.device)
            scores = decoding.processors(input_ids, scores)
        if not decoding.sampling:
            return int(scores.argmax(-1))
        return int(torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=self.generator))

    def take(self, token: int) -> None:
        """Add the token chosen; pass on the text it completes; end the reply at an end-of-turn token, a stop
        string or max_new_tokens."""
        import torch

        self.ids.append(token)
        stop_token = token in self.stop_ids
        if not self.whole:
            self.decoder.put(torch.tensor([] if stop_token else [token], dtype=torch.long))  # as stream_parts filters
            if self.send(self.decoded_parts()):
                self.end()
                return
        if stop_token or len(self.ids) >= self.job.prompt.max_new_tokens:
            self.end()

    def decoded_parts(self):
        """The reasoning and answer parts of the pieces decoded since the last call."""
        pieces, self.pieces = self.pieces, []
        for piece in pieces:
            yield from self.parts.feed(piece)

    def send(self, parts) -> bool:
        """Pass parts on until a stop string ends the answer; True once one has."""
        return any(self.reply.part(kind, piece) for kind, piece in parts)

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        new_ids = cut_at_stop(self.ids, self.stop_ids)
        usage = {
            "prompt_tokens": len(self.prompt_ids),
            "completion_tokens": len(self.ids),
            "finish_reason": "length" if len(new_ids) == len(self.ids) >= self.job.prompt.max_new_tokens else "stop",
        }
        if self.whole:
            raw = self.chat.opening(self.prompt_ids) + self.chat.tokenizer.decode(new_ids, skip_special_tokens=False)
            reply = call_or_text(WrittenReply(self.chat.family, raw), [], self.job.request.tools)
            self.reply.parsed(reply, usage)
        elif not self.reply.text.stopped:
            self.decoder.end()
            if not self.send(self.decoded_parts()):
                self.send(self.parts.finish())
        self.reply.done(usage)


@dataclass
class WrittenReply:
    """A reply generated already, in the shape call_or_text reads a model from: so a reply read whole in the batch is
    read as the one-at-a-time path reads it (its calls, or its text, with a warning when its calls cannot be read)."""

    family: str
    text: str

    def raw_reply(self, messages: list[dict], **settings) -> str:
        return self.text


@dataclass(eq=False)
class Decoding:
    """How the next token of a request is chosen: model.generate's logits processors, then greedy or a sample."""

    processors: object  # a LogitsProcessorList, empty for plain greedy decoding
    sampling: bool
    reads_logits_only: bool  # temperature, top-k, top-p, min-p: rows with the same settings share one call

    def sample(self, logits, generator=None) -> list[int]:
        """Sampled tokens for rows of logits ([rows, vocab]) whose processors read the logits only."""
        import torch

        scores = self.processors(torch.empty(len(logits), 0, dtype=torch.long, device=logits.device), logits.float())
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=generator)[:, 0].tolist()


class GenerationRules:
    """model.generate's logits processors for a request's settings, as generate builds them (the model's generation
    config under the request's temperature and top_p, the family's stop ids): none for plain greedy decoding."""

    def __init__(self, chat):
        self.chat = chat
        self.known: dict[tuple[float, float], Decoding] = {}

    def for_request(self, temperature: float, top_p: float) -> Decoding:
        from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        key = (temperature, top_p) if temperature > 0 else (0.0, 1.0)
        if key not in self.known:
            if len(self.known) >= 64:  # requests may send any number of settings
                self.known.clear()
            chat = self.chat
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {}
            config, _ = chat.model._prepare_generation_config(
                None,
                eos_token_id=chat.stop_ids,
                pad_token_id=chat.tokenizer.pad_token_id,
                **(sampling or {"do_sample": False}),
            )
            # What generate applies to each step's logits; transformers' own continuous batching builds them alike.
            processors = chat.model._get_logits_processor(config)
            warpers = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper)
            reads_logits_only = all(isinstance(processor, warpers) for processor in processors)
            self.known[key] = Decoding(processors, temperature > 0, reads_logits_only)
        return self.known[key]


class BatchingUnsupported(Exception):
    """The model's cache cannot be shared by rows of different lengths."""


class RunningBatch:
    """The rows generating together and their one key/value cache: each row's cache is left-padded to the longest,
    the padding masked, and each row given its own positions, so one forward pass takes the next token of every row.
    A row joins with its prompt's cache (prefilled alone, as model.generate prefills it) and leaves when its reply
    ends; the padding that every row left has on its left is cut away."""

    def __init__(self, model):
        import inspect

        self.model = model
        self.cache = None
        self.mask = None  # [rows, length]: 1 for a token, 0 for padding
        self.padded = False
        self.positions: list[int] = []  # each row's next position: its tokens so far
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model's own forward
        keeps = "logits_to_keep" in inspect.signature(base.forward).parameters
        self.only_last = {"logits_to_keep": 1} if keeps else {}  # as generate asks: the last position's logits

    @property
    def rows(self) -> int:
        return len(self.positions)

    def add(self, prompt_ids: list[int]):
        """Prefill a row's prompt and let it join; returns its next-token logits ([1, vocab])."""
        import torch
        from transformers.cache_utils import DynamicLayer

        device = self.model.device
        input_ids = torch.tensor([prompt_ids], device=device)
        positions = torch.arange(len(prompt_ids), device=device).unsqueeze(0)
        output = self.model(input_ids=input_ids, position_ids=positions, use_cache=True, **self.only_last)
        cache = output.past_key_values
        layers = getattr(cache, "layers", None)
        if not layers or any(type(layer) is not DynamicLayer for layer in layers):
            kinds = sorted({type(layer).__name__ for layer in layers or []}) or [type(cache).__name__]
            raise BatchingUnsupported(f"its cache ({', '.join(kinds)}) cannot be padded and shared")
        length = len(prompt_ids)
        if self.cache is None:
            self.cache, self.mask = cache, torch.ones(1, length, dtype=torch.long, device=device)
        else:  # the new tensors first, then all at once: a failure leaves the batch as it was
            width = max(self.mask.shape[1], length)
            joined = [
                (
                    torch.cat([left_pad(mine.keys, width), left_pad(joining.keys, width)]),
                    torch.cat([left_pad(mine.values, width), left_pad(joining.values, width)]),
                )
                for mine, joining in zip(self.cache.layers, layers, strict=True)
            ]
            mask = torch.zeros(self.rows + 1, width, dtype=torch.long, device=device)
            mask[:-1, width - self.mask.shape[1] :] = self.mask
            mask[-1, width - length :] = 1
            for layer, (keys, values) in zip(self.cache.layers, joined, strict=True):
                layer.keys, layer.values = keys, values
            self.mask, self.padded = mask, bool((mask == 0).any())
        self.positions.append(length)
        return output.logits[:, -1]

    def step(self, tokens: list[int]):
        """One forward pass: each row's last token in; each row's next-token logits out ([rows, vocab])."""
        import torch

        device = self.model.device
        mask = torch.cat([self.mask, torch.ones(self.rows, 1, dtype=torch.long, device=device)], dim=1)
        output = self.model(
            input_ids=torch.tensor(tokens, device=device).unsqueeze(1),
            attention_mask=mask if self.padded else None,  # no padding: no mask, as generate drops an all-ones mask
            position_ids=torch.tensor(self.positions, device=device).unsqueeze(1),
            past_key_values=self.cache,
            use_cache=True,
            **self.only_last,
        )
        self.mask = mask
        self.positions = [position + 1 for position in self.positions]
        return output.logits[:, -1]

    def keep(self, indexes: list[int]) -> None:
        """Keep only these rows (in this order)."""
        import torch

        if not indexes:
            self.cache, self.mask, self.padded, self.positions = None, None, False, []
            return
        rows = torch.tensor(indexes, dtype=torch.long, device=self.mask.device)
        mask = self.mask[rows]
        shared_padding = int((mask.cumsum(dim=1) == 0).sum(dim=1).min())
        self.mask = mask[:, shared_padding:]
        self.padded = bool((self.mask == 0).any())
        self.positions = [self.positions[index] for index in indexes]
        for layer in self.cache.layers:
            layer.keys = layer.keys[rows, :, shared_padding:]
            layer.values = layer.values[rows, :, shared_padding:]


def left_pad(states, width: int):
    """Cached keys or values ([rows, heads, length, dim]) with zeros on the left up to `width` positions."""
    import torch

    missing = width - states.shape[-2]
    if missing == 0:
        return states
    return torch.cat([states.new_zeros(*states.shape[:-2], missing, states.shape[-1]), states], dim=-2)


PROBE_TOKENS = 4


def batching_problem(chat) -> str | None:
    """Why this model's replies cannot be generated together (None: they can). A prefix-tuning adapter keeps virtual
    tokens in the cache; a cache other than the plain dynamic one (GLM-5's indexer) cannot be padded; and, the last
    check, two prompts of different lengths generated together must give the greedy tokens each gives alone."""
    import torch

    peft_config = getattr(chat.model, "active_peft_config", None)
    if getattr(peft_config, "is_prompt_learning", False):
        return "its adapter (P-Tuning v2, prefix tuning) keeps virtual tokens in the cache"
    questions = ("你好", "请用三句话介绍一下你自己。")
    prompts = [chat.prompt_ids([{"role": "user", "content": question}])[0] for question in questions]
    stops = set(chat.stop_ids)
    try:
        with torch.no_grad():
            alone = []
            for ids in prompts:
                input_ids = torch.tensor([ids], device=chat.model.device)
                output = chat.model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=PROBE_TOKENS,
                    do_sample=False,
                    eos_token_id=chat.stop_ids,
                    pad_token_id=chat.tokenizer.pad_token_id,
                )
                alone.append(output[0, len(ids) :].tolist())
            batch = RunningBatch(chat.model)
            together, live = [], []  # live: the rows in the batch (indexes into together), in its order
            for ids in prompts + [None] * PROBE_TOKENS:  # the second prompt joins after the first's first step
                if ids is not None:
                    together.append([int(batch.add(ids)[0].float().argmax())])
                    live.append(len(together) - 1)
                kept = [
                    index
                    for index, row in enumerate(live)
                    if len(together[row]) < PROBE_TOKENS and together[row][-1] not in stops
                ]
                if len(kept) < len(live):
                    batch.keep(kept)
                    live = [live[index] for index in kept]
                if live:
                    logits = batch.step([together[row][-1] for row in live])
                    for index, row in enumerate(live):
                        together[row].append(int(logits[index].float().argmax()))
    except BatchingUnsupported as error:
        return str(error)
    except Exception as error:  # an architecture whose forward does not take a shared cache
        return f"generating two replies together failed ({type(error).__name__}: {error})"
    if together != alone:
        return "replies generated together were not those generated alone"
    return None
