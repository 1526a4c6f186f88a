"""Watching a run: SwanLab in local mode with no key and no network, sample generations, the loss plot, do_predict."""

import json
import os
import random
import struct
from types import SimpleNamespace

import numpy
import pytest
import torch
import yaml
from conftest import run_script

from glm_sft import UserError
from glm_sft.callbacks import SampleGeneration, preserved_training_state, sample_prompts
from glm_sft.data import read_conversations
from glm_sft.metrics import score_replies
from glm_sft.tracking import resolve_swanlab_mode

# Imported first by every Python started with this folder on PYTHONPATH: records and refuses network connections.
NO_NETWORK = """
import os, socket
_connect = socket.socket.connect
def _refuse(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        with open(os.environ["NETWORK_ATTEMPTS"], "a") as log:
            log.write(repr(address) + "\\n")
        raise OSError("no network in this test")
    return _connect(self, address)
socket.socket.connect = _refuse
"""
SAVE_STEPS, MAX_STEPS, EVAL_ROWS = 12, 24, 8


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """The demo recipe for 24 steps, saving every 12, eval loss every 6, do_predict: SwanLab without key or network."""
    root = tmp_path_factory.mktemp("tracked")
    (root / "home").mkdir()
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(NO_NETWORK)
    env = {
        "HOME": str(root / "home"),  # no saved SwanLab login, no settings
        "PYTHONPATH": str(root / "site"),
        "NETWORK_ATTEMPTS": str(root / "network_attempts.txt"),
        "OMP_NUM_THREADS": "1",
    }
    env = {key: value for key, value in os.environ.items() if key not in ("SWANLAB_MODE", "SWANLAB_API_KEY")} | env
    output_dir = root / "out"
    arguments = [
        "train.py",
        "--config",
        "recipes/demo.yaml",
        "--report_to",
        "swanlab",
        "--max_steps",
        MAX_STEPS,
        "--save_strategy",
        "steps",
        "--save_steps",
        SAVE_STEPS,
        "--val_size",
        EVAL_ROWS,
        "--eval_strategy",
        "steps",
        "--eval_steps",
        6,
        "--logging_steps",
        4,
        "--do_predict",
        "true",
        "--predict_max_new_tokens",
        48,
        "--output_dir",
        output_dir,
    ]
    result = run_script(
        *arguments,
        env=env,
        input="",  # a login prompt would read end-of-file instead of waiting
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root, output_dir, result


def test_swanlab_runs_locally_without_key_or_network(tracked_run):
    root, output_dir, result = tracked_run
    assert not (root / "network_attempts.txt").exists()
    runs = list((output_dir / "swanlog").glob("run-*"))
    assert len(runs) == 1 and (output_dir / "swanlog" / "runs.swanlab").is_file()  # the local dashboard's database
    config = yaml.safe_load((runs[0] / "files" / "config.yaml").read_text(encoding="utf-8"))
    assert config["recipe"]["value"]["dataset_name"] == "data/self_cognition.jsonl"
    assert config["recipe"]["value"]["max_steps"] == MAX_STEPS
    assert config["data"]["value"] == {"train_rows": 85 - EVAL_ROWS, "eval_rows": EVAL_ROWS}
    trainable = config["parameters"]["value"]["trainable"]
    assert f"trainable parameters: {trainable:,} of {config['parameters']['value']['total']:,}" in result.stdout
    # The loss curve and the sample texts reached SwanLab's run files.
    run_records = next(runs[0].glob("*.swanlab")).read_bytes()
    assert b"train/loss" in run_records and b"eval/loss" in run_records
    text_steps = {path.name.split("-")[0] for path in (runs[0] / "media" / "text").iterdir()}  # STEP-HASH.txt
    assert text_steps == {"012", "024"}
    assert not list((root / "home").glob(".swanlab*"))  # nothing logged in, nothing saved for later


def test_samples_at_each_save_for_the_first_eval_rows(tracked_run):
    _, output_dir, _ = tracked_run
    records = [json.loads(line) for line in (output_dir / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [record["step"] for record in records] == [SAVE_STEPS] * 3 + [MAX_STEPS] * 3
    predictions = [json.loads(line) for line in (output_dir / "predictions.jsonl").read_text().splitlines()]
    first_eval_rows = predictions[:3]  # do_predict goes through the eval split in order
    for record, row in zip(records, first_eval_rows * 2, strict=True):
        assert record["prompt"] == row["prompt"][-1]["content"] and record["reference"] == row["reference"]
        assert isinstance(record["reply"], str)
    assert "{{name}}" not in records[0]["reference"]  # placeholders filled as in training


def test_loss_plot_and_eval_loss_every_eval_steps(tracked_run):
    _, output_dir, _ = tracked_run
    png = (output_dir / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (960, 540)
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "eval_loss" in entry] == [6, 12, 18, 24, 24]  # + the final one
    assert len([entry for entry in history if "loss" in entry]) == MAX_STEPS // 4


def test_do_predict_scores_the_eval_split(tracked_run):
    _, output_dir, result = tracked_run
    metrics = json.loads((output_dir / "metrics.json").read_text())
    predictions = [json.loads(line) for line in (output_dir / "predictions.jsonl").read_text().splitlines()]
    assert metrics["count"] == len(predictions) == EVAL_ROWS
    # The scores are those of the replies written beside them.
    rescored = score_replies([row["reply"] for row in predictions], [row["reference"] for row in predictions])
    assert metrics == rescored
    assert f"do_predict on {EVAL_ROWS} eval rows" in result.stdout


def test_do_predict_without_eval_data_is_a_user_error(tmp_path, capsys):
    import train

    with pytest.raises(SystemExit) as stop:
        train.main(["--config", "recipes/demo.yaml", "--do_predict", "true", "--output_dir", str(tmp_path / "out")])
    assert stop.value.code == 1
    last_line = capsys.readouterr().err.splitlines()[-1]
    assert last_line.startswith("error: do_predict scores replies to the eval data and there is none")


@pytest.fixture
def clean_swanlab_env(monkeypatch, tmp_path):
    for name in ("SWANLAB_MODE", "SWANLAB_API_KEY", "SWANLAB_ROOT", "SWANLAB_SAVE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # no project-level .swanlab or .env
    attempts = []

    def fake_connection(address, timeout=None):
        attempts.append(address)
        raise OSError("unreachable")

    monkeypatch.setattr("glm_sft.tracking.socket.create_connection", fake_connection)
    return monkeypatch, attempts


def test_mode_is_local_without_a_key_and_touches_no_network(clean_swanlab_env):
    _, attempts = clean_swanlab_env
    swanlab_on = SimpleNamespace(report_to=["swanlab"])
    assert resolve_swanlab_mode("auto", swanlab_on) == "local"
    assert attempts == []
    assert resolve_swanlab_mode("auto", SimpleNamespace(report_to=["tensorboard"])) is None


def test_mode_with_a_key_is_cloud_when_reachable_else_local(clean_swanlab_env, capsys):
    monkeypatch, attempts = clean_swanlab_env
    monkeypatch.setenv("SWANLAB_API_KEY", "x" * 21)
    swanlab_on = SimpleNamespace(report_to=["swanlab"])
    assert resolve_swanlab_mode("auto", swanlab_on) == "local" and len(attempts) == 1
    assert "cannot be reached" in capsys.readouterr().err

    class Connection:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr("glm_sft.tracking.socket.create_connection", lambda address, timeout=None: Connection())
    assert resolve_swanlab_mode("auto", swanlab_on) == "online"


def test_recipe_key_then_environment_choose_the_mode(clean_swanlab_env):
    monkeypatch, attempts = clean_swanlab_env
    swanlab_on = SimpleNamespace(report_to=["swanlab"])
    monkeypatch.setenv("SWANLAB_MODE", "offline")
    assert resolve_swanlab_mode("auto", swanlab_on) == "offline"
    assert resolve_swanlab_mode("cloud", swanlab_on) == "online"
    assert resolve_swanlab_mode("disabled", swanlab_on) == "disabled"
    monkeypatch.setenv("SWANLAB_MODE", "cloud")
    assert resolve_swanlab_mode("auto", swanlab_on) == "online"
    with pytest.raises(UserError, match="swanlab_mode 'web' is unknown"):
        resolve_swanlab_mode("web", swanlab_on)
    assert attempts == []


def test_sample_generation_leaves_training_as_it_was(tmp_path, monkeypatch):
    """Train mode, gradient checkpointing and the random streams of training are the same after sampling, even if
    generation drew random numbers; training goes on (forward and backward) with the same dropout masks."""
    from peft import LoraConfig, get_peft_model

    from glm_sft.inference import generation_config_for
    from glm_sft.loading import load_model, load_tokenizer

    tokenizer, family = load_tokenizer("builtin:tiny-glm4")
    model = load_model("builtin:tiny-glm4")
    model.activation_checkpointing_enable()
    model.enable_input_require_grads()
    model = get_peft_model(
        model, LoraConfig(r=4, lora_dropout=0.5, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    model.train()
    rows, _ = read_conversations("data/multi_turn.jsonl")
    samples = sample_prompts(None, rows, 2)
    trainer = SimpleNamespace(
        is_fsdp_enabled=False, processing_class=tokenizer, args=SimpleNamespace(output_dir=tmp_path)
    )
    callback = SampleGeneration(trainer, samples, generation_config_for(tokenizer, family), max_new_tokens=6)
    import glm_sft.callbacks

    real_generate = glm_sft.callbacks.generate_replies

    def generate_drawing_random_numbers(*args, **kwargs):
        assert not args[0].training  # generation runs in eval mode
        torch.rand(3), random.random(), numpy.random.rand()
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(glm_sft.callbacks, "generate_replies", generate_drawing_random_numbers)
    batch = tokenizer.apply_chat_template(rows[0]["messages"], return_dict=True, return_tensors="pt")

    def train_step(sample_first: bool):
        torch.manual_seed(0), random.seed(0), numpy.random.seed(0)
        if sample_first:
            callback.generate(
                SimpleNamespace(world_size=1), SimpleNamespace(global_step=7, is_world_process_zero=True), model
            )
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        return loss.item(), torch.rand(1).item(), random.random(), numpy.random.rand()

    assert train_step(sample_first=True) == train_step(sample_first=False)
    assert model.training and model.base_model.model.is_activation_checkpointing
    lines = (tmp_path / "samples.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["step"] for line in lines] == [7, 7]


def test_preserved_training_state_restores_mode_and_every_generator():
    model = torch.nn.Linear(2, 2)
    model.train()
    torch.manual_seed(1), random.seed(1), numpy.random.seed(1)
    expected = torch.rand(1).item(), random.random(), numpy.random.rand()
    torch.manual_seed(1), random.seed(1), numpy.random.seed(1)
    with preserved_training_state(model):
        assert not model.training
        torch.rand(5), random.random(), numpy.random.rand(5)
    assert model.training
    assert (torch.rand(1).item(), random.random(), numpy.random.rand()) == expected
