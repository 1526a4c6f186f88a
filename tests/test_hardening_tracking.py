"""Runs with SwanLab give the process back as they found it: after a run (finished, or stopped by an error after
SwanLab started) sys.stdout and sys.stderr write as before and the SIGINT handler is the one found, so that several
runs in one interpreter (tests, notebooks) work with SWANLAB_MODE=local set in the environment."""

import contextlib
import io
import signal
import sys

import pytest
from conftest import REPO, run_main

TINY = ["--config", "recipes/demo.yaml", "--report_to", "swanlab", "--sample_count", "0", "--max_steps", "2"]


@pytest.fixture
def swanlab_local(tmp_path, monkeypatch):
    """SwanLab in local mode, its files under tmp_path (no saved login, no settings of the user's)."""
    pytest.importorskip("swanboard")
    monkeypatch.setenv("SWANLAB_MODE", "local")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SWANLAB_API_KEY", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(REPO)
    (tmp_path / "home").mkdir()
    yield
    from glm_sft.tracking import finish_swanlab

    finish_swanlab()  # nothing left open for the tests after this one, whatever happened here


def hooks() -> tuple:
    return sys.stdout, sys.stderr, signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), sys.excepthook


def test_two_runs_in_one_interpreter_both_print_and_give_back_streams_and_handlers(swanlab_local, tmp_path, capfd):
    import train

    found = hooks()
    for number in (1, 2):
        output_dir = tmp_path / f"run{number}"
        result = run_main(train.main, *TINY, "--output_dir", output_dir, capfd=capfd)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"saved to {output_dir}" in result.stdout  # printed through SwanLab's console capture
        assert (output_dir / "swanlog").is_dir()  # SwanLab did run, locally
        assert hooks() == found, f"after run {number}"
        assert "write" not in vars(sys.stdout) and "write" not in vars(sys.stderr)  # no wrapper left on them
        print(f"printed after run {number}")
        print(f"and to stderr after run {number}", file=sys.stderr)
        captured = capfd.readouterr()
        assert captured.out == f"printed after run {number}\n"
        assert captured.err == f"and to stderr after run {number}\n"


def test_a_run_stopped_by_an_error_after_swanlab_started_leaves_nothing_behind(swanlab_local, tmp_path, capfd):
    """A run that fails after SwanLab started, under another stdout that is closed afterwards (as pytest does between
    tests): the SIGINT handler is back at once, and the next run, which finishes the one left open, leaves this
    stdout writing (SwanLab's own clean-up would point it at the closed one: 'I/O operation on closed file')."""
    import train

    found = hooks()
    other = io.StringIO()
    with contextlib.redirect_stdout(other):
        failed = run_main(
            train.main,
            *TINY,
            "--output_dir",
            tmp_path / "failed",
            "--resume_from_checkpoint",
            tmp_path / "no-such-checkpoint",
            capfd=capfd,
        )
    other.close()
    assert failed.returncode == 1 and "resume_from_checkpoint" in failed.stderr, failed.stderr[-3000:]
    assert (tmp_path / "failed" / "swanlog").is_dir()  # SwanLab had started
    # Streams and signal handlers as found; SwanLab's excepthook (it calls the one found) stays while its run is open.
    assert hooks()[:4] == found[:4]

    result = run_main(train.main, *TINY, "--output_dir", tmp_path / "next", capfd=capfd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert hooks() == found
    print("still writing")
    assert capfd.readouterr().out == "still writing\n"
