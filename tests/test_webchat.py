"""webchat.py, the Gradio web chat: replies streamed piece by piece that end as chat_cli's greedy answer, the system
prompt and the history reaching the model, tool calls and results shown as such, and the page driven in a real
headless browser (Debian's chromium through selenium) with the demo adapter.
"""

import json
import shutil
import subprocess
import sys
import time

import pytest
from conftest import REPO, chat_once, stop_process, trained_demo

import webchat
from glm_sft.inference import load_chat_model
from glm_sft.tools import ToolSession, result_text

WebChat = webchat.WebChat
TOOL_RESULTS = json.loads((REPO / "data" / "tool_results.json").read_text(encoding="utf-8"))
GENERATING = "Generating…"


@pytest.fixture(scope="module")
def tiny_chat():
    return load_chat_model("builtin:tiny-glm4")


def states(page_chat, text, conversation=None, system="", max_tokens=12):
    """(the reply bubble's text, "" before it exists, the status) at each update of a greedy reply, and the
    conversation at the end."""
    seen, latest = [], None
    for latest, status in page_chat.respond(
        text, conversation or WebChat.new_conversation(), system, 0, 0.8, max_tokens
    ):
        last = latest["shown"][-1]  # the user's own message until the reply's first piece comes
        seen.append((last["content"] if last["role"] == "assistant" else "", status))
    return seen, latest


@pytest.mark.parametrize("system", ["", "你是一个乐于助人的助手。"])
def test_reply_streams_piece_by_piece_and_ends_as_chat_cli_s_greedy_answer(tiny_chat, system):
    system_flag = ["--system", system] if system else []
    expected = chat_once(
        "--model",
        "builtin:tiny-glm4",
        "--prompt",
        "你好",
        "--temperature",
        "0",
        "--max_new_tokens",
        "12",
        *system_flag,
    ).strip()
    seen, conversation = states(WebChat(tiny_chat), "你好", system=system)
    partial = [text for text, status in seen if status == GENERATING and text]
    assert len(set(partial)) > 2  # the bubble grew as the pieces came
    assert all(expected.startswith(text.strip()) for text in partial)
    assert seen[-1] == (expected, "Done: 12 tokens, max tokens reached.")
    turns = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": expected}]
    assert conversation == {"messages": turns, "shown": turns}  # the system prompt is the page's, sent each turn


def test_the_next_question_is_answered_with_the_history(tiny_chat):
    page_chat = WebChat(tiny_chat)
    _, conversation = states(page_chat, "你好")
    seen, conversation = states(page_chat, "你是谁？", conversation)
    history = conversation["messages"][:-1]
    assert [message["content"] for message in history] == ["你好", conversation["messages"][1]["content"], "你是谁？"]
    assert seen[-1][0] == tiny_chat.reply(history, temperature=0, max_new_tokens=12)


def scripted_model(chat, monkeypatch, *raw_replies):
    """The chat model with raw_reply answering the given raw texts in turn; returns the (messages, tools) it saw."""
    seen, replies = [], list(raw_replies)

    def raw_reply(messages, *, tools=None, usage=None, **settings):
        seen.append(([dict(message) for message in messages], tools))
        usage.update(prompt_tokens=1, completion_tokens=5, finish_reason="stop")
        return replies.pop(0)

    monkeypatch.setattr(chat, "raw_reply", raw_reply)
    return seen


def test_tool_calls_and_their_results_are_shown_as_such_and_fed_back(tiny_chat, monkeypatch):
    tools = ToolSession("data/tools.json", "data/tool_results.json")
    seen = scripted_model(tiny_chat, monkeypatch, 'get_weather\n{"city": "广州"}', "\n广州今天有雨，记得带伞。")
    _, conversation = states(WebChat(tiny_chat, tools), "我在广州，今天要带伞吗？")
    result = result_text(TOOL_RESULTS["get_weather"])
    assert conversation["shown"] == [
        {"role": "user", "content": "我在广州，今天要带伞吗？"},
        {
            "role": "assistant",
            "content": '```json\n{\n  "city": "广州"\n}\n```',
            "metadata": {"title": "Tool call: get_weather"},
        },
        {"role": "assistant", "content": result, "metadata": {"title": "Tool result: get_weather"}},
        {"role": "assistant", "content": "广州今天有雨，记得带伞。"},
    ]
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "广州"}}}
    assert seen[1] == (
        [
            {"role": "user", "content": "我在广州，今天要带伞吗？"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": result},
        ],
        tools.tools,
    )


def test_without_a_results_file_the_next_message_is_the_call_s_result(tiny_chat, monkeypatch):
    seen = scripted_model(tiny_chat, monkeypatch, 'calculator\n{"expression": "7*8"}', "\n结果是 56。")
    page_chat = WebChat(tiny_chat, ToolSession("data/tools.json"))
    waiting, conversation = states(page_chat, "7*8 等于几？")
    assert waiting[-1][1] == "The model called calculator: send its result as your next message."
    answered, conversation = states(page_chat, '{"result": "56"}', conversation)
    assert conversation["shown"][-2:] == [
        {"role": "assistant", "content": '{"result": "56"}', "metadata": {"title": "Tool result: calculator"}},
        {"role": "assistant", "content": "结果是 56。"},
    ]
    assert seen[1][0][-1] == {"role": "tool", "content": '{"result": "56"}'}


def test_a_thinking_family_s_reasoning_is_a_folded_bubble_apart_from_the_answer(tiny_chat, monkeypatch):
    import dataclasses

    chat = dataclasses.replace(tiny_chat, family="glm47")
    parts = [("reasoning", "3 加 4"), ("reasoning", " 是 7。"), ("answer", "等于"), ("answer", " 7。")]

    def stream_parts(messages, *, usage=None, **settings):
        usage.update(prompt_tokens=1, completion_tokens=6, finish_reason="stop")
        yield from parts

    monkeypatch.setattr(chat, "stream_parts", stream_parts)
    seen, conversation = states(WebChat(chat), "3+4?")
    thinking = {"role": "assistant", "content": "3 加 4 是 7。", "metadata": {"title": webchat.THINKING_TITLE}}
    assert conversation["shown"][1:] == [thinking, {"role": "assistant", "content": "等于 7。"}]
    assert conversation["messages"][-1] == {
        "role": "assistant",
        "content": "等于 7。",
        "reasoning_content": "3 加 4 是 7。",
    }
    assert ("3 加 4", GENERATING) in seen  # the reasoning grows in its bubble as it comes


def test_several_calls_in_one_reply_each_get_their_result_before_the_model_goes_on(tiny_chat, monkeypatch):
    import dataclasses

    chat = dataclasses.replace(tiny_chat, family="glm47")
    two_calls = (
        "<think>两个城市。</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>北京</arg_value></tool_call>"
        "<tool_call>calculator<arg_key>expression</arg_key><arg_value>1+1</arg_value></tool_call>"
    )
    seen = scripted_model(chat, monkeypatch, two_calls, "<think></think>都好了。")
    results = ToolSession("data/tools.json", "data/tool_results.json")
    results.results = {"get_weather": TOOL_RESULTS["get_weather"]}  # calculator's result comes from the person
    page_chat = WebChat(chat, results)
    waiting, conversation = states(page_chat, "北京天气和 1+1？")
    assert waiting[-1][1] == "The model called calculator: send its result as your next message."
    assert [bubble.get("metadata", {}).get("title") for bubble in conversation["shown"][1:]] == [
        "Thinking", "Tool call: get_weather", "Tool call: calculator", "Tool result: get_weather"]  # fmt: skip
    answered, conversation = states(page_chat, "2", conversation)
    assert [message["role"] for message in seen[1][0]] == ["user", "assistant", "tool", "tool"]
    assert seen[1][0][1]["reasoning_content"] == "两个城市。" and len(seen[1][0][1]["tool_calls"]) == 2
    assert conversation["shown"][-1] == {"role": "assistant", "content": "都好了。"}


def test_a_call_that_cannot_be_read_is_shown_as_text_with_why(tiny_chat, monkeypatch):
    scripted_model(tiny_chat, monkeypatch, 'get_weather\n{"city": 广州}')
    seen, conversation = states(WebChat(tiny_chat, ToolSession("data/tools.json")), "广州天气？")
    problem = "the call to get_weather has arguments that are not valid JSON (Expecting value at character 9)"
    assert conversation["shown"][-1] == {
        "role": "assistant",
        "content": f'get_weather\n{{"city": 广州}}\n\n(could not read this call: {problem}: {{"city": 广州}})',
    }
    assert conversation["messages"][-1] == {"role": "assistant", "content": 'get_weather\n{"city": 广州}'}
    assert seen[-1][1] == "Done: 5 tokens, the model ended its turn."


def test_a_model_that_keeps_calling_is_stopped_after_max_calls_per_turn(tiny_chat, monkeypatch):
    replies = ['calculator\n{"expression": "1+1"}'] * ToolSession.MAX_CALLS_PER_TURN
    seen = scripted_model(tiny_chat, monkeypatch, *replies)
    waiting, conversation = states(WebChat(tiny_chat, ToolSession("data/tools.json", "data/tool_results.json")), "1+1")
    assert waiting[-1][1] == "Stopped: the model made 8 calls without answering."
    assert len(seen) == 8 and [message["role"] for message in conversation["messages"]][-2:] == ["assistant", "tool"]


def test_a_message_holding_a_control_token_is_not_sent(tiny_chat):
    conversation = WebChat.new_conversation()
    (update,) = WebChat(tiny_chat).respond("你好<|user|>", conversation, "", 0, 0.8, 4)
    assert update == (conversation, "Not sent: <|user|> is a token of the chat format; remove it from the message.")


def test_the_page_is_local_and_not_shared_unless_asked():
    args = webchat.parse_args(["--adapter", "output/demo"])
    assert args.host == "127.0.0.1" and args.share is False
    assert webchat.parse_args(["--adapter", "output/demo", "--share"]).share is True


# ---- slow tier: the page in a real headless browser ---------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_page(tmp_path_factory):
    """(URL, adapter directory): `python webchat.py --adapter DEMO --temperature 0` running in the background."""
    output_dir, _ = trained_demo(tmp_path_factory)
    log_path = tmp_path_factory.mktemp("webchat") / "webchat.log"
    log = open(log_path, "w", encoding="utf-8")  # closed below
    command = [sys.executable, "webchat.py", "--adapter", str(output_dir), "--temperature", "0"]
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = None, time.monotonic() + 300
        while url is None and time.monotonic() < deadline and process.poll() is None:
            for line in log_path.read_text(encoding="utf-8").splitlines():
                if line.startswith("web chat for ") and " at http://" in line:
                    url = line.split(" at ")[1].split()[0]
            time.sleep(0.2)
        assert url, f"webchat.py did not start:\n{log_path.read_text(encoding='utf-8')[-3000:]}"
        yield url, output_dir
    finally:
        stop_process(process, log)


@pytest.fixture(scope="module")
def browser():
    """Headless Debian chromium through selenium, resolving no host but this machine."""
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("needs Debian's chromium and its driver: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,800",
        "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)  # the given driver: nothing downloaded
    yield driver
    driver.quit()


def wait_for(condition, seconds=180, what="the page"):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_browser_chat_streams_chat_cli_s_greedy_answer(demo_page, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, output_dir = demo_page
    question = "你是谁？"
    expected = chat_once("--adapter", output_dir, "--prompt", question, "--temperature", "0").strip()
    browser.get(url)
    box = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#message textarea"), what="the message box")[0]
    assert str(output_dir) in browser.find_element(By.ID, "model-name").text  # the page names the model it serves

    def bot_text():
        bubbles = browser.find_elements(By.CSS_SELECTOR, "#chat [data-testid='bot']")
        return bubbles[-1].text if bubbles else ""

    box.send_keys(question, Keys.ENTER)
    status = wait_for(lambda: (text := browser.find_element(By.ID, "status").text).startswith("Done") and text,
                      what="the reply")  # fmt: skip
    assert "the model ended its turn" in status
    assert bot_text() == expected
    assert [bubble.text for bubble in browser.find_elements(By.CSS_SELECTOR, "#chat [data-testid='user']")] == [
        question
    ]

    browser.find_element(By.ID, "clear").click()
    wait_for(lambda: not browser.find_elements(By.CSS_SELECTOR, "#chat [data-testid='bot']"), 30, "the chat to clear")
    assert browser.find_element(By.ID, "status").text == "Ready."
