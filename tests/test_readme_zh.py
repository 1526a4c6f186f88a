"""README_zh.md stays in step with README.md: the same shell commands in the same order, the same sections."""

import difflib
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
README_ZH = REPO / "README_zh.md"

# Fenced blocks whose commands are compared (no info string counts too; README.md uses ```bash, ```json and ```).
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console"}
COMMAND_STARTERS = (
    "python", "python3", "accelerate", "pip", "bash", "curl", "hf", "huggingface-cli", "modelscope", "swanlab",
    "deepspeed", "export", "cd", "git", "vllm", "torchrun",
)  # fmt: skip
# An optional `$ ` prompt, then optional `VAR=value` prefixes (README.md has `SWANLAB_API_KEY=... python train.py`).
COMMAND = re.compile(
    r"^(?:\$\s+)?\s*(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*(?:" + "|".join(map(re.escape, COMMAND_STARTERS)) + r")(?:\s|$)"
)
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*(\S*)")


def scan(text):
    """(line, language) per line: language is the enclosing fenced block's info string, None outside blocks."""
    fence = language = None
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence is None:
            if match:
                fence, language = match.group(1), match.group(2).lower()
            else:
                yield line, None
        elif match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence) and not match.group(2):
            fence = language = None
        else:
            yield line, language


def strip_comment(line):
    """The line without a trailing shell `# comment` (a `#` outside quotes, at the start or after whitespace)."""
    quote, index = None, 0
    while index < len(line):
        char = line[index]
        if char == "\\" and quote != "'":
            index += 1  # an escaped character is never a quote or a comment
        elif quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip()
        index += 1
    return line.rstrip()


def commands(path):
    """The commands in the file's shell blocks; one continued with trailing backslashes is joined into one line."""
    found, pending, previous = [], None, None
    for raw, language in scan(path.read_text(encoding="utf-8")):
        if language != previous and pending:  # a block ended inside a continued command
            found.append(" ".join(pending))
            pending = None
        previous = language
        if language not in SHELL_LANGUAGES:
            continue
        line = strip_comment(raw)
        if pending is None:
            if not line.strip() or not COMMAND.match(line):
                continue
            pending = []
        pending.append(line.removesuffix("\\").strip())
        if not line.endswith("\\"):
            found.append(" ".join(pending))
            pending = None
    if pending:
        found.append(" ".join(pending))
    return found


def level2_headings(path):
    text = path.read_text(encoding="utf-8")
    return [line for line, language in scan(text) if language is None and line.startswith("## ")]


def first_difference(english, chinese):
    for number, (a, b) in enumerate(zip(english, chinese, strict=False), start=1):
        if a != b:
            return f"command {number} differs:\n  README.md:    {a}\n  README_zh.md: {b}"
    longer, name = (english, "README.md") if len(english) > len(chinese) else (chinese, "README_zh.md")
    shorter = min(len(english), len(chinese))
    return f"command {shorter + 1} is only in {name}: {longer[shorter]}"


def test_readme_extraction_finds_the_commands():
    english = commands(README)
    assert len(english) >= 5, f"only {len(english)} commands found in README.md; is the extraction broken?"
    assert "pip install -r requirements.txt" in english and "python -m pytest -q" in english


def test_both_readmes_have_the_same_commands_in_the_same_order():
    english, chinese = commands(README), commands(README_ZH)
    assert len(english) >= 5, f"only {len(english)} commands found in README.md; is the extraction broken?"
    diff = "\n".join(difflib.unified_diff(english, chinese, "README.md", "README_zh.md", lineterm=""))
    assert english == chinese, f"{first_difference(english, chinese)}\n\n{diff}"


def test_both_readmes_have_the_same_number_of_sections():
    english, chinese = level2_headings(README), level2_headings(README_ZH)
    assert len(english) >= 5, f"only {len(english)} '## ' headings found in README.md"
    assert len(english) == len(chinese), (
        f"README.md has {len(english)} '## ' headings, README_zh.md has {len(chinese)}:\n"
        f"  README.md:    {english}\n  README_zh.md: {chinese}"
    )
