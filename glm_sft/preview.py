"""Show rendered training examples with the trained spans marked, exactly as the trainer will see them.

    python -m glm_sft.preview --config recipes/demo.yaml [any train.py override] [--n 3] [--json true]

Trained tokens are shown in green on a terminal, between ⟦ and ⟧ otherwise. `--json` prints one object per line:
{"text": ..., "input_ids": [...], "labels": [...], "source": "file:line"}, labels -100 where untrained.
"""

import json
import sys
from dataclasses import dataclass, field

from glm_sft import UserError, exit_on_user_error
from glm_sft.arguments import parse_recipe
from glm_sft.data import read_datasets
from glm_sft.loading import load_tokenizer
from glm_sft.reasoning import reasoning_samples
from glm_sft.switches import check_switches
from glm_sft.template import IGNORE_INDEX
from glm_sft.tokenization import tokenize_dataset


@dataclass
class PreviewArguments:
    n: int = field(default=3, metadata={"help": "How many examples to show (the first N training rows)."})
    json: bool = field(default=False, metadata={"help": "One JSON object per example instead of marked text."})


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
    recipe = parse_recipe(argv, extra=(PreviewArguments,), description=__doc__, prog="-m glm_sft.preview")
    (options,) = recipe.extra
    if options.n < 1:
        raise UserError("--n needs a positive number of examples")
    train_rows, _ = read_datasets(recipe.data, seed=recipe.training.seed)
    tokenizer, family = load_tokenizer(
        recipe.model.model_name_or_path, recipe.model.template, recipe.training.trust_remote_code
    )
    switches = check_switches(recipe.data.chat_template_kwargs, family)
    train_rows = reasoning_samples(train_rows, family, recipe.data.last_turn_only, switches)  # as training splits them
    dataset = tokenize_dataset(
        train_rows[: options.n] if not options.json else train_rows,
        tokenizer,
        name="train",
        max_length=recipe.training.max_length,
        last_turn_only=recipe.data.last_turn_only,
        template_kwargs=switches or None,
        truncation_mode=recipe.training.truncation_mode,
    )
    color = sys.stdout.isatty()
    for example in dataset.select(range(min(options.n, len(dataset)))):
        if options.json:
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
