"""serve.py's shutdown: on SIGTERM or SIGINT (Ctrl-C) it stops accepting, answers the requests still waiting for the
model with a 503, lets the streams being written finish within --shutdown_timeout and ends those still running then
with an OpenAI error event and `data: [DONE]` (never a cut connection), and exits cleanly: 0 after SIGTERM, 130 after
SIGINT, never an abort (`terminate called without an active exception`, exit -6).

`python serve.py` processes on free loopback ports, driven by the official openai client; five rounds, in one batch
and one at a time, to catch an abort that came in some runs only.
"""

import json
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
from conftest import REPO

# tiny-glm4's greedy reply to it ends by itself after 1357 tokens: a reply cut at 0.5 s or 1 s is cut mid-way.
QUESTION = [{"role": "user", "content": "继续"}]
LONG = 1900  # tokens (the context is 2048)
SHORT = 600  # tokens: a reply still running when the signal comes, and done well within 30 s


@dataclass
class Round:
    signals: list[int]
    max_batch_size: int  # the streams running at the signal; three more requests wait behind them
    shutdown_timeout: float
    max_tokens: int
    outcome: str  # what the running streams do: "complete" within the grace period, or "cut" with an error event
    exit_code: int


ROUNDS = [
    Round([signal.SIGTERM], 4, 30, SHORT, "complete", 0),
    Round([signal.SIGINT], 4, 0.5, LONG, "cut", 130),
    Round([signal.SIGTERM], 1, 0, LONG, "cut", 0),
    Round([signal.SIGINT], 1, 30, SHORT, "complete", 130),
    Round([signal.SIGINT, signal.SIGINT], 4, 30, LONG, "cut", 130),  # the second Ctrl-C ends the wait at once
]


@dataclass
class Stream:
    payloads: list[str] = field(default_factory=list)  # the `data:` payloads, in order
    first_piece: threading.Event = field(default_factory=threading.Event)
    last_at: float = 0.0  # when the last payload came


def start_servers(tmp_path, rounds):
    """A `python serve.py` per round, all started at once: [(process, log path, base URL)]."""
    started = []
    for number, round_ in enumerate(rounds):
        log_path = tmp_path / f"round{number}.log"
        args = ["--model", "builtin:tiny-glm4", "--port", "0", "--temperature", "0"]
        args += ["--max_batch_size", round_.max_batch_size, "--shutdown_timeout", round_.shutdown_timeout]
        with open(log_path, "w", encoding="utf-8") as log:
            process = subprocess.Popen(
                [sys.executable, "serve.py", *map(str, args)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT
            )
        started.append((process, log_path))
    servers = []
    for process, log_path in started:
        deadline = time.monotonic() + 120
        while not (url := re.search(r"^serving .* at (http://\S+)", log_path.read_text(), re.MULTILINE)):
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        servers.append((process, log_path, url[1]))
    return servers


def openai_client(url):
    from openai import OpenAI

    return OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)  # no retry: a 503 is what is tested


def stream(client, max_tokens, record: Stream) -> None:
    """A streamed completion read line by line through the openai client (so an error event is seen as sent)."""
    with client.chat.completions.with_streaming_response.create(
        model="tiny", messages=QUESTION, max_tokens=max_tokens, stream=True
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                record.payloads.append(line.removeprefix("data: "))
                record.last_at = time.monotonic()
                if '"content": "' in line and '"content": ""' not in line:
                    record.first_piece.set()


def refused(call) -> dict:
    """The OpenAI error (the body's "error") of a request the server refused with a 503."""
    import openai

    with pytest.raises(openai.InternalServerError) as raised:
        call()
    assert raised.value.status_code == 503
    return raised.value.body


@pytest.mark.slow  # servers in subprocesses, signalled again and again to catch an abort: about 20 s
def test_sigterm_and_sigint_mid_stream_end_every_reply_cleanly(tmp_path):
    servers = start_servers(tmp_path, ROUNDS)
    try:
        for number, (round_, (process, log_path, url)) in enumerate(zip(ROUNDS, servers, strict=True)):
            play_round(round_, process, url)
            log = log_path.read_text(encoding="utf-8")
            assert process.returncode == round_.exit_code, f"round {number}: exit {process.returncode}\n{log[-3000:]}"
            assert "terminate called" not in log and "Traceback" not in log, f"round {number}:\n{log[-3000:]}"
            assert "shutting down: " in log
    finally:
        for process, _, _ in servers:
            if process.poll() is None:
                process.kill()
                process.wait()


def play_round(round_: Round, process, url) -> None:
    client = openai_client(url)
    running = [Stream() for _ in range(round_.max_batch_size)]
    with ThreadPoolExecutor(max_workers=len(running) + 3) as pool:
        streams = [pool.submit(stream, client, round_.max_tokens, record) for record in running]
        for record in running:
            assert record.first_piece.wait(timeout=60), "a stream never started"
        waiting = [
            pool.submit(refused, lambda: stream(client, SHORT, Stream())),
            pool.submit(refused, lambda: stream(client, SHORT, Stream())),
            pool.submit(refused, lambda: client.chat.completions.create(model="tiny", messages=QUESTION)),
        ]
        time.sleep(0.4)  # the three requests reach the server and wait behind the running streams
        for number, sent in enumerate(round_.signals):
            if number:
                time.sleep(0.3)
            process.send_signal(sent)
        signalled = time.monotonic()
        for refusal in waiting:
            error = refusal.result(timeout=60)
            assert (error["type"], error["code"]) == ("server_error", "server_shutting_down"), error
            assert "was not started" in error["message"]
        for future in streams:
            future.result(timeout=120)  # an incomplete chunked read would raise here
    process.wait(timeout=60)

    for record in running:
        assert record.payloads[-1] == "[DONE]", record.payloads[-3:]
        last = json.loads(record.payloads[-2])
        assert record.last_at > signalled, "the stream had ended before the signal: nothing was tested"
        if round_.outcome == "complete":
            assert last["choices"][0]["finish_reason"] == "length", last
        else:
            error = last["error"]
            assert (error["type"], error["code"]) == ("server_error", "server_shutting_down"), last
            assert "shut down before this reply was finished" in error["message"]
            waited = record.last_at - signalled
            assert waited < round_.shutdown_timeout + 5, f"cut after {waited:.1f} s"
