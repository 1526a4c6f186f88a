"""The benchmarks run their arms on the same rows and write the figures they promise; ours tokenizes as TRL does."""

import json
import math

import pytest
from conftest import run_script

FIGURES = ("real_tokens_per_s", "trained_tokens_per_s", "padding_ratio", "peak_memory_mb", "final_loss", "isolation")


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
    assert list(arms) == ["naive", "trl", "trl_tuned", "ours"]
    for figures in arms.values():
        assert all(key in figures for key in FIGURES) and math.isfinite(figures["final_loss"])
        assert figures["steps"] == 6  # 24 rows, 4 per step
        # No arm lets the rows of a batch see each other (TRL's padding-free rows get transformers' block mask).
        assert figures["isolation"]["rows_attend_to_each_other"] is False, figures["isolation"]
    assert (
        arms["trl_tuned"]["isolation"]["layout"]
        == arms["ours"]["isolation"]["layout"]
        == "padding-free (one sequence)"
    )
    assert arms["trl_tuned"]["attention"] == "sdpa" and arms["ours"]["attention"] == "sdpa_varlen"
    # Same rows in the same order in every arm (steps 2..6 measured): equal real tokens.
    assert len({figures["real_tokens"] for figures in arms.values()}) == 1
    # The trl arms and ours train the same answer tokens; naive trains every real token.
    assert arms["trl"]["trained_tokens"] == arms["trl_tuned"]["trained_tokens"] == arms["ours"]["trained_tokens"]
    assert arms["ours"]["trained_tokens"] < arms["naive"]["trained_tokens"] == arms["naive"]["real_tokens"]
    assert arms["ours"]["padding_ratio"] == arms["trl_tuned"]["padding_ratio"] == 0 < arms["trl"]["padding_ratio"]
    assert arms["trl"]["padding_ratio"] < arms["naive"]["padding_ratio"]
    assert arms["trl_tuned"]["vs_trl_tuned"]["real_tokens_per_s"] == arms["trl"]["vs_trl"]["real_tokens_per_s"] == 1
    # Padding-free training is the same optimisation as per-batch padding: the held-out loss agrees.
    assert abs(arms["ours"]["vs_trl"]["final_loss"]) < 0.02 and abs(arms["ours"]["vs_trl_tuned"]["final_loss"]) < 0.02
    assert "ours: real tokens/s" in result.stdout
    assert all(f"x {name}" in result.stdout for name in ("trl_tuned", "trl", "naive"))


def test_ours_tokenizes_as_apply_chat_template_with_the_assistant_mask(glm4_tokenizer):
    """The bundled alpaca, multi-turn and tool rows: our batched tokenize_dataset gives the ids of TRL's path
    (apply_chat_template) and, as labels, exactly its assistant-masked tokens; one row at a time gives the same."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from tokenize_throughput import benchmark_rows, trl_rows

    from glm_sft.tokenization import encode_conversation, tokenize_dataset

    rows = benchmark_rows(120)
    dataset = tokenize_dataset(rows, glm4_tokenizer, name="train", max_length=None)
    assert len(dataset) == len(rows)
    for row, theirs, ours in zip(rows, trl_rows(rows), dataset, strict=True):
        tools = json.loads(theirs["tools"]) if theirs["tools"] else None
        rendered = glm4_tokenizer.apply_chat_template(
            theirs["messages"],
            tools=tools,
            return_dict=True,
            return_assistant_tokens_mask=True,
            **theirs["chat_template_kwargs"],
        )
        labels = [
            token if trained else -100
            for token, trained in zip(rendered["input_ids"], rendered["assistant_masks"], strict=True)
        ]
        assert ours["input_ids"] == rendered["input_ids"] and ours["labels"] == labels
        alone = encode_conversation(glm4_tokenizer, row["messages"], tools=row.get("tools"))
        assert alone["input_ids"] == ours["input_ids"] and alone["labels"] == ours["labels"]
    assert any(row.get("tools") for row in rows) and any(len(row["messages"]) > 3 for row in rows)


@pytest.mark.slow
def test_tokenize_benchmark_compares_the_same_rows(tmp_path):
    output = tmp_path / "tok.json"
    result = run_script("benchmarks/tokenize_throughput.py", *("--rows", "300", "--num_proc", "2", "--output", output))
    assert result.returncode == 0, result.stderr[-3000:]
    cells = json.loads(output.read_text())["results"]
    assert [(cell["rows"], cell["num_proc"]) for cell in cells] == [(300, 2)]  # one process: the test above
    for cell in cells:
        assert cell["rows_differing"] == 0, cell
        for figures in cell["arms"].values():
            assert figures["rows_per_s"] > 0 and figures["peak_memory_mb"] > 0 and figures["first_step_s"] > 0
    assert "x TRL's rows/s" in result.stdout


@pytest.mark.slow
def test_gpu_benchmark_dry_run_writes_every_table(tmp_path):
    """Every table's steps (the dense arms themselves: test_throughput_benchmark_...). The MoE table is
    `train_throughput.py --model tiny-moe` in the dry run: PEFT's own MoE LoRA (trl_tuned), ours and ours_qlora on
    the same rows and LoRA scope; the 4-bit experts hold under 0.3x the bytes, and every arm learns the same. Then a
    QLoRA load of that shape with the experts quantized as they load and after (qlora_load.py)."""
    result = run_script(
        "benchmarks/gpu_throughput.py",
        "--dry_run",
        *("--arms", "ours", "--moe_arms", "trl_tuned,ours,ours_qlora"),
        "--out_dir",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tables = (tmp_path / "tables.md").read_text()
    moe = json.loads((tmp_path / "tiny-moe-lora-qlora.json").read_text())["arms"]
    assert list(moe) == ["trl_tuned", "ours", "ours_qlora"] and all("error" not in arm for arm in moe.values())
    assert len({figures["real_tokens"] for figures in moe.values()}) == 1 and moe["ours"]["steps"] == 2
    assert moe["ours"]["expert_weight_bytes"] == moe["trl_tuned"]["expert_weight_bytes"] > 0
    assert 0 < moe["ours_qlora"]["expert_weight_bytes"] <= 0.3 * moe["ours"]["expert_weight_bytes"]
    assert moe["ours_qlora"]["weight_bytes"] < moe["ours"]["weight_bytes"]
    for name in ("ours", "ours_qlora"):
        assert abs(moe[name]["vs_trl_tuned"]["final_loss"]) < 0.01, moe[name]["vs_trl_tuned"]
    for name in ("tiny-checkpointing-on", "tiny-checkpointing-off", "tiny-ours-kernels", "tiny-moe-lora-qlora"):
        assert f"### {name}" in tables and (tmp_path / f"{name}.json").exists()
    # The QLoRA load of the MoE shape, both ways: the same 4-bit experts and weights, however much memory each took.
    load = json.loads((tmp_path / "qlora-load.json").read_text())
    assert "### qlora-load" in tables and load["model"] == "tiny-moe" and load["layers"] == 2
    routes = load["routes"]
    assert routes["at_load"]["weight_bytes"] == routes["after_load"]["weight_bytes"] > 0
    assert load["at_load_vs_after_load"]["same_expert_codes"] is True
    assert load["in_process"] is True  # the dry run checks the steps: its memory figures are not comparable
    assert all(route["peak_load_memory_mb"] >= 0 and route["seconds"] > 0 for route in routes.values())
    kernels = json.loads((tmp_path / "tiny-ours-kernels.json").read_text())["arms"]["ours"]
    assert kernels["kernels"] == []  # the CPU: not in place
    assert "Profile of one step" in tables and "self_cpu_time_total" in tables
