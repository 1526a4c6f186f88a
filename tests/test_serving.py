"""glm_sft.serving: a request's prompt is encoded once, by the thread that reads the request, and the model generates
from those ids, one at a time and batched, with and without tools."""

import pytest
from test_serve import TOOLS, post, tiny_chats, user  # noqa: F401

from glm_sft import inference
from glm_sft.serving.app import create_app


@pytest.mark.parametrize("max_batch_size", [1, 4])
@pytest.mark.parametrize("tools", [None, TOOLS], ids=["text", "tools"])
def test_a_prompt_is_encoded_once(tiny_chats, monkeypatch, max_batch_size, tools):  # noqa: F811
    from fastapi.testclient import TestClient

    chat = tiny_chats["builtin:tiny-glm4"]
    messages = [user("北京今天天气怎么样？")]
    prompt = inference.encode_prompt(chat.tokenizer, messages, tools)
    body = {"messages": messages, "temperature": 0, "max_tokens": 4, **({"tools": tools} if tools else {})}
    with TestClient(create_app(chat, max_batch_size=max_batch_size)) as client:  # the batching probe encodes its own
        encoded, encode_chat = [], inference.encode_chat
        monkeypatch.setattr(
            inference, "encode_chat", lambda *args, **kwargs: encoded.append(args[1]) or encode_chat(*args, **kwargs)
        )
        response = post(client, body)
    assert response.status_code == 200, response.text
    assert encoded == [messages]
    assert response.json()["usage"]["prompt_tokens"] == len(prompt)
