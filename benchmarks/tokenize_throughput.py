"""Tokenization throughput: ours (glm_sft.tokenization.tokenize_dataset) against TRL's own dataset preparation.

The same conversations go to both: the bundled alpaca, multi-turn and tool-calling rows (data/alpaca_zh_demo.json,
data/multi_turn.jsonl, data/tool_calls.jsonl, read by our readers), repeated to --rows rows, each copy's first user
message suffixed with its row number so no two rows are the same text. Each arm runs in a fresh Python process:

  ours  tokenize_dataset (what train.py runs), then SFTTrainer on the tokenized rows with TRL's preparation skipped,
        as build_run builds it
  trl   SFTTrainer(train_dataset=the conversations, SFTConfig(assistant_only_loss=True)): TRL's apply_chat_template
        with the assistant mask of the template's {% generation %} marks, then its labels; the template's
        close_final_turn switch is passed as TRL takes template switches (a chat_template_kwargs column), and tool
        arguments as JSON text (Arrow would merge the argument objects of all rows into one schema of nulls)

single process and with dataset_num_proc (--num_proc). Figures per arm: prepare_s (rows in memory to a trainer ready
to train, tokenization included), rows_per_s (rows over prepare_s), first_step_s (rows in memory to the end of the
first optimizer step of the tiny model), peak_memory_mb (peak RSS of the process), and whether ids and labels are the
same as ours, row by row (a digest of each row's ids and labels).

python benchmarks/tokenize_throughput.py                          # 50k and 200k rows, 1 and 2 processes
python benchmarks/tokenize_throughput.py --rows 2000 --num_proc 1 --output tok.json
"""

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ARMS = ("ours", "trl")
DATA = "data/alpaca_zh_demo.json,data/multi_turn.jsonl,data/tool_calls.jsonl"
TOKENIZER = "builtin:tiny-glm4"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="50000,200000", help="comma list of row counts")
    parser.add_argument("--num_proc", default="1,2", help="comma list of dataset_num_proc values (1: one process)")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--tokenizer", default=TOKENIZER)
    parser.add_argument("--output", help="also write the figures to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.rows = [int(value) for value in args.rows.split(",")]
    args.num_proc = [int(value) for value in args.num_proc.split(",")]
    args.arms = [arm for arm in args.arms.split(",") if arm]
    return args


def benchmark_rows(count: int) -> list[dict]:
    """`count` canonical conversations from the bundled files, cycled; copy i's first user message ends in (i)."""
    from glm_sft.data import read_conversations

    base, _ = read_conversations(DATA)
    rows = []
    for index in range(count):
        row = base[index % len(base)]
        messages = [dict(message) for message in row["messages"]]
        first_user = next(position for position, message in enumerate(messages) if message["role"] == "user")
        messages[first_user]["content"] = f"{messages[first_user]['content']} ({index})"
        rows.append({**row, "messages": messages})
    return rows


def trl_rows(rows: list[dict]) -> list[dict]:
    """The rows as a TRL user hands them to SFTTrainer: messages, tools as JSON text, the template switch."""
    out = []
    for row in rows:
        messages = []
        for message in row["messages"]:
            message = dict(message)
            if message.get("tool_calls"):
                message["tool_calls"] = [
                    {**call, "function": {**call["function"], "arguments": _json_text(call["function"]["arguments"])}}
                    for call in message["tool_calls"]
                ]
            messages.append(message)
        out.append(
            {
                "messages": messages,
                "tools": json.dumps(row["tools"], ensure_ascii=False) if row.get("tools") else None,
                "chat_template_kwargs": {"close_final_turn": True},
            }
        )
    return out


def _json_text(arguments):
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def digests(dataset) -> list[str]:
    """One digest of (input_ids, labels) per row."""
    return [
        hashlib.blake2b(json.dumps([ids, labels]).encode(), digest_size=8).hexdigest()
        for ids, labels in zip(dataset["input_ids"], dataset["labels"], strict=True)
    ]


def run_worker(args, rows_count: int, num_proc: int, work: str) -> dict:
    import torch
    from transformers import AutoConfig, GlmForCausalLM
    from trl import SFTConfig, SFTTrainer

    from glm_sft.loading import load_tokenizer, resolve_model_path

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    tokenizer, _ = load_tokenizer(args.tokenizer, "auto")
    torch.manual_seed(0)
    model = GlmForCausalLM(AutoConfig.from_pretrained(resolve_model_path(args.tokenizer)))
    rows = benchmark_rows(rows_count)
    config = SFTConfig(
        output_dir=work,
        max_steps=1,
        per_device_train_batch_size=8,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataset_num_proc=num_proc if num_proc > 1 else None,
        max_length=None,
        assistant_only_loss=args.worker == "trl",
        dataset_kwargs={"skip_prepare_dataset": True} if args.worker == "ours" else None,
        dataloader_pin_memory=False,
        bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
    )
    start = time.perf_counter()
    if args.worker == "ours":
        from glm_sft.tokenization import tokenize_dataset

        dataset = tokenize_dataset(
            rows, tokenizer, name="train", max_length=None, num_proc=num_proc if num_proc > 1 else None
        ).select_columns(["input_ids", "labels"])
        tokenized = time.perf_counter()
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    else:
        from datasets import Dataset

        dataset = Dataset.from_list(trl_rows(rows))
        tokenized = None
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    prepared = time.perf_counter()
    trainer.train()
    stepped = time.perf_counter()
    figures = {
        "rows": rows_count,
        "num_proc": num_proc,
        "prepare_s": prepared - start,
        "rows_per_s": rows_count / (prepared - start),
        "tokenize_s": (tokenized - start) if tokenized else None,
        "first_step_s": stepped - start,
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "tokens": sum(len(ids) for ids in trainer.train_dataset["input_ids"]),
    }
    figures["digests"] = digests(trainer.train_dataset)
    return figures


def run_all(args) -> dict:
    script = Path(__file__).resolve()
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}
    results = []
    for rows_count in args.rows:
        for num_proc in args.num_proc:
            cell = {"rows": rows_count, "num_proc": num_proc, "arms": {}}
            for arm in args.arms:
                print(f"{arm}: {rows_count} rows, num_proc {num_proc} ...", file=sys.stderr, flush=True)
                with tempfile.NamedTemporaryFile(suffix=".json") as result:
                    command = [
                        sys.executable, str(script), "--worker", arm, "--result", result.name,
                        "--rows", str(rows_count), "--num_proc", str(num_proc), "--tokenizer", args.tokenizer,
                    ]  # fmt: skip
                    done = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True)
                    if done.returncode != 0:
                        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
                        cell["arms"][arm] = {"error": done.stderr.strip().splitlines()[-1:]}
                        continue
                    cell["arms"][arm] = json.loads(Path(result.name).read_text())
            compare(cell)
            results.append(cell)
    return {"device": f"CPU, {os.cpu_count()} cores", "tokenizer": args.tokenizer, "results": results}


def compare(cell: dict) -> None:
    """Rows whose ids and labels differ between ours and trl; the digests are dropped after."""
    arms = cell["arms"]
    ours, trl = arms.get("ours", {}), arms.get("trl", {})
    if "digests" in ours and "digests" in trl:
        differing = [
            index for index, (a, b) in enumerate(zip(ours["digests"], trl["digests"], strict=False)) if a != b
        ]
        cell["rows_differing"] = len(differing) + abs(len(ours["digests"]) - len(trl["digests"]))
        cell["first_differing_rows"] = differing[:5]
        cell["ours_vs_trl_rows_per_s"] = ours["rows_per_s"] / trl["rows_per_s"]
    for figures in arms.values():
        figures.pop("digests", None)


def table(report) -> str:
    lines = [
        f"device: {report['device']}; tokenizer: {report['tokenizer']}",
        f"{'rows':>7} {'procs':>5} {'arm':<5} {'rows/s':>8} {'prepare s':>10} {'tokenize s':>11} {'first step s':>13} "
        f"{'peak MB':>8} {'ids+labels':>16}",
    ]
    for cell in report["results"]:
        for arm, figures in cell["arms"].items():
            if "error" in figures:
                lines.append(f"{cell['rows']:>7} {cell['num_proc']:>5} {arm:<5} failed: {figures['error']}")
                continue
            same = "-"
            if "rows_differing" in cell:
                same = "same as ours" if cell["rows_differing"] == 0 else f"{cell['rows_differing']} rows differ"
            tokenize = f"{figures['tokenize_s']:.1f}" if figures.get("tokenize_s") is not None else "-"
            lines.append(
                f"{cell['rows']:>7} {cell['num_proc']:>5} {arm:<5} {figures['rows_per_s']:>8.0f} "
                f"{figures['prepare_s']:>10.1f} {tokenize:>11} {figures['first_step_s']:>13.1f} "
                f"{figures['peak_memory_mb']:>8.0f} {same if arm == 'trl' else '':>16}"
            )
        if "ours_vs_trl_rows_per_s" in cell:
            lines.append(
                f"{cell['rows']:>7} {cell['num_proc']:>5} ours: {cell['ours_vs_trl_rows_per_s']:.2f}x TRL's rows/s"
            )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        with tempfile.TemporaryDirectory(prefix="tok-bench-") as work:
            figures = run_worker(args, args.rows[0], args.num_proc[0], work)
        Path(args.result).write_text(json.dumps(figures))
        return
    report = run_all(args)
    print(table(report))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
