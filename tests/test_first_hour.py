"""A new user's first hour: messages that point the right way, a REPL that behaves, quiet logs."""

import threading
import time

import pytest
from conftest import build_run, run_main, run_script

import chat_cli
import train
from glm_sft import UserError
from glm_sft.loading import resolve_model_path


def test_missing_converted_chatglm3_names_the_checkpoint_the_download_and_the_conversion(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a fresh clone: no models/ folder
    with pytest.raises(UserError) as raised:
        resolve_model_path("models/chatglm3-6b-hf")
    message = str(raised.value)
    assert "THUDM/chatglm3-6b" in message
    assert "hf download THUDM/chatglm3-6b --local-dir models/chatglm3-6b" in message
    assert "modelscope download --model ZhipuAI/chatglm3-6b" in message  # as the recipe comments spell it
    assert "python convert_chatglm3.py models/chatglm3-6b --out models/chatglm3-6b-hf" in message
    assert "hf download models/" not in message  # the local path is not taken for a hub id


def test_the_glm3_recipe_without_weights_stops_at_once_with_that_message(tmp_path, monkeypatch, capfd):
    from pathlib import Path

    repo = Path(train.__file__).parent
    monkeypatch.chdir(tmp_path)
    argv = ["--config", repo / "recipes/glm3_lora.yaml", "--bf16", "false", "--report_to", "none"]
    result = run_main(train.main, *argv, "--dataset_name", repo / "data/alpaca_zh_demo.json", capfd=capfd)
    assert result.returncode == 1 and "convert_chatglm3.py models/chatglm3-6b" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unreachable_hub_fails_fast_without_offline_mode(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    attempts = []

    def no_network(address, timeout=None):
        attempts.append((address, timeout))
        raise OSError("Network is unreachable")

    monkeypatch.setattr("socket.create_connection", no_network)
    start = time.monotonic()
    with pytest.raises(UserError, match="huggingface.co cannot be reached; download it with `hf download THUDM/"):
        resolve_model_path("THUDM/glm-4-9b-chat-hf")
    assert time.monotonic() - start < 5 and len(attempts) == 1 and attempts[0][1] <= 5


def test_model_flag_on_an_adapter_directory_suggests_adapter(tmp_path, capfd):
    (tmp_path / "adapter_config.json").write_text('{"base_model_name_or_path": "builtin:tiny-glm4"}')
    result = run_main(chat_cli.main, "--model", tmp_path, "--prompt", "hi", capfd=capfd)
    assert result.returncode == 1
    assert f"error: {tmp_path} is an adapter directory, not a model; use --adapter {tmp_path}" in result.stderr


def test_stopping_a_streamed_reply_stops_the_generation_thread(glm4_tokenizer):
    """Ctrl-C in the REPL closes the stream: the generate thread ends at its next token, not a minute later."""
    import dataclasses

    from glm_sft.inference import GENERATION_THREAD, load_chat_model

    chat = load_chat_model("builtin:tiny-glm4")
    # Random weights may write an end-of-turn token at once; stop only at a token it never writes here.
    chat = dataclasses.replace(chat, stop_ids=[chat.tokenizer.convert_tokens_to_ids("<|end_of_video|>")])
    stop = threading.Event()

    def generating():
        return [thread for thread in threading.enumerate() if thread.name == GENERATION_THREAD]

    stream = chat.stream([{"role": "user", "content": "你好"}], max_new_tokens=2000, stop=stop)
    next(stream)  # generation is under way
    assert len(generating()) == 1
    start = time.monotonic()
    stream.close()  # what KeyboardInterrupt in the reading loop does
    assert stop.is_set() and generating() == []
    assert time.monotonic() - start < 5


def test_repl_ctrl_c_during_a_reply_keeps_the_conversation_and_goes_on(monkeypatch, capsys):
    """The REPL drops the interrupted question, says so, and reads the next line."""
    calls = []

    class InterruptedChat:
        family = "glm4"

        def stream_parts(self, messages, **settings):  # (kind, piece) as ChatModel streams them
            calls.append([message["content"] for message in messages])
            if len(calls) == 1:
                raise KeyboardInterrupt
            yield "answer", "好的"

    lines = iter(["第一个问题", "第二个问题", "exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    args = chat_cli.parse_args(["--model", "builtin:tiny-glm4", "--temperature", "0"])
    chat_cli.repl(InterruptedChat(), args, tools=None)
    assert calls == [["第一个问题"], ["第二个问题"]]  # the interrupted question was not kept in the history
    assert "(reply stopped)" in capsys.readouterr().out


def test_batch_of_one_row_trains_padded_and_trl_does_not_warn(tmp_path, caplog):
    """per_device_train_batch_size 1 (the GPU recipes' default) has no padding to remove: padded batches, random
    order, and no TRL warning about padding-free at batch 1."""
    argv = ["--config", "recipes/demo.yaml", "--output_dir", tmp_path / "o", "--report_to", "none"]
    with caplog.at_level("WARNING"):
        run = build_run([*map(str, argv), "--per_device_train_batch_size", "1", "--sample_count", "0"])
    assert not run.trainer.data_collator.padding_free and run.recipe.training.train_sampling_strategy == "random"
    assert run.choices[0] == (
        "batches: padded to their longest row (per_device_train_batch_size 1: no padding to remove); sampling: random"
    )
    assert "batch size of 1" not in caplog.text


@pytest.mark.slow  # a training run in a subprocess
def test_a_run_prints_none_of_the_known_noise(tmp_path):
    """As a user runs a GPU recipe on the tiny model: no PEFT builtin-config lookup, gradient-checkpointing rename,
    pin_memory or TRL batch-size warning, no DeepSpeed accelerator line."""
    argv = ["--config", "recipes/glm4_lora.yaml", "--model_name_or_path", "builtin:tiny-glm4", "--bf16", "false"]
    argv += ["--max_steps", "1", "--eval_strategy", "no", "--val_size", "0", "--output_dir", tmp_path / "out"]
    result = run_script("train.py", *argv, "--report_to", "none", "--sample_count", "0")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    noises = ["Could not find a config file", "is_gradient_checkpointing", "pin_memory", "batch size of 1"]
    for noise in noises + ["Setting accelerator to CPU"]:
        assert noise not in output, noise


def test_importing_deepspeed_on_a_cpu_machine_says_nothing():
    """DeepSpeed (imported by transformers, also for export and chat) announces at import that it found no GPU."""
    result = run_script("-c", "import glm_sft, deepspeed, torch; print(torch.cuda.is_available())")
    assert result.returncode == 0, result.stderr[-2000:]
    if result.stdout.strip() == "False":
        assert "Setting accelerator to CPU" not in result.stdout + result.stderr


def test_a_failing_generation_raises_in_the_reader_instead_of_hanging(glm4_tokenizer):
    import torch

    from glm_sft.inference import ChatModel

    class BrokenModel(torch.nn.Module):
        config = type("Config", (), {"max_position_embeddings": 64})()
        device = torch.device("cpu")

        def generate(self, **kwargs):
            raise RuntimeError("out of memory")

    chat = ChatModel(BrokenModel(), glm4_tokenizer, "glm4", stop_ids=[0])
    with pytest.raises(RuntimeError, match="out of memory"):
        chat.reply([{"role": "user", "content": "你好"}], max_new_tokens=4)
