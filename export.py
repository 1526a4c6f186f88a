"""Export a fine-tuned GLM model as one plain transformers directory (no glm-sft code, no trust_remote_code needed).

    python export.py output/demo --out_dir exported/demo                    # LoRA/DoRA/QLoRA: merged into the base
    python export.py output/full-run/checkpoint-500 --out_dir exported/full --dtype bf16   # full/freeze, checkpoints
    python export.py output/demo --out_dir exported/demo --force            # replace an existing export

The result holds safetensors weights (sharded with an index above --max_shard_size), config.json with the native
class, the tokenizer with the family's chat template, generation_config.json with the family's stop ids and a
README.md model card. It is written into a hidden folder beside --out_dir and renamed into place when complete
(glm_sft.exporting does the work).
"""

import argparse
import os
from pathlib import Path

from glm_sft import UserError, exit_on_user_error
from glm_sft.checkpoints import weights_problem
from glm_sft.exporting import export_model, read_json, say
from glm_sft.outputs import check_writable_dir, finish_cut_off_save
from glm_sft.staging import finish_cut_off_replace

DTYPE_NAMES = ("bf16", "fp16", "fp32")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="adapter or model directory written by train.py, or one of its checkpoint-N")
    parser.add_argument(
        "--out_dir", "--out-dir", required=True, help="where the exported model goes (must be empty or absent)"
    )
    parser.add_argument("--dtype", default="bf16", help="weights dtype: bf16 (default), fp16 or fp32")
    parser.add_argument(
        "--max_shard_size", "--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)"
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out_dir once the export is done")
    return parser.parse_args(argv)


def check_arguments(args) -> tuple[Path, Path]:
    """Every mistake a user can make on the command line, found before any weights load."""
    from transformers.utils.hub import convert_file_size_to_int

    source = Path(args.source).expanduser()
    out_dir = Path(args.out_dir).expanduser()
    if args.dtype not in DTYPE_NAMES:
        raise UserError(f"--dtype {args.dtype!r} is unknown; use one of {', '.join(DTYPE_NAMES)}")
    try:
        convert_file_size_to_int(args.max_shard_size)
    except ValueError:
        raise UserError(f"--max_shard_size {args.max_shard_size!r} is not a size such as 5GB or 500MB") from None
    if not source.is_dir():
        raise UserError(f"{source}: no such directory")
    finish_cut_off_save(source, reading=True)  # a final save a killed run left half-done: finished first
    if not (source / "adapter_config.json").is_file() and not (source / "config.json").is_file():
        raise UserError(
            f"{source}: not an adapter or model directory (no adapter_config.json or config.json); give the "
            "output_dir of a train.py run or one of its checkpoint-N folders"
        )
    if out_dir.exists():
        if not out_dir.is_dir():
            raise UserError(f"--out_dir {out_dir} exists and is not a directory")
        if any(out_dir.iterdir()) and not args.force:
            raise UserError(f"--out_dir {out_dir} is not empty; pass --force to replace it")
        resolved_out, resolved_source = out_dir.resolve(), source.resolve()
        if resolved_source == resolved_out or resolved_out in resolved_source.parents:
            raise UserError(f"--out_dir {out_dir} holds the model being exported; choose another directory")
        if os.path.ismount(out_dir):
            raise UserError(
                f"--out_dir {out_dir} is a mount point: the export is written beside it and renamed into place, "
                f"which a mount point cannot be; give a folder inside it, such as {out_dir / source.resolve().name}"
            )
    check_writable_dir(out_dir.parent, "out_dir")  # the export is written beside out_dir, then renamed
    for name in ("adapter_config.json", "config.json"):
        read_json(source / name)  # a cut-off config is one line here, not a traceback inside the loader
    if problem := weights_problem(source):
        raise UserError(
            f"{source}: {problem}: the folder is corrupt (cut off while saving?); export another checkpoint"
        )
    return source, out_dir


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    source, out_dir = check_arguments(args)
    finish_cut_off_replace(out_dir, "an export", say)  # what a killed export left beside out_dir: finished or undone
    export_model(source, out_dir, args.dtype, args.max_shard_size)
    say(f"exported to {out_dir}; chat with: python chat_cli.py --model {out_dir}")


if __name__ == "__main__":
    main()
