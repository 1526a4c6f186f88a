"""serve.py's in-flight batching (--max_batch_size above 1): requests that arrive together are generated together, and
each gets exactly the reply it gets alone (greedy text, streamed pieces, finish reason, usage; a seed's sample), with
stop strings, tool requests and a thinking family's reasoning; a client that leaves stops its own reply only; a model
whose cache cannot be shared is answered one at a time.

uvicorn on a free loopback port in this process (one per model), driven by the official openai client.
"""

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_serve import TOOLS, user

import serve
from glm_sft.inference import load_chat_model
from glm_sft.serving.batching import BatchingWorker

QUESTIONS = [
    "你好",
    "你是谁？",
    "请详细介绍一下你自己，越长越好。",
    "1+1=?",
    "写一首关于秋天的诗",
    "谢谢",
    "hello",
    "翻译",
]
MAX_BATCH_SIZE = 8


class LiveServer:
    """uvicorn serving `chat` with in-flight batching, in a thread of this process."""

    def __init__(self, chat):
        import uvicorn

        self.chat = chat
        self.app = serve.create_app(chat, max_batch_size=MAX_BATCH_SIZE, temperature=0)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started and time.monotonic() < deadline and self.thread.is_alive():
            time.sleep(0.05)
        assert self.server.started, "uvicorn did not start"
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1"
        from openai import OpenAI

        self.client = OpenAI(base_url=self.url, api_key="none", max_retries=0, timeout=120)

    @property
    def worker(self):
        return self.app.state.worker

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def ask(self, body: dict) -> dict:
        """What a request gets, whole or streamed, in one shape: content, reasoning, calls, finish reason, usage."""
        body = {"model": "tiny", **body}
        if not body.get("stream"):
            completion = self.client.chat.completions.create(**body)
            message, choice = completion.choices[0].message, completion.choices[0]
            calls = [(call.function.name, call.function.arguments) for call in message.tool_calls or []]
            reasoning = getattr(message, "reasoning_content", None) or ""
            return {"content": message.content or "", "reasoning": reasoning, "calls": calls,
                    "finish_reason": choice.finish_reason, "usage": completion.usage.completion_tokens}  # fmt: skip
        chunks = list(self.client.chat.completions.create(**body, stream_options={"include_usage": True}))
        deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
        calls = [(call.function.name, call.function.arguments) for delta in deltas for call in delta.tool_calls or []]
        return {
            "content": "".join(delta.content or "" for delta in deltas),
            "reasoning": "".join(getattr(delta, "reasoning_content", None) or "" for delta in deltas),
            "calls": calls,
            "finish_reason": chunks[-2].choices[0].finish_reason,
            "usage": chunks[-1].usage.completion_tokens,
        }

    def ask_together(self, bodies: list[dict]) -> list[dict]:
        """The requests sent all at once (they wait at a barrier); asserts that several were generated together."""
        barrier = threading.Barrier(len(bodies))
        self.worker.most_rows = 0

        def send(body):
            barrier.wait(timeout=60)
            return self.ask(body)

        with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
            replies = list(pool.map(send, bodies, timeout=300))
        assert self.worker.most_rows >= 4, "the requests were not generated together"
        return replies


@pytest.fixture(scope="module")
def servers():
    started = {}

    def serving(name):
        if name not in started:
            started[name] = LiveServer(load_chat_model(name))
        return started[name]

    yield serving
    for server in started.values():
        server.stop()


def greedy_bodies():
    """Eight greedy requests: prompts and reply lengths all different, half of them streamed."""
    return [
        {"messages": [user(question)], "temperature": 0, "max_tokens": 24 + 6 * number, "stream": bool(number % 2)}
        for number, question in enumerate(QUESTIONS)
    ]


@pytest.mark.parametrize("model", ["builtin:tiny-glm4", "builtin:tiny-glmz1"])  # GLM-Z1: reasoning apart
def test_concurrent_greedy_requests_each_get_the_reply_they_get_alone(servers, model):
    server = servers(model)
    assert isinstance(server.worker, BatchingWorker) and server.worker.problem is None
    bodies = greedy_bodies()
    server.worker.most_rows = 0
    alone = [server.ask(body) for body in bodies]
    assert server.worker.most_rows == 1
    together = server.ask_together(bodies)
    assert together == alone
    # and alone is what the one-at-a-time path (chat_cli's, model.generate) writes
    for body, reply in zip(bodies, alone, strict=True):
        parts = list(server.chat.stream_parts(list(body["messages"]), max_new_tokens=body["max_tokens"]))
        assert reply["content"] == "".join(piece for kind, piece in parts if kind == "answer")
        assert reply["reasoning"] == "".join(piece for kind, piece in parts if kind == "reasoning")
    written = {(reply["reasoning"], reply["content"]) for reply in alone}
    assert len(written) == len(bodies)  # different replies, so a mix-up would show
    if model == "builtin:tiny-glmz1":  # untrained, it thinks all along
        assert all(reply["reasoning"] for reply in alone)


def test_stop_strings_tools_and_seeds_in_one_batch(servers):
    """Greedy, stop strings, tools, and seeded samples side by side: each gets its reply alone; the same seed the same
    sample, another seed another."""
    server = servers("builtin:tiny-glm4")
    reference = server.ask({"messages": [user("你好")], "temperature": 0, "max_tokens": 60})["content"]
    stop = reference[20:22]
    sampled = {"messages": [user("你是谁？")], "temperature": 1.0, "top_p": 0.9, "max_tokens": 50}
    bodies = [
        {"messages": [user("你好")], "temperature": 0, "max_tokens": 60, "stop": [stop, "never"]},
        {"messages": [user("你好")], "temperature": 0, "max_tokens": 60, "stop": stop, "stream": True},
        {"messages": [user("北京天气怎么样？")], "temperature": 0, "max_tokens": 50, "tools": TOOLS},
        {"messages": [user("北京天气怎么样？")], "temperature": 0, "max_tokens": 50, "tools": TOOLS, "stream": True},
        {**sampled, "seed": 7},
        {**sampled, "seed": 7, "stream": True},
        {**sampled, "seed": 8},
        {"messages": [user("写一首关于秋天的诗")], "temperature": 0, "max_tokens": 70},
    ]
    alone = [server.ask(body) for body in bodies]
    together = server.ask_together(bodies)
    assert together == alone
    assert alone[0]["content"] == reference[: reference.index(stop)].rstrip() and alone[0]["finish_reason"] == "stop"
    assert alone[4]["content"] == alone[5]["content"] != alone[6]["content"]


def test_a_client_leaving_mid_stream_stops_its_reply_only(servers, capfd):
    import httpx

    server = servers("builtin:tiny-glm4")
    bodies = [{"messages": [user(question)], "temperature": 0, "max_tokens": 150} for question in QUESTIONS[:4]]
    alone = [server.ask(body) for body in bodies[1:]]
    first_pieces = threading.Barrier(len(bodies))

    def leave_after_the_first_piece():
        with httpx.stream("POST", f"{server.url}/chat/completions", json={**bodies[0], "stream": True}) as response:
            lines = (line for line in response.iter_lines() if line.startswith("data: "))
            next(lines), next(lines)  # the role, then a first piece
            first_pieces.wait(timeout=60)  # the others are generating too: then hang up

    def stay(body):
        chunks = server.client.chat.completions.create(model="tiny", **body, stream=True)
        pieces = []
        for chunk in chunks:
            pieces.append(chunk.choices[0].delta.content or "")
            if len(pieces) == 2:
                first_pieces.wait(timeout=60)
        return "".join(pieces)

    server.worker.most_rows = 0
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        leaving = pool.submit(leave_after_the_first_piece)
        staying = [pool.submit(stay, body) for body in bodies[1:]]
        leaving.result(timeout=120)
        assert [future.result(timeout=120) for future in staying] == [reply["content"] for reply in alone]
    assert server.worker.most_rows == len(bodies)
    stopped = re.search(r"a client left mid-reply: stopped after (\d+) of 150 tokens", capfd.readouterr().err)
    assert stopped and int(stopped.group(1)) < 150
    follow_up = server.ask({"messages": [user("你好")], "max_tokens": 2})
    assert follow_up["usage"] == 2


def test_a_model_whose_cache_cannot_be_shared_is_answered_one_at_a_time(capfd):
    """GLM-5's attention keeps an indexer cache beside the keys and values: its requests are answered in turn."""
    from fastapi.testclient import TestClient

    chat = load_chat_model("builtin:tiny-glm5")
    app = serve.create_app(chat, max_batch_size=MAX_BATCH_SIZE)
    assert "its cache (DynamicIndexedLayer) cannot be padded and shared" in app.state.worker.problem
    assert "note: replies are generated one at a time: its cache (DynamicIndexedLayer)" in capfd.readouterr().err
    with TestClient(app) as client:
        body = {"messages": [user("你好")], "temperature": 0, "max_tokens": 5}
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 5


def test_batch_size_and_shutdown_timeout_flags():
    args = serve.parse_args(["--adapter", "output/demo"])
    assert (args.max_batch_size, args.shutdown_timeout) == (serve.DEFAULT_MAX_BATCH_SIZE, 30)
    args = serve.parse_args(["--adapter", "output/demo", "--max-batch-size", "1", "--shutdown-timeout", "0"])
    assert (args.max_batch_size, args.shutdown_timeout) == (1, 0)
    for flag, value in (("--max_batch_size", "0"), ("--shutdown_timeout", "-1"), ("--shutdown_timeout", "inf")):
        with pytest.raises(SystemExit):
            serve.parse_args(["--adapter", "output/demo", flag, value])
