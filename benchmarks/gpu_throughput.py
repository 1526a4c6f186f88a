"""Every GPU table of docs/benchmarks.md in one command: GLM-4-9B and ChatGLM3-6B shapes (random bf16 weights, the
released configs), LoRA r8 on all linear layers, max_length 2048; the trl, trl_tuned and ours arms of
train_throughput.py, with and without gradient checkpointing, and ours with glm_sft.kernels; the GLM-4.7-Flash shape
(its real widths, 8 of its 47 layers) with trl_tuned (PEFT's own MoE LoRA), ours (bf16 LoRA) and ours_qlora (QLoRA,
routed experts in 4-bit NF4), checkpointing on; the peak memory of a QLoRA load of that shape, the experts quantized as
they load and after (qlora_load.py); then a profile of one step of ours (where the time goes).

python benchmarks/gpu_throughput.py                          # on a GPU machine: about 40 minutes on one H100
python benchmarks/gpu_throughput.py --dry_run                # on the CPU: the same steps at the tiny size, seconds

Writes gpu_throughput/<model>-<checkpointing>.json per configuration, gpu_throughput/profile.txt and
gpu_throughput/tables.md (the markdown for docs/benchmarks.md: date, GPU, command, one table per configuration).
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

MODELS = ("glm4-9b", "chatglm3-6b")
ARMS = "trl,trl_tuned,ours"
MOE_MODELS = ("glm47-flash",)
MOE_ARMS = "trl_tuned,ours,ours_qlora"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--arms", default=ARMS)
    parser.add_argument("--moe_models", default=",".join(MOE_MODELS), help="MoE shapes (bf16 LoRA and QLoRA arms)")
    parser.add_argument("--moe_arms", default=MOE_ARMS)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--max_length", type=int, default=2048)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out_dir", default="gpu_throughput")
    parser.add_argument(
        "--dry_run", action="store_true", help="the tiny model on the CPU, a few rows: checks the steps"
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        args.models, args.moe_models, args.rows, args.max_length, args.batch_size = "tiny", "tiny-moe", 8, 128, 4
    args.models = [model for model in args.models.split(",") if model]
    args.moe_models = [model for model in args.moe_models.split(",") if model]
    return args


def configurations(args):
    """(name, extra arguments of train_throughput.py) for every table."""
    for model in args.models:
        for checkpointing in ("true", "false"):
            yield f"{model}-checkpointing-{'on' if checkpointing == 'true' else 'off'}", [
                "--model", model, "--gradient_checkpointing", checkpointing, "--arms", args.arms,
            ]  # fmt: skip
        yield f"{model}-ours-kernels", ["--model", model, "--gradient_checkpointing", "false", "--arms", "ours",
                                        "--kernels", "true"]  # fmt: skip
    for model in args.moe_models:
        yield f"{model}-lora-qlora", ["--model", model, "--gradient_checkpointing", "true", "--arms", args.moe_arms]


def profile_step(args, out_dir: Path) -> str:
    """torch.profiler over steps 2-3 of ours (first model, checkpointing off): the top operators by device time."""
    rows = str(4 * args.batch_size)
    command = [
        sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--worker", "ours",
        "--result", str(out_dir / "profile-figures.json"), "--model", args.models[0], "--rows", rows,
        "--max_length", str(args.max_length), "--batch_size", str(args.batch_size),
        "--gradient_checkpointing", "false",
    ]  # fmt: skip
    environment = {**os.environ, "GLM_SFT_PROFILE": str(out_dir / "profile.txt"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=REPO, env=environment, text=True, capture_output=True)
    if done.returncode != 0:
        return f"profile failed: {(done.stderr.strip().splitlines() or ['no output'])[-1]}"
    return (out_dir / "profile.txt").read_text() if (out_dir / "profile.txt").exists() else "no profile written"


def qlora_load_section(args, out_dir: Path) -> str:
    """qlora_load.py on the first MoE shape: the peak memory of a QLoRA load with the experts quantized as they load,
    against after it."""
    import qlora_load

    output = out_dir / "qlora-load.json"
    command = ["--model", args.moe_models[0], "--output", str(output)]
    command += ["--layers", "2", "--in_process"] if args.dry_run else []
    print(f"== qlora-load: python benchmarks/qlora_load.py {' '.join(command)}", flush=True)
    report = qlora_load.run_all(qlora_load.parse_args(command))
    output.write_text(json.dumps(report, indent=2) + "\n")
    text = qlora_load.table(report)
    print(text, flush=True)
    return f"### qlora-load\n\n`python benchmarks/qlora_load.py {' '.join(command)}`\n\n```\n{text}\n```\n"


def main(argv=None):
    import train_throughput

    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "CPU (dry run)"
    sections = []
    for name, extra in configurations(args):
        output = out_dir / f"{name}.json"
        command = [
            "--rows", str(args.rows), "--max_length", str(args.max_length), "--batch_size", str(args.batch_size),
            "--repeats", str(args.repeats), "--output", str(output), *extra,
        ]  # fmt: skip
        print(f"== {name}: python benchmarks/train_throughput.py {' '.join(command)}", flush=True)
        report = train_throughput.run_all(train_throughput.parse_args(command))
        output.write_text(json.dumps(report, indent=2) + "\n")
        device = report["device"]
        text = train_throughput.table(report)
        print(text, flush=True)
        sections.append(
            f"### {name}\n\n`python benchmarks/train_throughput.py {' '.join(command)}`\n\n```\n{text}\n```\n"
        )
    if args.moe_models:
        sections.append(qlora_load_section(args, out_dir))
    profile = profile_step(args, out_dir)
    sections.append(f"### Profile of one step of ours ({args.models[0]}, checkpointing off)\n\n```\n{profile}\n```\n")
    header = (
        f"## GPU figures, measured {datetime.date.today().isoformat()} on {device}\n\n"
        f"`python benchmarks/gpu_throughput.py{' --dry_run' if args.dry_run else ''}`\n"
    )
    (out_dir / "tables.md").write_text("\n".join([header, *sections]))
    print(f"wrote {out_dir / 'tables.md'}")


if __name__ == "__main__":
    main()
