"""Shared fixtures: offline mode, a private cache for the built-in models, the tiny tokenizers, a script runner.

Tiers: `python -m pytest -q` runs the fast tier (in-process, no training run in a subprocess); the full suite,
which CI runs, is `python -m pytest -q -m "slow or not slow"`. A test is slow when it is marked so or uses a fixture
that trains a model (found from the fixture's code: it calls a helper marked @trains or runs train.py, itself or
through a function of the test modules). train_in_process refuses to run for a test outside the slow tier.

SwanLab's settings come from the tests, never from the environment: every SWANLAB_* variable is dropped and
SWANLAB_MODE is "disabled" (tests/test_tracking.py and tests/test_hardening_tracking.py set their own).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("GLM_SFT_CACHE", str(REPO / ".pytest_cache" / "glm_sft"))
# Recipes report to SwanLab; tests leave it off (and unimported) unless they test it, whatever the user's shell holds.
for _name in [name for name in os.environ if name.startswith("SWANLAB_")]:
    del os.environ[_name]
os.environ["SWANLAB_MODE"] = "disabled"
sys.path.insert(0, str(REPO))

TRAINING_HELPERS: set[str] = set()  # the names of the helpers marked @trains


def trains(helper):
    """Marks a helper that trains a model: a fixture that calls it puts its tests in the slow tier."""
    TRAINING_HELPERS.add(helper.__name__)
    return helper


def _code_trains(code, namespace: dict, seen: set) -> bool:
    """Whether this code, or a test-module function it names, calls a @trains helper or runs train.py."""
    if code in seen:
        return False
    seen.add(code)
    if "train.py" in code.co_consts or TRAINING_HELPERS & set(code.co_names):
        return True
    for constant in code.co_consts:  # nested functions, comprehensions
        if hasattr(constant, "co_consts") and _code_trains(constant, namespace, seen):
            return True
    for name in code.co_names:
        function = namespace.get(name)
        inner = getattr(function, "__code__", None)
        if inner is not None and inner.co_filename.startswith(str(REPO / "tests")):
            if _code_trains(inner, function.__globals__, seen):
                return True
    return False


def fixture_trains(fixturedef) -> bool:
    function = getattr(fixturedef.func, "__wrapped__", fixturedef.func)
    code = getattr(function, "__code__", None)
    return code is not None and _code_trains(code, function.__globals__, set())


def pytest_collection_modifyitems(config, items):
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        definitions = info.name2fixturedefs.values() if info else ()
        if any(fixture_trains(fixturedef) for chain in definitions for fixturedef in chain):
            item.add_marker(pytest.mark.slow)


_running: list = [None]  # the test item being set up, run or torn down


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _running[0] = item
    try:
        return (yield)
    finally:
        _running[0] = None


def refuse_in_fast_tier(what: str) -> None:
    """A test outside the slow tier that gets here trains a model: fail it, naming the fix."""
    item = _running[0]
    if item is not None and item.get_closest_marker("slow") is None:
        pytest.fail(
            f"{item.nodeid} trains a model ({what}) but is in the fast tier: mark it @pytest.mark.slow, or train in a "
            "fixture that calls a @trains helper (tests/conftest.py)",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def glm4_tokenizer():
    from glm_sft.loading import load_tokenizer

    return load_tokenizer("builtin:tiny-glm4")[0]


@pytest.fixture(scope="session")
def chatglm3_tokenizer():
    from glm_sft.loading import load_tokenizer

    return load_tokenizer("builtin:tiny-chatglm3")[0]


@pytest.fixture(params=["glm4", "chatglm3"])
def family_and_tokenizer(request, glm4_tokenizer, chatglm3_tokenizer):
    return request.param, {"glm4": glm4_tokenizer, "chatglm3": chatglm3_tokenizer}[request.param]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def run_script(*args, cwd=REPO, timeout=600, input=None, env=None):
    """Run a repository script with this Python, as a user would; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
    )


def run_main(main, *args, capfd):
    """A script's main(argv) in this process, as `python script.py ARGS` would run it: a CompletedProcess with its
    exit code and what it printed (captured at the file descriptors, so library output counts too)."""
    capfd.readouterr()
    try:
        main([*map(str, args)])
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    captured = capfd.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


_demo_runs = {}


@trains
def trained_demo(tmp_path_factory, model_name: str = "builtin:tiny-glm4"):
    """(output_dir, CompletedProcess) of the demo recipe, trained once per model in a session, in this process
    (train_in_process; tests/test_first_hour.py runs train.py in a new interpreter, as a user does)."""
    if model_name not in _demo_runs:
        output_dir = tmp_path_factory.mktemp("demo") / "out"
        argv = ["--config", "recipes/demo.yaml", "--model_name_or_path", model_name, "--output_dir", output_dir]
        _demo_runs[model_name] = output_dir, train_in_process(*argv)
    return _demo_runs[model_name]


@trains
def trained_tools_demo(tmp_path_factory):
    """output_dir of recipes/demo_tools.yaml (the tiny GLM-4 model learns its tool calls), trained once in a session,
    in this process (tests/test_tools.py and tests/test_serve.py share it)."""
    if "tools" not in _demo_runs:
        output_dir = tmp_path_factory.mktemp("tools") / "out"
        _demo_runs["tools"] = (
            output_dir,
            train_in_process("--config", "recipes/demo_tools.yaml", "--output_dir", output_dir),
        )
    return _demo_runs["tools"][0]


def chat_once(*args) -> str:
    """chat_cli.py's one-shot answer, in this process (saves the start-up of a new interpreter)."""
    import contextlib
    import io

    import chat_cli

    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        chat_cli.main([*map(str, args)])
    return output.getvalue()


def build_run(argv):
    """glm_sft.run.build_run on the recipe of `argv`, in this process: a Run whose trainer has not trained yet."""
    from glm_sft.arguments import parse_recipe
    from glm_sft.run import build_run as build

    return build(parse_recipe(argv))


def assert_serves_the_trained_weights(flag: str, output_dir, base_name: str, prompt: str = "你是谁？") -> str:
    """chat_cli's loading path (--adapter or --model) gives the trained model, not its base: the logits differ from
    the untrained base model's, and it answers. Returns the greedy reply."""
    import torch

    from glm_sft.inference import load_chat_model
    from glm_sft.loading import load_model

    chat = load_chat_model(**{flag.removeprefix("--"): str(output_dir)})
    messages = [{"role": "user", "content": prompt}]
    ids = torch.tensor([chat.prompt_ids(messages)[0]])
    with torch.no_grad():
        trained = chat.model(input_ids=ids).logits.float()
        base = load_model(base_name, dtype=torch.float32)(input_ids=ids).logits
    assert (trained - base).abs().max() > 1e-4, f"{output_dir} gives the logits of its untrained base {base_name}"
    # All it writes, reasoning included: 6 tokens of a thinking model may all be thinking (reply() is the answer only).
    written = chat.raw_reply(messages, max_new_tokens=6)
    assert written.replace("<think>", "").replace("</think>", "").strip(), f"{output_dir} loads but answers nothing"
    return chat.reply(messages, max_new_tokens=6)


def mount_tmpfs(mount_point, options: str):
    """A real tmpfs at mount_point (e.g. "ro,size=64k": read-only; "size=256k": a small disk); skips the test where
    this sandbox cannot mount. Root can write into a chmod'ed folder, not into a read-only or full file system."""
    mount_point.mkdir(parents=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()})")
    return mount_point


def stop_process(process, log=None) -> None:
    """End a server a test started: SIGTERM, SIGKILL after 30 s; then close its log."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if log is not None:
        log.close()


@trains
def train_in_process(*argv) -> subprocess.CompletedProcess:
    """train.main(argv) in this process, from the repository, on one CPU thread (module fixtures share its result),
    as `python train.py ARGV` would run it but without a new interpreter; the run must finish. Returns what it printed
    (sys.stdout and sys.stderr) as run_script does."""
    import contextlib
    import io

    import train

    refuse_in_fast_tier("train_in_process " + " ".join(map(str, argv)))
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.chdir(REPO)
        try:
            train.main([*map(str, argv)])
        except SystemExit as stop:
            said = err.getvalue()[-3000:]
            assert stop.code in (0, None), f"train.py {' '.join(map(str, argv))} exited with {stop.code}: {said}"
    return subprocess.CompletedProcess(argv, 0, out.getvalue(), err.getvalue())


def glm_moe_dsa_tokenizer_dir(folder: Path, released_family: str, edit=None) -> Path:
    """A tokenizer directory as a GLM-5 / 5.1 / 5.2 checkpoint ships it, without weights: config.json with model type
    glm_moe_dsa and the released text of `released_family` (optionally edited by `edit(text) -> text`) as
    chat_template.jinja, on the tiny GLM-4.7-Flash tokenizer (GLM-5's special tokens are GLM-4.5's)."""
    import shutil

    from glm_sft.builtin import builtin_path

    source = builtin_path("builtin:tiny-glm47-flash")
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, folder / name)
    text = (REPO / "glm_sft" / "templates" / "released" / f"{released_family}.jinja").read_text(encoding="utf-8")
    (folder / "chat_template.jinja").write_text(edit(text) if edit else text, encoding="utf-8")
    config = {"model_type": "glm_moe_dsa", "architectures": ["GlmMoeDsaForCausalLM"]}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder
