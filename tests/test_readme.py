"""The data examples of the docs pages load as documented, in English and in Chinese alike."""

import json
import re

import pytest
from conftest import REPO

from glm_sft.data import read_conversations

# The pages holding data examples, in the order the checks below read them.
EXAMPLE_PAGES = ["data", "tools", "reasoning"]


def json_examples(page: str) -> list[str]:
    return re.findall(r"```json\n(.*?)\n```", (REPO / "docs" / page).read_text(encoding="utf-8"), flags=re.S)


def test_every_data_format_example_in_the_docs_loads(tmp_path):
    examples = [example for page in EXAMPLE_PAGES for example in json_examples(f"{page}.md")]
    assert len(examples) == 11  # five plain formats, one tool-calling conversation in four shapes, reasoning in two
    firsts = []
    for index, example in enumerate(examples):
        path = tmp_path / f"example{index}.jsonl"
        path.write_text(json.dumps(json.loads(example), ensure_ascii=False) + "\n", encoding="utf-8")
        rows, stats = read_conversations(str(path), prompt_column="content", response_column="summary")
        assert stats.used == 1
        roles = [message["role"] for message in rows[0]["messages"]]
        assert roles[-1] == "assistant" and "user" in roles
        firsts.append(rows[0])
    tool_rows = firsts[5:9]
    reasoning_rows = firsts[9:11]  # reasoning_content and inline <think>: the same canonical message
    assert reasoning_rows[0]["messages"] == reasoning_rows[1]["messages"]
    assert reasoning_rows[0]["messages"][-1]["reasoning_content"].startswith("12 + 7")
    assert all(
        row["tools"] == tool_rows[0]["tools"] and row["messages"] == tool_rows[0]["messages"] for row in tool_rows
    )
    assert tool_rows[0]["messages"][1]["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": {"city": "北京"},
    }
    alpaca = firsts[1]["messages"]
    assert alpaca[-2]["content"] == "把这句话翻译成英文\n\n今天天气很好" and alpaca[0]["content"] == "你好"


@pytest.mark.parametrize("page", EXAMPLE_PAGES)
def test_the_chinese_pages_show_the_same_examples(page):
    assert json_examples(f"{page}_zh.md") == json_examples(f"{page}.md")
