"""The README's data-format examples load as documented."""

import json
import re

from conftest import REPO

from glm_sft.data import read_conversations


def test_every_data_format_example_in_the_readme_loads(tmp_path):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    examples = re.findall(r"```json\n(.*?)\n```", readme, flags=re.S)
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
