"""Scores for generated replies against references, as the official GLM fine-tuning demos report them.

Both texts are segmented into words with jieba (whitespace dropped). Per reply: ROUGE-1, ROUGE-2 and ROUGE-L
F1 (ROUGE-L from the longest common subsequence, beta = 1) and sentence BLEU-4 (uniform weights, brevity penalty,
the geometric smoothing NLTK calls method3, as the GLM demos use: the k-th n-gram order with no match counts
1 / (2^k * number of n-grams)). Each score is averaged over the replies and reported x100. An empty reply scores 0
everywhere and is counted.
"""

import math
from collections import Counter

METRIC_NAMES = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")


def words(text: str) -> list[str]:
    """jieba's segmentation of `text`, without whitespace tokens."""
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)  # no "Building prefix dict..." chatter on first use
    return [word for word in jieba.lcut(text) if word.strip()]


def ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[index : index + n]) for index in range(len(tokens) - n + 1))


def f1(overlap: int, predicted: int, expected: int) -> float:
    if overlap == 0:
        return 0.0
    precision, recall = overlap / predicted, overlap / expected
    return 2 * precision * recall / (precision + recall)


def rouge_n(prediction: list[str], reference: list[str], n: int) -> float:
    predicted, expected = ngrams(prediction, n), ngrams(reference, n)
    overlap = sum((predicted & expected).values())
    return f1(overlap, sum(predicted.values()), sum(expected.values()))


def longest_common_subsequence(first: list[str], second: list[str]) -> int:
    previous = [0] * (len(second) + 1)
    for item in first:
        current = [0]
        for index, other in enumerate(second):
            current.append(previous[index] + 1 if item == other else max(previous[index + 1], current[index]))
        previous = current
    return previous[-1]


def rouge_l(prediction: list[str], reference: list[str]) -> float:
    return f1(longest_common_subsequence(prediction, reference), len(prediction), len(reference))


def bleu_4(prediction: list[str], reference: list[str]) -> float:
    """Sentence BLEU-4 against one reference, with method3 smoothing for orders that have no match."""
    if not prediction or not reference:
        return 0.0
    precisions = []
    zero_orders = 0
    for n in range(1, 5):
        predicted, expected = ngrams(prediction, n), ngrams(reference, n)
        matches = sum((predicted & expected).values())
        total = max(sum(predicted.values()), 1)
        if matches == 0:
            if n == 1:
                return 0.0  # no word in common: nothing to smooth
            zero_orders += 1
            precisions.append(1 / (2**zero_orders * total))
        else:
            precisions.append(matches / total)
    brevity = 1.0 if len(prediction) > len(reference) else math.exp(1 - len(reference) / len(prediction))
    return brevity * math.exp(sum(math.log(precision) for precision in precisions) / 4)


def score_reply(prediction: str, reference: str) -> dict[str, float]:
    """The four scores (0-1) of one reply."""
    predicted, expected = words(prediction), words(reference)
    if not predicted or not expected:
        return dict.fromkeys(METRIC_NAMES, 0.0)
    return {
        "rouge-1": rouge_n(predicted, expected, 1),
        "rouge-2": rouge_n(predicted, expected, 2),
        "rouge-l": rouge_l(predicted, expected),
        "bleu-4": bleu_4(predicted, expected),
    }


def score_replies(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Averages x100 of ROUGE-1/2/L F1 and BLEU-4, exact match (%), mean reply length (characters), empty replies."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    count = len(predictions)
    totals = dict.fromkeys(METRIC_NAMES, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        for name, value in score_reply(prediction, reference).items():
            totals[name] += value
    scores = {name: round(100 * total / max(count, 1), 4) for name, total in totals.items()}
    exact = sum(
        prediction.strip() == reference.strip() for prediction, reference in zip(predictions, references, strict=True)
    )
    scores["exact_match"] = round(100 * exact / max(count, 1), 4)
    scores["mean_reply_length"] = round(sum(len(prediction.strip()) for prediction in predictions) / max(count, 1), 2)
    scores["empty_replies"] = sum(not prediction.strip() for prediction in predictions)
    scores["count"] = count
    return scores
