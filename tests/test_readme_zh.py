"""README_zh.md stays in step with README.md, and each docs page's Chinese twin (docs/X_zh.md) with docs/X.md: the same
shell commands in the same order, the same sections. Their links lead to files that exist, and the README's test
command is the one CI runs."""

import difflib
import re
from pathlib import Path

import pytest

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
            return f"command {number} differs:\n  English: {a}\n  Chinese: {b}"
    longer, name = (english, "the English page") if len(english) > len(chinese) else (chinese, "the Chinese page")
    shorter = min(len(english), len(chinese))
    return f"command {shorter + 1} is only in {name}: {longer[shorter]}"


# README.md and README_zh.md, then every docs page that has a Chinese twin.
PAIRS = [(README, README_ZH)] + [
    (twin.with_name(twin.name.replace("_zh.md", ".md")), twin) for twin in sorted((REPO / "docs").glob("*_zh.md"))
]
PAIR_IDS = [english.relative_to(REPO).as_posix() for english, _ in PAIRS]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_readme_extraction_finds_the_commands():
    english = commands(README)
    assert len(english) >= 5, f"only {len(english)} commands found in README.md; is the extraction broken?"
    assert "pip install -r requirements.txt" in english and "python -m pytest -q" in english


def test_the_readme_test_command_is_what_ci_runs():
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    suite = [line for line in ci if line.startswith("python -m pytest")]
    assert suite == ['python -m pytest -q -m "slow or not slow"'] and suite[0] in commands(README)


def test_every_docs_page_but_serving_and_benchmarks_has_a_chinese_twin():
    pages = {path.name for path in (REPO / "docs").glob("*.md")}
    english = {name for name in pages if not name.endswith("_zh.md")}
    missing = sorted(name for name in english - {"serving.md", "benchmarks.md"} if name[:-3] + "_zh.md" not in pages)
    assert len(PAIRS) >= 8 and missing == []


@pytest.mark.parametrize("english, chinese", PAIRS, ids=PAIR_IDS)
def test_both_languages_have_the_same_commands_in_the_same_order(english, chinese):
    english_commands, chinese_commands = commands(english), commands(chinese)
    diff = "\n".join(difflib.unified_diff(english_commands, chinese_commands, english.name, chinese.name, lineterm=""))
    assert english_commands == chinese_commands, f"{first_difference(english_commands, chinese_commands)}\n\n{diff}"


@pytest.mark.parametrize("english, chinese", PAIRS, ids=PAIR_IDS)
def test_both_languages_have_the_same_number_of_sections(english, chinese):
    english_headings, chinese_headings = level2_headings(english), level2_headings(chinese)
    assert len(english_headings) == len(chinese_headings), (
        f"{english.name} has {len(english_headings)} '## ' headings, {chinese.name} has {len(chinese_headings)}:\n"
        f"  {english.name}: {english_headings}\n  {chinese.name}: {chinese_headings}"
    )


@pytest.mark.parametrize("page", [README, README_ZH, *sorted((REPO / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_lead_to_files_that_exist(page):
    text = page.read_text(encoding="utf-8")
    targets = [target.split("#")[0] for target in LINK.findall(text) if "://" not in target]
    missing = [target for target in targets if target and not (page.parent / target).exists()]
    assert missing == [], f"{page.name} links to files that do not exist: {missing}"
