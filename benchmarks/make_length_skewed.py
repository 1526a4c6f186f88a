"""Write data/length_skewed.json: the length-skewed instruction set the throughput benchmark trains on.

Shaped like alpaca-zh: most rows are a short instruction with an answer of a sentence or a paragraph, and a long tail
of answers runs to a few thousand characters (past max_length 1024 of the benchmark's CPU configuration, so some rows
are truncated, as in real data). The text is recombined from the sentences of the other bundled files, so it is
Chinese prose the built-in tokenizers know; the content is not meant to be learned from. Deterministic: the same file
from the same bundled data.

python benchmarks/make_length_skewed.py            # rewrites data/length_skewed.json
"""

import json
import math
import random
import re
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data"
OUTPUT = DATA / "length_skewed.json"
ROWS = 480
SEED = 2024
SHORT_MEDIAN_CHARS = 90  # most answers: log-normal around this many characters
SHORT_SIGMA = 0.8
TAIL_FRACTION = 0.12  # the long tail: uniform between these lengths
TAIL_CHARS = (600, 2400)


def bundled_text():
    """(instructions, sentences) from the bundled alpaca, ADGEN and multi-turn files."""
    alpaca = json.loads((DATA / "alpaca_zh_demo.json").read_text(encoding="utf-8"))
    instructions = [row["instruction"] for row in alpaca]
    answers = [row["output"] for row in alpaca]
    for line in (DATA / "adgen_demo.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        instructions.append(f"根据以下商品属性写一段广告文案：{row['content']}")
        answers.append(row["summary"])
    for line in (DATA / "multi_turn.jsonl").read_text(encoding="utf-8").splitlines():
        for message in json.loads(line)["conversations"]:
            (instructions if message["role"] == "user" else answers).append(message["content"])
    sentences = [part for text in answers for part in re.findall(r"[^。！？]+[。！？]?", text) if len(part) > 4]
    return instructions, sentences


def target_length(rng: random.Random) -> int:
    if rng.random() < TAIL_FRACTION:
        return rng.randint(*TAIL_CHARS)
    return max(8, int(rng.lognormvariate(math.log(SHORT_MEDIAN_CHARS), SHORT_SIGMA)))


def main():
    rng = random.Random(SEED)
    instructions, sentences = bundled_text()
    rows = []
    for _ in range(ROWS):
        wanted, answer = target_length(rng), ""
        while len(answer) < wanted:
            answer += rng.choice(sentences)
        rows.append({"instruction": rng.choice(instructions), "input": "", "output": answer})
    OUTPUT.write_text(json.dumps(rows, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    lengths = sorted(len(row["output"]) for row in rows)
    print(f"wrote {OUTPUT}: {len(rows)} rows, answer characters median {lengths[len(rows) // 2]}, max {lengths[-1]}")


if __name__ == "__main__":
    main()
