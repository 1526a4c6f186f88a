"""The run's rows: training and eval data read together (one report lists the problems of both), and the split."""

import sys

from glm_sft import UserError
from glm_sft.data.checks import DataError
from glm_sft.data.reader import read_conversations


def read_datasets(data_args, *, seed: int) -> tuple[list[dict], list[dict] | None]:
    """Read and validate training (and eval) rows before anything heavy loads; split off eval rows by ratio."""
    options = {
        "dataset_format": data_args.dataset_format,
        "prompt_column": data_args.prompt_column,
        "response_column": data_args.response_column,
        "placeholders": {"name": data_args.assistant_name or "", "author": data_args.assistant_author or ""},
        "skip_invalid_rows": data_args.skip_invalid_rows,
    }
    max_samples = data_args.max_samples
    if max_samples is not None and (isinstance(max_samples, bool) or max_samples < 1):
        raise UserError(f"max_samples must be a number of rows, 1 or more; got {max_samples}")
    if data_args.eval_dataset_name and data_args.val_size:
        raise UserError("set either eval_dataset_name or val_size, not both")
    # Training and eval data are both read before either's problems are raised, so that one report lists them all.
    found, problems, total = [], [], 0
    for name in filter(None, (data_args.dataset_name, data_args.eval_dataset_name)):
        try:
            found.append(read_conversations(name, **options))
        except DataError as error:
            problems, total = problems + error.problems, total + error.total
    if problems:
        raise DataError(problems, total=total)
    train_rows, stats = found[0]
    report = f"data: {stats.read} rows read from {data_args.dataset_name}"
    if stats.skipped:
        report += f", {stats.skipped} invalid rows skipped"
    if max_samples is not None and max_samples < len(train_rows):
        report += f", first {max_samples} kept (max_samples)"
        train_rows = train_rows[:max_samples]
    eval_rows = None
    if data_args.eval_dataset_name:
        eval_rows, eval_stats = found[1]
        report += f"; {eval_stats.read} eval rows read from {data_args.eval_dataset_name}"
    elif data_args.val_size:
        train_rows, eval_rows = split_rows(train_rows, data_args.val_size, seed)
        report += f"; {len(eval_rows)} held out for evaluation (val_size={data_args.val_size})"
    print(report, file=sys.stderr)
    return train_rows, eval_rows


def split_rows(rows: list[dict], val_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded random hold-out of `val_size` (a fraction below 1, or a count); both parts keep file order."""
    import random

    count = int(val_size) if val_size >= 1 else round(len(rows) * val_size)
    if val_size < 0 or count < 1 or count >= len(rows):
        raise UserError(f"val_size={val_size} leaves no training or no evaluation rows out of {len(rows)}")
    held_out = set(random.Random(seed).sample(range(len(rows)), count))
    train = [row for index, row in enumerate(rows) if index not in held_out]
    evaluation = [row for index, row in enumerate(rows) if index in held_out]
    return train, evaluation
