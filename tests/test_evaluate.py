"""Scores computed by hand on small pairs, and evaluate.py on the demo adapter."""

import json
import math

import pytest
from conftest import run_script, trained_demo

import evaluate
from glm_sft.metrics import score_replies, words

SENTENCE = "the cat sat on the mat"  # six words: jieba splits Latin words at spaces


def test_identical_replies_score_100_and_disjoint_ones_0():
    assert score_replies([SENTENCE], [SENTENCE]) == {
        "rouge-1": 100.0,
        "rouge-2": 100.0,
        "rouge-l": 100.0,
        "bleu-4": 100.0,
        "exact_match": 100.0,
        "mean_reply_length": len(SENTENCE),
        "empty_replies": 0,
        "count": 1,
    }
    disjoint = score_replies(["one two three four"], [SENTENCE])
    assert [disjoint[name] for name in ("rouge-1", "rouge-2", "rouge-l", "bleu-4", "exact_match")] == [0] * 5


def test_partial_overlap_by_hand():
    scores = score_replies([SENTENCE], ["the cat is on the mat"])
    # 5 of 6 words shared each way; 3 of 5 bigrams; longest common subsequence "the cat on the mat" (5).
    assert scores["rouge-1"] == pytest.approx(100 * 5 / 6, abs=1e-3)
    assert scores["rouge-2"] == pytest.approx(100 * 3 / 5, abs=1e-3)
    assert scores["rouge-l"] == pytest.approx(100 * 5 / 6, abs=1e-3)
    # BLEU-4: precisions 5/6, 3/5, 1/4 and, with no 4-gram in common, the first smoothed order 1 / (2 * 3).
    assert scores["bleu-4"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25, abs=1e-3)


def test_chinese_is_scored_on_jieba_words_with_the_brevity_penalty():
    assert words("我爱北京") == ["我", "爱", "北京"] and words("我爱北京天安门") == ["我", "爱", "北京", "天安门"]
    scores = score_replies(["我爱北京"], ["我爱北京天安门"])
    assert scores["rouge-1"] == pytest.approx(100 * 2 * 1 * 0.75 / 1.75, abs=1e-3)  # precision 1, recall 3/4
    assert scores["rouge-2"] == pytest.approx(100 * 2 * 1 * (2 / 3) / (5 / 3), abs=1e-3)
    # Three of four words, every 1-3-gram matching, no 4-gram (smoothed to 1/2); short by one word of four.
    assert scores["bleu-4"] == pytest.approx(100 * math.exp(1 - 4 / 3) * 0.5**0.25, abs=1e-3)


def test_empty_reply_scores_0_and_is_counted():
    scores = score_replies([SENTENCE, "", "  "], [SENTENCE, SENTENCE, "猫"])
    assert scores["empty_replies"] == 2 and scores["count"] == 3
    for name in ("rouge-1", "rouge-2", "rouge-l", "bleu-4", "exact_match"):
        assert scores[name] == pytest.approx(100 / 3, abs=1e-3)  # the mean of 100, 0 and 0
    assert scores["mean_reply_length"] == pytest.approx(len(SENTENCE) / 3, abs=0.01)


@pytest.fixture(scope="module")
def demo_evaluation(tmp_path_factory):
    output_dir, _ = trained_demo(tmp_path_factory)
    evaluation = tmp_path_factory.mktemp("evaluation")
    result = run_script(
        "evaluate.py",
        "--adapter",
        output_dir,
        "--dataset_name",
        "data/self_cognition.jsonl",
        "--output_dir",
        evaluation,
        "--max_new_tokens",
        64,
        "--batch_size",
        16,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return evaluation, result


def test_demo_adapter_scores_above_90_on_the_data_it_learned(demo_evaluation):
    evaluation, result = demo_evaluation
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["count"] == 85 and metrics["empty_replies"] == 0
    assert metrics["rouge-l"] > 90 and metrics["rouge-1"] > 90 and metrics["bleu-4"] > 80
    assert "generating" in result.stderr  # the progress bar
    assert f"rouge-l  {metrics['rouge-l']}" in result.stdout


def test_predictions_hold_prompt_reference_and_reply(demo_evaluation):
    evaluation, _ = demo_evaluation
    records = [json.loads(line) for line in (evaluation / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 85
    first = records[0]
    assert first["prompt"] == [{"role": "user", "content": "你是谁？"}]
    # The adapter's recipe filled {{name}} and {{author}}, as in training.
    assert first["reference"] == "您好，我是小智，一个由glm-sft团队开发的人工智能助手，很高兴为您提供帮助。"
    assert first["source"] == "data/self_cognition.jsonl:1"
    assert sum(record["reply"] == record["reference"] for record in records) > 60


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--dataset_name", "data/nope.jsonl"], "data/nope.jsonl"),
        (["--dataset_name", "data/self_cognition.jsonl", "--assistant_name", ""], "{{name}}"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_1(arguments, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--model", "builtin:tiny-glm4", "--output_dir", str(tmp_path), *arguments])
    assert stop.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error and "Traceback" not in error
