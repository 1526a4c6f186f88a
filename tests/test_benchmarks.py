"""benchmarks/train_throughput.py runs its three arms on the same rows and writes the figures it promises."""

import json
import math

import pytest
from conftest import run_script

FIGURES = ("real_tokens_per_s", "trained_tokens_per_s", "padding_ratio", "peak_memory_mb", "final_loss")


@pytest.mark.slow
def test_throughput_benchmark_arms_consume_the_same_rows(tmp_path):
    output = tmp_path / "bench.json"
    result = run_script(
        "benchmarks/train_throughput.py",
        *("--rows", "24", "--max_length", "256", "--batch_size", "4", "--repeats", "1", "--output", output),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    arms = report["arms"]
    assert list(arms) == ["naive", "trl", "ours"]
    for figures in arms.values():
        assert all(key in figures for key in FIGURES) and math.isfinite(figures["final_loss"])
        assert figures["steps"] == 6  # 24 rows, 4 per step
    # Same rows in the same order in every arm (steps 2..6 measured): equal real tokens.
    assert arms["naive"]["real_tokens"] == arms["trl"]["real_tokens"] == arms["ours"]["real_tokens"]
    # trl and ours train the same answer tokens; naive trains every real token.
    assert arms["trl"]["trained_tokens"] == arms["ours"]["trained_tokens"] < arms["naive"]["trained_tokens"]
    assert arms["naive"]["trained_tokens"] == arms["naive"]["real_tokens"]
    assert arms["ours"]["padding_ratio"] == 0 < arms["trl"]["padding_ratio"] < arms["naive"]["padding_ratio"]
    assert arms["trl"]["vs_trl"]["real_tokens_per_s"] == 1
    # Padding-free training is the same optimisation as per-batch padding: the held-out loss agrees.
    assert abs(arms["ours"]["vs_trl"]["final_loss"]) < 0.02
    table = result.stdout
    assert "ours: real tokens/s" in table and "x trl" in table and "x naive" in table
