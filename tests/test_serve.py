"""serve.py, the OpenAI-compatible API: requests read into canonical conversations, the greedy answer chat_cli gives
(whole and streamed), stop strings, seeds, usage and finish reasons, tool calls, 4xx errors, API keys, queued
concurrent requests and a client that leaves mid-stream.

Fast tier: the app in this process (FastAPI's test client) on the built-in tiny models of both families. Slow tier:
`python serve.py` on a free loopback port with trained adapters, driven by the official `openai` client.
"""

import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import REPO, chat_once, stop_process, trained_demo, trained_tools_demo

import serve
from glm_sft.inference import load_chat_model
from glm_sft.serving.requests import canonical_messages
from glm_sft.serving.worker import ReplyText

QUESTION = "你是谁？"
TOOLS = json.loads((REPO / "data" / "tools.json").read_text(encoding="utf-8"))
TOOL_RESULTS = json.loads((REPO / "data" / "tool_results.json").read_text(encoding="utf-8"))


def user(text):
    return {"role": "user", "content": text}


# ---- fast tier: the app in this process --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_chats():
    return {name: load_chat_model(name) for name in ("builtin:tiny-glm4", "builtin:tiny-chatglm3")}


@pytest.fixture(scope="module")
def clients(tiny_chats):
    """A test client per built-in model, and one for tiny-glm4 behind an API key."""
    from fastapi.testclient import TestClient

    with (
        TestClient(serve.create_app(tiny_chats["builtin:tiny-glm4"])) as glm4,
        TestClient(serve.create_app(tiny_chats["builtin:tiny-chatglm3"])) as chatglm3,
        TestClient(serve.create_app(tiny_chats["builtin:tiny-glm4"], api_key="sk-test")) as keyed,
    ):
        yield {"builtin:tiny-glm4": glm4, "builtin:tiny-chatglm3": chatglm3, "keyed": keyed}


def post(client, body, **headers):
    return client.post("/v1/chat/completions", json=body, headers=headers)


def streamed(client, body) -> tuple[list[dict], list[str]]:
    """(the chunks, the raw `data:` payloads) of a streamed completion."""
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        payloads = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    return [json.loads(payload) for payload in payloads[:-1]], payloads


def streamed_text(chunks) -> str:
    return "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"])


@pytest.mark.parametrize("model", ["builtin:tiny-glm4", "builtin:tiny-chatglm3"])
def test_greedy_answer_is_chat_cli_s_whole_and_streamed(clients, tiny_chats, model):
    expected = chat_once(
        "--model", model, "--prompt", QUESTION, "--temperature", "0", "--max_new_tokens", "12"
    ).strip()
    body = {"model": model, "messages": [user(QUESTION)], "temperature": 0, "max_tokens": 12}
    response = post(clients[model], body)
    assert response.status_code == 200, response.text
    completion = response.json()
    assert completion["object"] == "chat.completion" and completion["model"] == model
    choice = completion["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected}
    prompt_ids, _ = tiny_chats[model].prompt_ids([user(QUESTION)])
    usage = completion["usage"]
    assert usage["prompt_tokens"] == len(prompt_ids)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # the untrained model does not end its turn within 12 tokens: the reply is cut at max_tokens
    assert choice["finish_reason"] == "length" and usage["completion_tokens"] == 12

    chunks, _ = streamed(clients[model], {**body, "stream_options": {"include_usage": True}})
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert streamed_text(chunks) == expected
    pieces = [chunk for chunk in chunks if chunk["choices"] and chunk["choices"][0]["delta"].get("content")]
    assert len(pieces) > 1  # sent piece by piece, not in one go
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usage


def test_stop_strings_cut_the_reply_whole_and_streamed(clients):
    client = clients["builtin:tiny-glm4"]
    body = {"messages": [user("你好")], "temperature": 0, "max_tokens": 16}
    full = post(client, body).json()["choices"][0]["message"]["content"]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    expected = full[: full.index(stop)].rstrip()
    cut = post(client, {**body, "stop": [stop, "never-written"]}).json()
    assert cut["choices"][0]["message"]["content"] == expected
    assert cut["choices"][0]["finish_reason"] == "stop"
    chunks, _ = streamed(client, {**body, "stop": stop})
    assert streamed_text(chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("split", [1, 2, 3, 5])
def test_streamed_text_holds_back_what_may_start_a_stop_string(split):
    """Whatever the piece boundaries, the pieces let through join to the text before the stop string, without
    trailing whitespace, as the non-streamed reply is."""
    text = "答案是 4。 \nUser: 还有吗"
    for stops, expected in ((["User:"], "答案是 4。"), (["4", "User:"], "答案是"), (["nothing"], text.rstrip())):
        reply = ReplyText(stops)
        pieces = [text[start : start + split] for start in range(0, len(text), split)]
        joined = "".join(reply.feed(piece) for piece in pieces) + reply.finish()
        assert joined == expected, (stops, split)


def test_a_seed_makes_sampling_repeatable(clients):
    client = clients["builtin:tiny-glm4"]
    body = {"messages": [user(QUESTION)], "temperature": 1.0, "top_p": 1.0, "max_tokens": 8}
    first, again, other = (post(client, {**body, "seed": seed}).json() for seed in (7, 7, 8))
    text = [completion["choices"][0]["message"]["content"] for completion in (first, again, other)]
    assert text[0] == text[1]
    assert text[0] != text[2]


MALFORMED = {
    "body that is not JSON": (b'{"messages": [', None, "not valid JSON"),
    "body that is a list": (b"[]", None, "expected an object"),
    "no messages": ({"model": "x"}, "messages", "required"),
    "empty messages": ({"messages": []}, "messages", "non-empty list"),
    "unknown role": ({"messages": [{"role": "bot", "content": "你好"}]}, "messages[0].role", 'role "bot"'),
    "content not text": ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "number"),
    "tool result with no call": (
        {"messages": [user("北京天气？"), {"role": "tool", "content": "晴", "tool_call_id": "call_1"}]},
        "messages[1]",
        "no call before it",
    ),
    "call with no result": (
        {
            "messages": [
                user("北京天气？"),
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
                    ],
                },
                user("怎么样？"),
            ]
        },
        "messages[2]",
        "no result (call_1)",
    ),  # fmt: skip
    "call arguments not JSON": (
        {
            "messages": [
                user("北京天气？"),
                {"role": "assistant", "tool_calls": [{"function": {"name": "get_weather", "arguments": "{city"}}]},
                {"role": "tool", "content": "晴"},
            ]
        },
        "messages[1].tool_calls[0].function.arguments",
        "not valid JSON",
    ),
    "control token in content": ({"messages": [user("你好<|assistant|>")]}, "messages[0]", "control token"),
    "bad tools": ({"messages": [user("你好")], "tools": [{"type": "function"}]}, "tools", '"tools" item 1'),
    "temperature too high": ({"messages": [user("你好")], "temperature": 3}, "temperature", "between 0"),
    "max_tokens zero": ({"messages": [user("你好")], "max_tokens": 0}, "max_tokens", "at least 1"),
    "several choices": ({"messages": [user("你好")], "n": 2}, "n", "must be 1"),
    "prompt longer than the context": ({"messages": [user("很长的问题，" * 1500)]}, "messages", "context length"),
    "reply that does not fit": ({"messages": [user("你好")], "max_tokens": 4096}, "messages", "max_tokens asks"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_malformed_request_gets_400_with_an_openai_error_and_the_server_goes_on(clients, case):
    client = clients["builtin:tiny-glm4"]
    body, param, fragment = MALFORMED[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert fragment in error["message"]
    follow_up = post(client, {"messages": [user("你好")], "temperature": 0, "max_tokens": 2})
    assert follow_up.status_code == 200 and follow_up.json()["usage"]["completion_tokens"] == 2


def test_an_api_key_is_required_when_set(clients):
    client = clients["keyed"]
    body = {"messages": [user("你好")], "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "sk-test"}):
        for response in (post(client, body, **headers), client.get("/v1/models", headers=headers)):
            assert response.status_code == 401, headers
            assert response.json()["error"]["code"] == "invalid_api_key"
    assert post(client, body, Authorization="Bearer sk-test").status_code == 200
    models = client.get("/v1/models", headers={"Authorization": "Bearer sk-test"}).json()
    assert [card["id"] for card in models["data"]] == ["builtin:tiny-glm4"]
    assert client.get("/health").status_code == 200  # for load balancers: no key, no model


def test_a_client_that_hangs_up_mid_stream_stops_its_generation(tiny_chats, capfd):
    """On a real server (uvicorn on a free loopback port, in this process): the untrained model would write all
    1000 tokens, but the reply stops when its client hangs up, and the next request is answered."""
    import threading

    import httpx
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(serve.create_app(tiny_chats["builtin:tiny-glm4"]), port=0, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.05)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1/chat/completions"
        body = {"messages": [user("你好")], "temperature": 0, "max_tokens": 1000, "stream": True}
        with httpx.stream("POST", url, json=body, timeout=120) as response:
            lines = (line for line in response.iter_lines() if line.startswith("data: "))
            assert '"content": ""' in next(lines) and '"content"' in next(lines)  # the role, then a first piece
        follow_up = httpx.post(url, json={"messages": [user("你好")], "max_tokens": 2}, timeout=120)
        assert follow_up.status_code == 200 and follow_up.json()["usage"]["completion_tokens"] == 2
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    stopped = re.search(r"a client left mid-reply: stopped after (\d+) of 1000 tokens", capfd.readouterr().err)
    assert stopped and int(stopped.group(1)) < 1000


def test_unknown_paths_get_an_openai_error(clients):
    response = clients["builtin:tiny-glm4"].get("/v1/completion")
    assert response.status_code == 404 and "/v1/completion" in response.json()["error"]["message"]


def test_openai_tool_messages_become_canonical_rows_with_results_in_call_order():
    weather = {"name": "get_weather", "arguments": '{"city": "北京"}'}
    calculator = {"name": "calculator", "arguments": {"expression": "3*4"}}  # an object works too
    messages = [
        {"role": "developer", "content": "你是助手。"},
        {"role": "user", "content": [{"type": "text", "text": "北京天气"}, {"type": "text", "text": "和 3*4？"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function", "function": weather},
            {"id": "call_b", "type": "function", "function": calculator}]},
        {"role": "tool", "tool_call_id": "call_b", "content": "12"},
        {"role": "tool", "tool_call_id": "call_a", "content": '{"weather": "晴"}'},
        {"role": "assistant", "content": "北京晴，3*4=12。"},
        user("谢谢"),
    ]  # fmt: skip
    assert canonical_messages(messages) == [
        {"role": "system", "content": "你是助手。"},
        {"role": "user", "content": "北京天气和 3*4？"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}},
            {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "3*4"}}}]},
        {"role": "tool", "content": '{"weather": "晴"}'},
        {"role": "tool", "content": "12"},
        {"role": "assistant", "content": "北京晴，3*4=12。"},
        user("谢谢"),
    ]  # fmt: skip


# ---- a thinking family: reasoning_content apart from the content, chat_template_kwargs, XML tool calls ----


@pytest.fixture
def thinking_client(tiny_chats, monkeypatch):
    """A client for a stand-in GLM-4.5 model (tiny-glm4's weights and template, the glm45 family) whose generation
    is scripted: the parts it streams and the raw reply it writes; yields (client, the settings each call got)."""
    import dataclasses

    from fastapi.testclient import TestClient

    chat = dataclasses.replace(tiny_chats["builtin:tiny-glm4"], family="glm45")
    seen = []

    def stream_parts(messages, *, stop=None, usage=None, **settings):
        seen.append(settings)
        usage.update(prompt_tokens=1, completion_tokens=6, finish_reason="stop")
        yield from [("reasoning", "3 加 4"), ("reasoning", " 是 7。"), ("answer", "等于"), ("answer", " 7。")]

    def raw_reply(messages, *, tools=None, usage=None, **settings):
        seen.append(settings)
        usage.update(prompt_tokens=1, completion_tokens=30, finish_reason="stop")
        return (
            "\n<think>要查两个城市。</think>\n我来查一下。\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
            "<arg_value>北京</arg_value>\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>"
            "\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>上海</arg_value>\n</tool_call>"
        )

    monkeypatch.setattr(chat, "stream_parts", stream_parts)
    monkeypatch.setattr(chat, "raw_reply", raw_reply)
    with TestClient(serve.create_app(chat)) as client:
        yield client, seen


def test_a_thinking_family_s_reasoning_comes_as_reasoning_content_whole_and_streamed(thinking_client):
    client, seen = thinking_client
    body = {"messages": [user("3+4?")], "chat_template_kwargs": {"enable_thinking": False}}
    message = post(client, body).json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "等于 7。", "reasoning_content": "3 加 4 是 7。"}
    assert seen[-1]["template_kwargs"] == {"enable_thinking": False}
    chunks, _ = streamed(client, {"messages": [user("3+4?")]})
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]
    assert "".join(delta.get("reasoning_content") or "" for delta in deltas) == "3 加 4 是 7。"
    assert streamed_text(chunks) == "等于 7。"
    first_answer = next(index for index, delta in enumerate(deltas) if delta.get("content"))
    assert all("reasoning_content" not in delta for delta in deltas[first_answer:])  # the reasoning comes first
    assert seen[-1]["template_kwargs"] == {}


def test_xml_tool_calls_come_back_as_several_tool_calls_with_the_reasoning(thinking_client):
    client, _ = thinking_client
    completion = post(client, {"messages": [user("北京和上海天气？")], "tools": TOOLS}).json()
    choice = completion["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert (message["content"], message["reasoning_content"]) == ("我来查一下。", "要查两个城市。")
    calls = [(call["function"]["name"], json.loads(call["function"]["arguments"])) for call in message["tool_calls"]]
    assert calls == [("get_weather", {"city": "北京", "days": 2}), ("get_weather", {"city": "上海"})]
    assert len({call["id"] for call in message["tool_calls"]}) == 2
    chunks, _ = streamed(client, {"messages": [user("北京和上海天气？")], "tools": TOOLS})
    indexes = [call["index"] for chunk in chunks if chunk["choices"] for call in chunk["choices"][0]["delta"].get(
        "tool_calls", [])]  # fmt: skip
    assert indexes == [0, 1] and chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_assistant_history_keeps_its_reasoning_content():
    messages = [user("3+4?"), {"role": "assistant", "content": "7", "reasoning_content": "3+4=7"}, user("再加 1？")]
    assert canonical_messages(messages)[1] == {"role": "assistant", "content": "7", "reasoning_content": "3+4=7"}
    messages[1]["reasoning_content"] = None  # null: no reasoning, as OpenAI clients send it back
    assert canonical_messages(messages)[1] == {"role": "assistant", "content": "7"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"chat_template_kwargs": "no"}, '"chat_template_kwargs" must be an object'),
        ({"chat_template_kwargs": {"enable_thinking": "no"}}, '"chat_template_kwargs.enable_thinking" must be true'),
        (
            {"messages": [user("q"), {"role": "assistant", "content": "a", "reasoning_content": 3}, user("q")]},
            "messages[1] has reasoning_content of type number; expected a string",
        ),
        (
            {"messages": [user("q"), {"role": "assistant", "content": "a", "reasoning_content": "<|user|>"}]},
            "messages[1] contains the control token <|user|>",
        ),
    ],
)
def test_bad_thinking_fields_get_400(clients, body, message):
    response = post(clients["builtin:tiny-glm4"], {"messages": [user("q")], **body})
    assert response.status_code == 400 and message in response.json()["error"]["message"]


def test_command_line_defaults_to_loopback_and_reads_the_key_from_the_environment(monkeypatch):
    monkeypatch.delenv(serve.API_KEY_VARIABLE, raising=False)
    args = serve.parse_args(["--adapter", "output/demo"])
    assert args.host == "127.0.0.1" and args.api_key is None
    monkeypatch.setenv(serve.API_KEY_VARIABLE, "sk-env")
    assert serve.parse_args(["--adapter", "output/demo"]).api_key == "sk-env"
    assert serve.parse_args(["--adapter", "output/demo", "--api-key", "sk-flag"]).api_key == "sk-flag"


# ---- slow tier: `python serve.py` with trained adapters, the official openai client -------------------------------


def start_server(log_path, *args):
    """`python serve.py ARGS --port 0` in the background: (process, base URL) once it prints where it listens."""
    log = open(log_path, "w", encoding="utf-8")  # closed by stop_server
    process = subprocess.Popen([sys.executable, "serve.py", *map(str, args), "--port", "0"], cwd=REPO, stdout=log,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        for line in log_path.read_text(encoding="utf-8").splitlines():
            if line.startswith("serving ") and " at http://" in line:
                return process, log, line.split(" at ")[1].split()[0]
        time.sleep(0.2)
    stop_server(process, log)
    raise AssertionError(f"serve.py did not start:\n{log_path.read_text(encoding='utf-8')[-3000:]}")


def stop_server(process, log):
    stop_process(process, log)


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """(base URL, adapter directory): the demo adapter served with the defaults (loopback, no key)."""
    output_dir, _ = trained_demo(tmp_path_factory)
    process, log, url = start_server(tmp_path_factory.mktemp("serve") / "demo.log", "--adapter", output_dir)
    yield url, output_dir
    stop_server(process, log)


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    """(base URL, adapter directory): recipes/demo_tools.yaml trained as a user would, served behind an API key."""
    output_dir = trained_tools_demo(tmp_path_factory)
    log_path = tmp_path_factory.mktemp("serve") / "tools.log"
    process, log, url = start_server(log_path, "--adapter", output_dir, "--api_key", "sk-tools")
    yield url, output_dir
    stop_server(process, log)


def openai_client(url, api_key="not-needed"):
    from openai import OpenAI

    return OpenAI(base_url=url, api_key=api_key, max_retries=0, timeout=120)


def greedy(client, question, **settings):
    return client.chat.completions.create(
        model="demo", messages=[user(question)], temperature=0, **settings
    )  # the served model answers whatever the client calls it


@pytest.mark.slow
def test_served_demo_adapter_answers_as_chat_cli_whole_and_streamed(demo_server):
    url, output_dir = demo_server
    assert url.startswith("http://127.0.0.1:")  # loopback unless --host says otherwise
    expected = chat_once("--adapter", output_dir, "--prompt", QUESTION, "--temperature", "0").strip()
    client = openai_client(url)
    assert [model.id for model in client.models.list()] == [str(output_dir)]
    completion = greedy(client, QUESTION)
    assert completion.choices[0].message.content == expected
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens > 0 and completion.usage.prompt_tokens > 0

    chunks = list(greedy(client, QUESTION, stream=True))
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_twenty_concurrent_requests_are_each_answered_as_alone(demo_server):
    """Queued, never interleaved: each of 20 simultaneous requests (four questions, streamed or not) gets the
    greedy answer chat_cli gives its question."""
    url, output_dir = demo_server
    questions = ["你是谁？", "你好", "谁开发了你？", "你叫什么名字？"]
    expected = {q: chat_once("--adapter", output_dir, "--prompt", q, "--temperature", "0").strip() for q in questions}
    assert len(set(expected.values())) == len(questions)  # different answers, so a mix-up would show
    client = openai_client(url)

    def ask(number):
        question = questions[number % len(questions)]
        if number % 2:
            text = "".join(chunk.choices[0].delta.content or "" for chunk in greedy(client, question, stream=True))
        else:
            text = greedy(client, question).choices[0].message.content
        return question, text

    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(ask, range(20), timeout=600))
    assert [text for _, text in answers] == [expected[question] for question, _ in answers]


@pytest.mark.slow
def test_malformed_requests_and_a_client_leaving_mid_stream_leave_the_server_serving(demo_server):
    import httpx
    import openai

    url, output_dir = demo_server
    client = openai_client(url)
    for messages, fragment in (
        ([{"role": "robot", "content": "你好"}], 'role "robot"'),
        ([{"role": "tool", "content": "晴", "tool_call_id": "call_x"}], "no call before it"),
        ([user("很长的问题，" * 1500)], "maximum context length"),
    ):
        with pytest.raises(openai.BadRequestError) as raised:
            client.chat.completions.create(model="demo", messages=messages)
        assert raised.value.status_code == 400 and fragment in raised.value.message
    bad_json = httpx.post(f"{url}/chat/completions", content=b"{", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]

    body = {"model": "demo", "messages": [user("介绍一下你自己")], "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=120) as response:
        first = next(response.iter_lines())  # the role chunk: generation has started; then hang up
        assert first.startswith("data: ")
    expected = chat_once("--adapter", output_dir, "--prompt", QUESTION, "--temperature", "0").strip()
    assert greedy(client, QUESTION).choices[0].message.content == expected


@pytest.mark.slow
def test_tool_calling_adapter_returns_tool_calls_the_client_parses(tool_server):
    """The call chat_cli makes for the question comes back as OpenAI tool_calls (whole and streamed); sent back
    with its result, the answer is the one chat_cli gives after that result."""
    url, output_dir = tool_server
    question = "我在广州，今天要带伞吗？"
    cli_call, cli_answer = chat_once(
        "--adapter", output_dir, "--tools", "data/tools.json", "--tool_results", "data/tool_results.json",
        "--prompt", question, "--temperature", "0",
    ).splitlines()  # fmt: skip
    cli_call = json.loads(cli_call)
    client = openai_client(url, api_key="sk-tools")
    messages = [user(question)]
    completion = client.chat.completions.create(model="tools", messages=messages, tools=TOOLS, temperature=0)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == cli_call["name"] == "get_weather"
    assert json.loads(call.function.arguments) == cli_call["arguments"]

    chunks = list(client.chat.completions.create(model="tools", messages=messages, tools=TOOLS, temperature=0,
                                                 stream=True))  # fmt: skip
    streamed_calls = [call for chunk in chunks if chunk.choices for call in chunk.choices[0].delta.tool_calls or []]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in streamed_calls] == [
        (cli_call["name"], cli_call["arguments"])
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    result = json.dumps(TOOL_RESULTS[call.function.name], ensure_ascii=False)
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]
    answer = client.chat.completions.create(model="tools", messages=messages, tools=TOOLS, temperature=0)
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.content == cli_answer.strip()


@pytest.mark.slow
def test_a_server_started_with_an_api_key_answers_401_without_it(tool_server):
    import httpx
    import openai

    url, _ = tool_server
    with pytest.raises(openai.AuthenticationError) as raised:
        openai_client(url, api_key="sk-wrong").chat.completions.create(model="tools", messages=[user("你好")])
    assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"
    without_key = httpx.get(f"{url}/models")  # the openai client always sends one
    assert without_key.status_code == 401 and without_key.json()["error"]["code"] == "invalid_api_key"
    assert [model.id for model in openai_client(url, api_key="sk-tools").models.list()] == [str(tool_server[1])]
