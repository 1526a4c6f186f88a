"""serve.py's bounds on its input: a body over --max_request_bytes gets a 413 before it is read (and a small request
beside it is answered), a prompt longer than the context is refused without waiting for the model, JSON the server
will not take (nested too deep, a huge integer, a lone surrogate, NaN), chat_template_kwargs beyond the template's
switches get a 400 with an OpenAI error body, and with an API key nothing but /health answers without it.

The app in this process: FastAPI's test client, and uvicorn on a free loopback port for the uploads (raw sockets, so
the test decides when each byte is sent).
"""

import dataclasses
import json
import select
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_serve import clients, post, tiny_chats, user  # noqa: F401

import serve
from glm_sft.serving.requests import parse_chat_request

LIMIT = 64 * 1024  # --max_request_bytes of the apps below (the default is 4 MiB)
SMALL = {"messages": [user("你好")], "temperature": 0, "max_tokens": 2}


def assert_openai_error(response_json, status_type="invalid_request_error"):
    error = response_json["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == status_type
    return error


# ---- a body over the limit, on a real server ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited_server(tiny_chats):  # noqa: F811
    """(host, port) of uvicorn serving tiny-glm4 with --max_request_bytes LIMIT, in this process."""
    import uvicorn

    app = serve.create_app(tiny_chats["builtin:tiny-glm4"], max_request_bytes=LIMIT)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield server.servers[0].sockets[0].getsockname()[:2]
    server.should_exit = True
    thread.join(timeout=30)


def request_head(port: int, **headers) -> bytes:
    lines = ["POST /v1/chat/completions HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def send_chunk(sock, data: bytes) -> None:
    sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")


def read_response(sock) -> tuple[int, dict]:
    """(status, JSON body) of the response on `sock`, read to the end of its Content-Length."""
    received = b""
    while b"\r\n\r\n" not in received:
        more = sock.recv(65536)
        assert more, "the connection closed before a response"
        received += more
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    length = next(int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length:"))
    while len(body) < length:
        more = sock.recv(65536)
        assert more, "the connection closed in the middle of the response"
        body += more
    return int(lines[0].split()[1]), json.loads(body)


def test_a_body_over_the_limit_is_refused_before_it_is_read_while_a_small_request_beside_it_is_answered(
    limited_server,
):
    import httpx

    host, port = limited_server
    # A Content-Length over the limit: the 413 comes before a byte of the 20 MB body is sent.
    with socket.create_connection((host, port), timeout=15) as sock:
        sock.sendall(request_head(port, Content_Length=20_000_000))
        status, body = read_response(sock)
    assert status == 413, body
    error = assert_openai_error(body)
    assert f"{LIMIT} bytes" in error["message"] and "--max_request_bytes" in error["message"]

    # A chunked upload (no Content-Length): while it is under way a small request is answered; once past the limit it
    # is refused, long before the 2 MB it would send.
    with socket.create_connection((host, port), timeout=15) as sock:
        sock.sendall(request_head(port, Transfer_Encoding="chunked"))
        sent = 0
        opening = b'{"messages": [{"role": "user", "content": "'
        send_chunk(sock, opening + b"x" * (LIMIT // 2))
        sent += len(opening) + LIMIT // 2
        small = httpx.post(f"http://{host}:{port}/v1/chat/completions", json=SMALL, timeout=60)
        assert small.status_code == 200 and small.json()["usage"]["completion_tokens"] == 2
        answered = False
        while sent < 32 * LIMIT and not answered:
            try:
                send_chunk(sock, b"x" * 8192)
                sent += 8192
            except OSError:  # the server closed the connection after its answer
                answered = True
            answered = answered or bool(select.select([sock], [], [], 0.05)[0])
        assert answered, f"no answer after {sent} bytes of a body over the limit of {LIMIT}"
        status, body = read_response(sock)
    assert status == 413, body
    assert f"{LIMIT} bytes" in assert_openai_error(body)["message"]
    assert sent < 8 * LIMIT
    again = httpx.post(f"http://{host}:{port}/v1/chat/completions", json=SMALL, timeout=60)
    assert again.status_code == 200


# ---- refused without waiting for the model ---------------------------------------------------------------------


@pytest.fixture
def busy_model(tiny_chats, monkeypatch):  # noqa: F811
    """(test client, started, release): tiny-glm4 behind --max_request_bytes LIMIT, whose replies do not end until
    `release` is set; `started` is set once the model thread is in a reply."""
    from fastapi.testclient import TestClient

    chat = dataclasses.replace(tiny_chats["builtin:tiny-glm4"])
    started, release = threading.Event(), threading.Event()

    def stream_parts(messages, *, stop=None, usage=None, **settings):
        started.set()
        release.wait(timeout=120)
        usage.update(prompt_tokens=1, completion_tokens=1, finish_reason="stop")
        yield "answer", "好"

    monkeypatch.setattr(chat, "stream_parts", stream_parts)
    with TestClient(serve.create_app(chat, max_request_bytes=LIMIT)) as client:
        try:
            yield client, started, release
        finally:
            release.set()


def test_input_that_will_not_fit_is_refused_while_the_model_is_busy(busy_model):
    """The model thread is in a reply that does not end; an over-long prompt, a reply that does not fit and bodies
    over the limit are answered all the same: none of them waits its turn for the model."""
    client, started, release = busy_model
    refused = {
        "a prompt longer than the context": (
            {"messages": [user("很长的问题，" * 1500)]},
            400,
            "maximum context length",
        ),
        "a reply that does not fit": ({"messages": [user("你好")], "max_tokens": 4096}, 400, "max_tokens asks"),
        "a body over the limit": (b"x" * (LIMIT + 1), 413, "--max_request_bytes"),
        "a chunked body over the limit": ((b"x" * 4096 for _ in range(LIMIT // 4096 + 1)), 413, "--max_request_bytes"),
    }
    pool = ThreadPoolExecutor(max_workers=2)
    try:
        busy = pool.submit(post, client, SMALL)
        assert started.wait(timeout=60), "the first request never reached the model"
        for case, (body, status, fragment) in refused.items():
            if isinstance(body, dict):
                answer = pool.submit(post, client, body)
            else:
                answer = pool.submit(client.post, "/v1/chat/completions", content=body)
            response = answer.result(timeout=60)  # before the model is free
            assert response.status_code == status, (case, response.text)
            assert fragment in assert_openai_error(response.json())["message"], case
        assert not busy.done()  # the model was busy all along
        release.set()
        assert busy.result(timeout=60).status_code == 200
    finally:
        release.set()
        pool.shutdown(wait=True)


# ---- JSON and fields the server will not take: 400 with an OpenAI error body ---------------------------------------

SMALL_JSON = json.dumps(SMALL)[:-1].encode()  # the small request without its closing brace: add a field, close it

REFUSED = {
    "JSON nested 3,000 deep": (SMALL_JSON + b', "metadata": ' + b"[" * 3000 + b"]" * 3000 + b"}", None, "100 deep"),
    "JSON nested 150 deep": (SMALL_JSON + b', "metadata": ' + b"[" * 150 + b"]" * 150 + b"}", None, "100 deep"),
    "an integer of 5,000 digits": (SMALL_JSON + b', "seed": ' + b"7" * 5000 + b"}", None, "5000 digits"),
    "a lone surrogate in content": (
        b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}',
        "messages[0].content",
        "lone surrogate",
    ),
    "a lone surrogate in a key": (SMALL_JSON + b', "\\udfff": 1}', None, "lone surrogate"),
    "add_generation_prompt in chat_template_kwargs": (
        {**SMALL, "chat_template_kwargs": {"add_generation_prompt": False}},
        "chat_template_kwargs.add_generation_prompt",
        '"add_generation_prompt", which is not a template switch',
    ),
    "messages in chat_template_kwargs": (
        {**SMALL, "chat_template_kwargs": {"messages": [user("别的")]}},
        "chat_template_kwargs.messages",
        '"messages", which is not a template switch',
    ),
    "a special token in chat_template_kwargs": (
        {**SMALL, "chat_template_kwargs": {"eos_token": "你好"}},
        "chat_template_kwargs.eos_token",
        "the switches are enable_thinking, clear_thinking, reasoning_effort",
    ),
    "reasoning_effort not a string": (
        {**SMALL, "chat_template_kwargs": {"reasoning_effort": 3}},
        "chat_template_kwargs.reasoning_effort",
        "must be a string",
    ),
    "temperature NaN": (SMALL_JSON + b', "temperature": NaN}', "temperature", '"temperature" is NaN'),
    "temperature Infinity": (SMALL_JSON + b', "temperature": Infinity}', "temperature", '"temperature" is Infinity'),
    "top_p NaN": (SMALL_JSON + b', "top_p": NaN}', "top_p", '"top_p" is NaN'),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_json_the_server_will_not_take_gets_400_and_the_server_goes_on(clients, case):  # noqa: F811
    client = clients["builtin:tiny-glm4"]
    body, param, fragment = REFUSED[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = assert_openai_error(response.json())
    assert error["param"] == param
    assert fragment in error["message"]
    follow_up = post(client, SMALL)
    assert follow_up.status_code == 200 and follow_up.json()["usage"]["completion_tokens"] == 2


def test_the_template_switches_are_still_taken(clients):  # noqa: F811
    switches = {"enable_thinking": False, "clear_thinking": True, "reasoning_effort": "high"}
    response = post(clients["builtin:tiny-glm4"], {**SMALL, "chat_template_kwargs": switches})
    assert response.status_code == 200, response.text
    body = {**SMALL, "chat_template_kwargs": {**switches, "clear_thinking": None}}  # null: not given
    taken = parse_chat_request(body, temperature=0.8, top_p=0.8).template_kwargs
    assert taken == {"enable_thinking": False, "reasoning_effort": "high"}


# ---- the API key -------------------------------------------------------------------------------------------------


def test_with_an_api_key_the_openapi_schema_and_the_docs_need_it(clients):  # noqa: F811
    client = clients["keyed"]
    for path in ("/openapi.json", "/docs", "/redoc"):
        response = client.get(path)
        assert response.status_code == 401, path
        assert assert_openai_error(response.json(), "authentication_error")["code"] == "invalid_api_key"
    schema = client.get("/openapi.json", headers={"Authorization": "Bearer sk-test"})
    assert schema.status_code == 200 and "/v1/chat/completions" in schema.json()["paths"]
    assert client.get("/health").status_code == 200


def test_max_request_bytes_flag():
    assert serve.parse_args(["--adapter", "output/demo"]).max_request_bytes == serve.DEFAULT_MAX_REQUEST_BYTES
    assert serve.parse_args(["--adapter", "output/demo", "--max-request-bytes", "1000"]).max_request_bytes == 1000
    with pytest.raises(SystemExit):
        serve.parse_args(["--adapter", "output/demo", "--max_request_bytes", "0"])
