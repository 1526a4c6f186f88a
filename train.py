"""Fine-tune a GLM chat model (ChatGLM3-6B, GLM-4-9B, GLM-4-0414, GLM-Z1, GLM-4.5 to 5.2, the built-in tiny models).

python train.py --config recipes/demo.yaml                 # tiny built-in model, CPU, about 30 s
python train.py --config recipes/glm4_lora.yaml --learning_rate 1e-4   # any recipe key can be overridden
accelerate launch --config_file configs/zero2.yaml train.py --config recipes/glm4_lora.yaml

The result (adapter or model, tokenizer with the chat template, stop ids, recipe.yaml) goes to output_dir;
`python chat_cli.py --adapter OUTPUT_DIR` talks to it. Every recipe key is listed by `python train.py --help`.
"""

import sys

from glm_sft import exit_on_user_error
from glm_sft.arguments import parse_recipe
from glm_sft.distributed import launch_defaults
from glm_sft.run import build_run


@exit_on_user_error
def main(argv=None):
    # The recipe: YAML defaults, command-line overrides; under accelerate launch, the devices checked first.
    recipe = parse_recipe(argv, launch_defaults=launch_defaults(), description=__doc__)
    # Data read and checked, tokenized once per machine; model loaded and prepared for its method; the trainer.
    run = build_run(recipe)
    run.trainer.accelerator.print(run.summary())
    stopped = run.train()  # resumes when resume_from_checkpoint says so; Ctrl-C / SIGTERM checkpoint and stop
    if stopped is not None:
        sys.exit(stopped)
    run.save()  # into output_dir, each file complete or not there at all
    run.predict()  # do_predict: scored replies to the eval rows
    run.finish()  # loss plot, SwanLab run closed, how to chat with the result


if __name__ == "__main__":
    main()
