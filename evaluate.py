"""Score a fine-tuned GLM model on conversations: ROUGE-1/2/L and BLEU-4 on jieba words, exact match.

    python evaluate.py --adapter output/demo --dataset_name data/self_cognition.jsonl --output_dir output/demo-eval
    python evaluate.py --model output/full-run --dataset_name data/dev.jsonl --output_dir eval/full --batch_size 16

Each row's prompt is its conversation up to the last assistant turn; that turn is the reference. Replies are greedy.
Writes DIR/predictions.jsonl (prompt, reference, reply per row) and DIR/metrics.json.
"""

import argparse
import sys

from glm_sft import exit_on_user_error
from glm_sft.data import read_conversations
from glm_sft.evaluation import predict
from glm_sft.inference import add_model_arguments, check_model_arguments, load_from_arguments
from glm_sft.loading import read_run_recipe


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument(
        "--dataset_name", "--dataset-name", required=True, help="eval data: a file, a folder or a comma list"
    )
    parser.add_argument(
        "--output_dir", "--output-dir", required=True, help="where predictions.jsonl and metrics.json go"
    )
    parser.add_argument(
        "--max_new_tokens", "--max-new-tokens", type=int, default=512, help="longest reply, in tokens (default 512)"
    )
    parser.add_argument(
        "--batch_size", "--batch-size", type=int, default=8, help="prompts generated together (default 8)"
    )
    parser.add_argument("--max_samples", "--max-samples", type=int, help="score only the first N rows")
    # Data options; unset ones come from the run's recipe.yaml, as the model was trained with them.
    parser.add_argument(
        "--dataset_format", "--dataset-format", help="auto, messages, sharegpt, alpaca, firefly or columns"
    )
    parser.add_argument("--prompt_column", "--prompt-column", help="prompt column for the columns format")
    parser.add_argument("--response_column", "--response-column", help="response column for the columns format")
    parser.add_argument("--assistant_name", "--assistant-name", help="fills {{name}} in self-cognition data")
    parser.add_argument("--assistant_author", "--assistant-author", help="fills {{author}} in self-cognition data")
    args = parser.parse_args(argv)
    check_model_arguments(parser, args)
    if args.max_new_tokens < 1 or args.batch_size < 1:
        parser.error("--max_new_tokens and --batch_size must be at least 1")
    return args


def read_rows(args) -> list[dict]:
    """The eval conversations, read with the run's data options unless given here."""
    recipe = read_run_recipe(args.adapter or args.model)

    def option(name, default):
        value = getattr(args, name)
        return value if value is not None else recipe.get(name, default)

    rows, _ = read_conversations(
        args.dataset_name,
        dataset_format=option("dataset_format", "auto"),
        prompt_column=option("prompt_column", "prompt"),
        response_column=option("response_column", "response"),
        placeholders={"name": option("assistant_name", "") or "", "author": option("assistant_author", "") or ""},
    )
    return rows[: args.max_samples] if args.max_samples else rows


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    rows = read_rows(args)  # data problems are reported before the model loads
    chat = load_from_arguments(args)
    print(f"evaluating {chat.name} on {len(rows)} rows of {args.dataset_name}", file=sys.stderr)
    metrics = predict(
        chat.model,
        chat.tokenizer,
        rows,
        args.output_dir,
        stop_ids=chat.stop_ids,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        family=chat.family,
        template_kwargs=chat.template_kwargs,
    )
    for name, value in metrics.items():
        print(f"{name:>18}  {value}")
    print(f"wrote {args.output_dir}/predictions.jsonl and {args.output_dir}/metrics.json", file=sys.stderr)


if __name__ == "__main__":
    main()
