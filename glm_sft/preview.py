"""Show rendered training examples with the trained spans marked, exactly as the trainer will see them.

    python -m glm_sft.preview --config recipes/demo.yaml [any train.py override] [--n 3] [--json]

Trained tokens are shown in green on a terminal, between ⟦ and ⟧ otherwise. `--json` prints one object per line:
{"text": ..., "input_ids": [...], "labels": [...], "source": "file:line"}, labels -100 where untrained.
"""

import json
import sys

from glm_sft import UserError, exit_on_user_error
from glm_sft.arguments import parse_recipe
from glm_sft.data import read_datasets, tokenize_rows
from glm_sft.modeling import load_tokenizer
from glm_sft.template import IGNORE_INDEX


def split_preview_args(argv: list[str]) -> tuple[int, bool, list[str]]:
    """Take --n N and --json out of argv; the rest goes to the recipe parser."""
    count, as_json, rest = 3, False, []
    items = iter(argv)
    for item in items:
        if item == "--json":
            as_json = True
        elif item == "--n":
            value = next(items, None)
            if value is None or not value.isdigit() or int(value) < 1:
                raise UserError("--n needs a positive number of examples")
            count = int(value)
        else:
            rest.append(item)
    return count, as_json, rest


def marked_text(tokenizer, input_ids: list[int], labels: list[int], color: bool) -> str:
    """The example's text with each run of trained tokens highlighted."""
    start, end = ("\033[32m", "\033[0m") if color else ("⟦", "⟧")
    pieces, run, run_trained = [], [], None
    for token_id, label in zip(input_ids, labels, strict=True):
        trained = label != IGNORE_INDEX
        if run and trained != run_trained:
            text = tokenizer.decode(run)
            pieces.append(f"{start}{text}{end}" if run_trained else text)
            run = []
        run.append(token_id)
        run_trained = trained
    if run:
        text = tokenizer.decode(run)
        pieces.append(f"{start}{text}{end}" if run_trained else text)
    return "".join(pieces)


@exit_on_user_error
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip() + "\n\nRecipe keys: see python train.py --help")
        return
    count, as_json, rest = split_preview_args(argv)
    model_args, data_args, training_args, _ = parse_recipe(rest)
    train_rows, _ = read_datasets(data_args, seed=training_args.seed)
    tokenizer, family = load_tokenizer(
        model_args.model_name_or_path, model_args.template, training_args.trust_remote_code
    )
    dataset = tokenize_rows(
        train_rows[:count] if not as_json else train_rows,
        tokenizer,
        max_length=training_args.max_length,
        last_turn_only=data_args.last_turn_only,
        name="train",
    )
    color = sys.stdout.isatty()
    for example in dataset.select(range(min(count, len(dataset)))):
        if as_json:
            record = {
                "text": tokenizer.decode(example["input_ids"]),
                "input_ids": example["input_ids"],
                "labels": example["labels"],
                "source": example["source"],
            }
            print(json.dumps(record, ensure_ascii=False))
        else:
            trained = sum(label != IGNORE_INDEX for label in example["labels"])
            print(f"--- {example['source']} ({family} format, {len(example['input_ids'])} tokens, {trained} trained)")
            print(marked_text(tokenizer, example["input_ids"], example["labels"], color))


if __name__ == "__main__":
    main()
