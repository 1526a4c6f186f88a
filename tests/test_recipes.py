"""Every recipe parses, and the GPU recipes run on the tiny model of their family."""

import pytest
import yaml
from conftest import REPO, assert_serves_the_trained_weights

from glm_sft.arguments import parse_recipe

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
# The tiny stand-in of each recipe's checkpoint, by the recipe's name.
TINY_MODELS = [
    ("glm4_0414", "builtin:tiny-glm4-0414"),
    ("glmz1", "builtin:tiny-glmz1"),
    ("glm45", "builtin:tiny-glm45"),
    ("glm47_flash", "builtin:tiny-glm47-flash"),
    ("glm5", "builtin:tiny-glm5"),
    ("glm4", "builtin:tiny-glm4"),
    ("glm3", "builtin:tiny-chatglm3"),
]


def tiny_model(stem: str) -> str:
    return next(model for prefix, model in TINY_MODELS if stem.startswith(prefix))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.name)
def test_recipe_parses_and_opens_with_its_instructions(recipe):
    recipe_args = parse_recipe(["--config", str(recipe), "--bf16", "false"])
    assert recipe_args.model.model_name_or_path and recipe_args.data.dataset_name and recipe_args.training.output_dir
    header = recipe.read_text(encoding="utf-8").split("\n\n")[0]
    assert header.startswith("# ") and "train.py --config recipes/" + recipe.name in header
    assert "Memory" in header


def test_command_line_overrides_the_recipe():
    argv = ["--config", "recipes/glm4_lora.yaml", "--learning_rate", "1e-4", "--lora_rank", "4", "--bf16", "false"]
    recipe = parse_recipe(argv)
    assert recipe.training.learning_rate == 1e-4 and recipe.model.lora_rank == 4 and recipe.training.bf16 is False
    # The keys the user set: the recipe file's, in its order (these overrides among them), then any the command line
    # adds; nothing else (padding_free is left to the run).
    file_keys = list(yaml.safe_load((REPO / "recipes" / "glm4_lora.yaml").read_text(encoding="utf-8")))
    assert {"learning_rate", "lora_rank", "bf16"} <= set(file_keys) and "max_samples" not in file_keys
    assert recipe.given == file_keys
    assert parse_recipe([*argv, "--max_samples", "10"]).given == [*file_keys, "max_samples"]
    assert recipe.resolved()["lora_rank"] == 4 and "padding_free" not in recipe.resolved()


GPU_RECIPES = [path for path in RECIPES if not path.stem.startswith("demo")]  # the demos have tests of their own


@pytest.mark.parametrize("recipe", GPU_RECIPES, ids=lambda path: path.name)
@pytest.mark.slow
def test_gpu_recipe_runs_two_steps_on_the_tiny_model(recipe, tmp_path, capfd, monkeypatch):
    """In this process (train.main, as `python train.py` calls it), to spare eight interpreter start-ups."""
    import train

    monkeypatch.chdir(REPO)
    output_dir = tmp_path / "out"
    argv = ["--config", f"recipes/{recipe.name}", "--model_name_or_path", tiny_model(recipe.stem), "--bf16"]
    train.main(argv + ["false", "--max_steps", "2", "--eval_steps", "1", "--output_dir", str(output_dir)])
    captured = capfd.readouterr()
    assert "eval_loss" in captured.out + captured.err  # val_size held rows out and they were evaluated
    flag = "--model" if (output_dir / "config.json").exists() else "--adapter"  # full fine-tunes save a whole model
    assert_serves_the_trained_weights(flag, output_dir, tiny_model(recipe.stem), prompt="你好")
