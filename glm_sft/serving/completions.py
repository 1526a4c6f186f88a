"""A chat completion in the OpenAI API's shapes: the whole response, or the server-sent events of a streamed one,
written from the events of the reply as it is generated."""

import json
import time
import uuid

from glm_sft.serving.worker import Event, Job


class Completion:
    """One chat completion as it is generated, written out in the OpenAI API's shapes."""

    def __init__(self, model: str, prompt_tokens: int, thinking: bool = False):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.thinking = thinking  # a thinking family: the message carries reasoning_content (null when none)
        self.text = ""
        self.reasoning = ""
        self.calls = []

    def add(self, event: Event) -> dict:
        """Take a text or call event; returns the chunk delta that stands for it."""
        if event.kind == "call":
            function = {
                "name": event.value["name"],
                "arguments": json.dumps(event.value["arguments"], ensure_ascii=False),
            }
            call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": function}
            self.calls.append(call)
            return {"tool_calls": [{"index": len(self.calls) - 1, **call}]}
        if event.kind == "reasoning":
            self.reasoning += event.value
            return {"reasoning_content": event.value}
        self.text += event.value
        return {"content": event.value}

    def usage(self, generated: dict) -> dict:
        completion_tokens = generated.get("completion_tokens", 0)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def response(self, generated: dict) -> dict:
        message = {"role": "assistant", "content": (self.text or None) if self.calls else self.text}
        if self.thinking:
            message["reasoning_content"] = self.reasoning or None
        if self.calls:
            message["tool_calls"] = self.calls
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": generated["finish_reason"]}
        return {**self.head("chat.completion"), "choices": [choice], "usage": self.usage(generated)}

    def chunk(self, delta: dict, finish_reason=None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self.event({**self.head("chat.completion.chunk"), "choices": [choice]})

    @staticmethod
    def event(data) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def chunks(self, job: Job, include_usage: bool):
        """The server-sent events of a streamed completion: the role, each piece (or the call), the finish reason,
        the usage when asked for, then [DONE]."""
        yield self.chunk({"role": "assistant", "content": ""})
        while (event := await job.events.get()).kind not in ("done", "error"):
            if delta := self.add(event):
                yield self.chunk(delta)
        if event.kind == "error":
            yield self.event(event.value.body())
        else:
            yield self.chunk({}, event.value["finish_reason"])
            if include_usage:
                yield self.event(
                    {**self.head("chat.completion.chunk"), "choices": [], "usage": self.usage(event.value)}
                )
        yield "data: [DONE]\n\n"
