"""The model's thread: one thread owns the model and its tokenizer, and answers the requests one at a time, in the
order they came, through ChatModel.stream_parts (or glm_sft.replies.call_or_text for a request with tools). A reply
reaches the event loop as events on its Job's queue. glm_sft.serving.batching generates several replies together.
"""

import asyncio
import contextlib
import queue
import sys
import threading
import traceback
from dataclasses import dataclass

from glm_sft.replies import call_or_text, partial_tag_length
from glm_sft.serving.requests import ChatRequest, Prompt, RequestError


class ReplyText:
    """Pieces of a streamed reply, passed on as they may be sent: cut at the first stop string (a piece that could
    be the start of one is held back until it is known not to be) and without the trailing whitespace, which is
    sent only once more text follows. So the streamed pieces join to exactly the non-streamed reply."""

    def __init__(self, stop_strings: list[str]):
        self.stop_strings = stop_strings
        self.held = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self.held + piece
        found = [text.find(stop) for stop in self.stop_strings if stop in text]
        if found:
            self.stopped, self.held = True, ""
            return text[: min(found)].rstrip()
        partial = max((partial_tag_length(text, stop) for stop in self.stop_strings), default=0)
        cut = len(text[: len(text) - partial].rstrip())
        self.held = text[cut:]
        return text[:cut]

    def finish(self) -> str:
        """What was held back, once the reply has ended: the start of a stop string that never came, not the
        trailing whitespace."""
        held, self.held = self.held, ""
        return "" if self.stopped else held.rstrip()


@dataclass
class Event:
    kind: str  # "started" (prompt_tokens), "text" / "reasoning" (a piece), "call" (name, arguments), "done", "error"
    value: object = None


def shutting_down(message: str) -> RequestError:
    return RequestError(message, status=503, code="server_shutting_down")


def generation_failed() -> RequestError:  # a bug, not the request: the traceback is in the log
    return RequestError("the server failed to generate a reply; see its log", status=500)


class Job:
    """One request on its way through the worker; its events arrive on the event loop's queue. It waits in the queue
    until the model thread begins it; a job refused before that never reaches the model."""

    def __init__(self, request: ChatRequest, prompt: Prompt, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.prompt = prompt
        self.loop = loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()  # the client went away, or the server cut it: generation stops
        self.begun = False
        self.cut_at_shutdown = False
        self._lock = threading.Lock()  # begin (the model thread) against refuse (the event loop)

    def emit(self, kind: str, value=None) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody is listening
            self.loop.call_soon_threadsafe(self.events.put_nowait, Event(kind, value))

    def begin(self) -> bool:
        """The model thread takes the job: False when it was refused (or its client left) while it waited."""
        with self._lock:
            self.begun = not self.cancelled.is_set()
            return self.begun

    def refuse(self, error: RequestError) -> bool:
        """Answer a job that has not begun with `error` (on the event loop); False when it has begun."""
        with self._lock:
            if self.begun:
                return False
            self.cancelled.set()
        self.events.put_nowait(Event("error", error))
        return True

    def cut(self, error: RequestError) -> None:
        """End a job that has begun with `error` now (on the event loop); its generation stops at the next token."""
        self.cut_at_shutdown = True
        self.cancelled.set()
        self.events.put_nowait(Event("error", error))

    def report_stop(self, done: int) -> None:
        """Say in the log why a reply stopped before its end: its client left, or the server cut it."""
        why = "cut at shutdown" if self.cut_at_shutdown else "a client left mid-reply"
        print(f"{why}: stopped after {done} of {self.prompt.max_new_tokens} tokens", file=sys.stderr, flush=True)


class ReplyEvents:
    """A reply on its way to the client as events: the reasoning and the answer piece by piece, the answer cut at the
    first stop string (ReplyText); or, for a request with tools, the parsed reply: its calls, or text."""

    def __init__(self, job: Job):
        self.job = job
        self.text = ReplyText(job.request.stop)  # stop strings cut the answer, not the reasoning

    def part(self, kind: str, piece: str) -> bool:
        """Pass a ("reasoning" | "answer", piece) part on; True once a stop string has ended the answer."""
        if kind == "reasoning":
            self.job.emit("reasoning", piece)
        elif text := self.text.feed(piece):
            self.job.emit("text", text)
        return self.text.stopped

    def parsed(self, reply, usage: dict) -> None:
        """Pass a whole reply on, read by the family's parser (glm_sft.replies.Reply)."""
        if reply.reasoning:
            self.job.emit("reasoning", reply.reasoning)
        self.part("answer", reply.content)
        for call in reply.calls:
            self.job.emit("call", call)
        if reply.calls:
            usage["finish_reason"] = "tool_calls"

    def done(self, usage: dict) -> None:
        if text := self.text.finish():
            self.job.emit("text", text)
        if self.text.stopped and usage.get("finish_reason") != "tool_calls":
            usage["finish_reason"] = "stop"
        self.job.emit("done", usage)


class ModelWorker:
    """The one thread that touches the model and its tokenizer; jobs run one at a time, in the order they came.

    Shutdown (see begin_shutdown): the jobs still waiting are refused with a 503, those begun get a grace period."""

    def __init__(self, chat):
        self.chat = chat
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.open_jobs: set[Job] = set()  # submitted and not answered yet (used on the event loop only)
        self.closing = False
        self.grace_timer: asyncio.TimerHandle | None = None
        self.thread = threading.Thread(target=self.run, name="model-worker", daemon=True)  # joined by close()
        self.thread.start()

    def check_open(self) -> None:
        if self.closing:
            raise shutting_down("the server is shutting down and takes no new requests")

    def submit(self, request: ChatRequest, prompt: Prompt) -> Job:
        self.check_open()
        job = Job(request, prompt, asyncio.get_running_loop())
        self.open_jobs.add(job)
        self.jobs.put(job)
        return job

    def finish(self, job: Job) -> None:
        """The job's response has ended (answered, refused, or its client left): its generation stops."""
        job.cancelled.set()
        self.open_jobs.discard(job)

    def begin_shutdown(self, grace: float) -> None:
        """Stop taking requests: those waiting for the model get a 503 now, the replies being generated get `grace`
        seconds to finish, then end with an error (end_running). On the event loop."""
        if self.closing:
            return
        self.closing = True
        refusal = shutting_down("the server is shutting down: this request was not started; send it again")
        refused = sum(job.refuse(refusal) for job in list(self.open_jobs))
        running = sum(job.begun and not job.cancelled.is_set() for job in self.open_jobs)
        print(
            f"shutting down: {running} replies being written get up to {grace:g} s to finish; {refused} waiting "
            "requests refused (503)",
            file=sys.stderr,
            flush=True,
        )
        self.grace_timer = asyncio.get_running_loop().call_later(grace, self.end_running)

    def end_running(self) -> None:
        """End the replies still being generated with an error event (the grace period is over). On the event loop."""
        if not self.closing:  # a second signal before the shutdown began: it begins with no grace period
            return
        if self.grace_timer is not None:
            self.grace_timer.cancel()
        error = shutting_down("the server shut down before this reply was finished")
        running = [job for job in self.open_jobs if job.begun and not job.cancelled.is_set()]
        for job in running:
            job.cut(error)
        if running:
            print(f"shutdown: {len(running)} replies ended unfinished", file=sys.stderr, flush=True)

    def close(self, timeout: float = 120) -> bool:
        """Stop every job and the model thread (at its next token); True once the thread has ended. On the event loop
        (the app's shutdown), or after it has closed."""
        self.closing = True
        if self.thread.is_alive():
            for job in list(self.open_jobs):
                with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody is waiting
                    job.refuse(shutting_down("the server is shutting down"))
                job.cancelled.set()
            self.jobs.put(None)
            self.thread.join(timeout)
        return not self.thread.is_alive()

    def run(self) -> None:
        import torch

        with torch.no_grad():  # thread-local: set in the thread that generates
            self.serve_jobs()

    def serve_jobs(self) -> None:
        while (job := self.jobs.get()) is not None:
            if not job.begin():
                continue
            try:
                self.answer(job)
            except RequestError as error:
                job.emit("error", error)
            except Exception:  # a bug, not the request: report it, keep serving
                traceback.print_exc()
                job.emit("error", generation_failed())

    def answer(self, job: Job) -> None:
        import torch

        request, chat = job.request, self.chat
        messages = [dict(message) for message in request.messages]
        job.emit("started", job.prompt.tokens)
        if request.seed is not None:
            torch.manual_seed(request.seed)
        settings = dict(
            max_new_tokens=job.prompt.max_new_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            template_kwargs=request.template_kwargs,
            encoded=job.prompt.ids,  # generated from the ids the reader counted (it checked they fit)
        )
        usage = {}
        reply = ReplyEvents(job)
        if request.parse_calls:
            reply.parsed(call_or_text(chat, messages, request.tools, usage=usage, **settings), usage)
        else:
            stopped = False  # by the client or the server (stream_parts sets job.cancelled itself as it closes)
            parts = chat.stream_parts(messages, stop=job.cancelled, usage=usage, **settings)
            with contextlib.closing(parts) as pieces:
                for kind, piece in pieces:
                    stopped = job.cancelled.is_set()
                    if reply.part(kind, piece) or stopped:
                        break
            if stopped:
                job.report_stop(usage.get("completion_tokens", 0))
        reply.done(usage)
