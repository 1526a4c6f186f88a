"""Watching a run: SwanLab set-up (mode, project, logged config) and the loss plot written at the end.

The metrics themselves reach SwanLab through transformers' own SwanLabCallback (`report_to: swanlab`); this module
starts the run it logs to, so that the mode is ours to choose and nothing ever waits on a login prompt:

  recipe key swanlab_mode, else the SWANLAB_MODE environment variable, else cloud when an API key is available
  (SWANLAB_API_KEY, or `swanlab login`) and SwanLab's server answers, else local. Local and offline runs are
  written under output_dir/swanlog (`swanlab watch output_dir/swanlog` shows the local dashboard).

SwanLab hooks into the process while a run is open: it wraps sys.stdout's and sys.stderr's write (to log the
console), installs a SIGINT handler and sys.excepthook. The SIGINT handler is given back at once (training's own
GracefulStop handles Ctrl-C; outside training Ctrl-C stops as usual), the rest when the run finishes, so that a
process that runs several trainings (tests, notebooks) gets its streams and handlers back as they were.
"""

import os
import signal
import socket
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

from glm_sft import UserError

# Our names (and SwanLab's) for its modes, mapped to what swanlab.init takes.
SWANLAB_MODES = {"cloud": "online", "online": "online", "local": "local", "offline": "offline", "disabled": "disabled"}
LOG_FOLDER = "swanlog"
LOSS_PLOT = "loss.png"
# What start_swanlab found before SwanLab hooked in (stream writes, signal handlers, excepthook), for finish_swanlab.
_found_hooks: dict | None = None
_STREAMS = ("stdout", "stderr")
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_MISSING = object()  # a stream without a `write` attribute of its own (the usual case)


def resolve_swanlab_mode(requested: str | None, training_args) -> str | None:
    """swanlab.init's mode for the recipe's swanlab_mode: explicit value, else SWANLAB_MODE, else cloud or local.

    None when report_to does not name swanlab.
    """
    if "swanlab" not in (training_args.report_to or []):
        return None
    requested = (requested or "auto").strip()
    source = "swanlab_mode"
    if requested == "auto" and os.environ.get("SWANLAB_MODE", "").strip():
        requested, source = os.environ["SWANLAB_MODE"].strip(), "SWANLAB_MODE"
    if requested != "auto":
        if requested not in SWANLAB_MODES:
            raise UserError(
                f"{source} {requested!r} is unknown; use auto, cloud, local, offline or disabled "
                "(or report_to none to leave SwanLab out)"
            )
        mode = SWANLAB_MODES[requested]
    else:
        mode = "online" if _cloud_available() else "local"
    if mode == "local" and not _has_swanboard():
        # SwanLab's local mode keeps its dashboard database with swanboard; offline writes the same run files.
        print(
            "note: SwanLab local mode needs swanboard (pip install -r requirements.txt); writing an offline run "
            "instead (upload it later with `swanlab sync`)",
            file=sys.stderr,
        )
        mode = "offline"
    return mode


def _has_swanboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("swanboard") is not None


def _cloud_available(timeout: float = 3.0) -> bool:
    """An API key is configured and SwanLab's API host accepts a connection. Without a key, no network is touched."""
    import swanlab

    settings = swanlab.Settings()
    if not settings.api_key:
        return False
    url = urlparse(str(settings.api_host))
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        print(f"note: {url.hostname} cannot be reached; SwanLab runs in local mode", file=sys.stderr)
        return False


def start_swanlab(mode: str, training_args, *, config: dict) -> None:
    """Start the SwanLab run that transformers' SwanLabCallback then logs metrics to. Main process only.

    Project: swanlab_project, else SWANLAB_PROJECT, else glm-sft; experiment: run_name, else output_dir's name.
    A run an earlier training in this process left open (it stopped before finishing) is finished first.
    """
    global _found_hooks
    import swanlab

    finish_swanlab()
    found = _process_hooks()
    output_dir = Path(training_args.output_dir)
    options = dict(
        project=training_args.swanlab_project or os.environ.get("SWANLAB_PROJECT") or "glm-sft",
        name=training_args.run_name or output_dir.name,
        log_dir=str(output_dir / LOG_FOLDER),
        config=config,
        settings=swanlab.Settings(interactive=False),  # never a login prompt
    )
    _found_hooks = found
    try:
        try:
            swanlab.init(mode=mode, **options)
        except Exception as error:  # a cloud run that cannot log in or connect must not stop training
            if mode != "online":
                raise
            print(f"warning: SwanLab cloud mode failed ({error}); tracking locally instead", file=sys.stderr)
            swanlab.init(mode="local" if _has_swanboard() else "offline", reinit=True, **options)
    except BaseException:
        finish_swanlab()
        raise
    _give_back_signal_handlers(found)


def active_swanlab():
    """The swanlab module when a SwanLab run is active in this process, else None."""
    if "swanlab" not in sys.modules:
        return None  # never imported: no run to log to
    import swanlab

    return swanlab if swanlab.has_run() else None


def finish_swanlab() -> None:
    """Finish the active SwanLab run, if any; give back the stream writes, signal handlers and sys.excepthook that
    start_swanlab found."""
    global _found_hooks
    swanlab = active_swanlab()
    found, _found_hooks = _found_hooks, None
    before = _process_hooks()
    try:
        if swanlab is not None:
            swanlab.finish()
    finally:
        if found is not None:
            _give_back(found, before)


def _process_hooks() -> dict:
    """The hooks SwanLab changes: each stream object with its own `write` attribute (SwanLab sets one on the object
    to capture the console; _MISSING when there is none), the signal handlers, sys.excepthook."""
    streams = {}
    for name in _STREAMS:
        stream = getattr(sys, name)
        streams[name] = (stream, getattr(stream, "__dict__", {}).get("write", _MISSING))
    return {
        "streams": streams,
        "signals": {number: signal.getsignal(number) for number in _SIGNALS},
        "excepthook": sys.excepthook,
    }


def _set_write(stream, write) -> None:
    try:
        if write is _MISSING:
            if "write" in getattr(stream, "__dict__", {}):
                del stream.write
        else:
            stream.write = write
    except (AttributeError, TypeError):
        pass  # a stream that takes no attributes was not wrapped either


def _give_back_signal_handlers(found: dict) -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers are set from the main thread only (SwanLab set none elsewhere)
    for number, handler in found["signals"].items():
        if handler is not None and signal.getsignal(number) is not handler:
            signal.signal(number, handler)


def _give_back(found: dict, before_finish: dict) -> None:
    """After SwanLab's finish: the streams start_swanlab found write as they did then. SwanLab's own clean-up sets
    the write it wrapped on whatever sys.stdout is at the end (under pytest, another test's stream, closed by then):
    the streams current at the finish get back the write they had just before it."""
    for name in _STREAMS:
        stream, write = found["streams"][name]
        current, current_write = before_finish["streams"][name]
        if current is not stream:
            _set_write(current, current_write)
        _set_write(stream, write)
        if _from_swanlab(getattr(sys, name)):  # a stream object of SwanLab's own left in place
            setattr(sys, name, current if not _from_swanlab(current) else stream)
    _give_back_signal_handlers(found)
    if sys.excepthook is not found["excepthook"] and _from_swanlab(sys.excepthook):
        sys.excepthook = found["excepthook"]


def _from_swanlab(thing) -> bool:
    """A function, bound method or object of SwanLab's."""
    owner = getattr(thing, "__self__", thing)
    return type(owner).__module__.startswith("swanlab") or (getattr(thing, "__module__", None) or "").startswith(
        "swanlab"
    )


def log_metrics(metrics: dict, prefix: str, step: int | None = None) -> None:
    """Log numbers to the active SwanLab run, if any (e.g. do_predict's scores)."""
    swanlab = active_swanlab()
    if swanlab is not None:
        swanlab.log({f"{prefix}/{key}": value for key, value in metrics.items()}, step=step)


def plot_losses(log_history: list[dict], path, title: str = "") -> bool:
    """Train loss (and eval loss) against steps, as a PNG. False when fewer than two points were logged."""
    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]
    evals = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry and "step" in entry]
    if len(train) + len(evals) < 2:
        print(f"note: no {Path(path).name}: fewer than two losses were logged (see logging_steps)", file=sys.stderr)
        return False
    from matplotlib.figure import Figure  # no pyplot: no display, no global state

    figure = Figure(figsize=(8, 4.5), dpi=120, layout="constrained")
    axes = figure.subplots()
    if train:
        steps, losses = zip(*train, strict=True)
        axes.plot(steps, losses, marker="." if len(train) <= 50 else None, label=f"train loss (last {losses[-1]:.4g})")
    if evals:
        steps, losses = zip(*evals, strict=True)
        axes.plot(steps, losses, marker="o", label=f"eval loss (last {losses[-1]:.4g})")
    values = [loss for _, loss in train + evals]
    if min(values) > 0 and max(values) / min(values) > 20:
        from matplotlib.ticker import FuncFormatter

        axes.set_yscale("log")  # a loss falling by orders of magnitude stays readable at the end
        plain = FuncFormatter(lambda value, _: f"{value:g}")  # 0.5, 2, 10 rather than 5x10^-1
        axes.yaxis.set_major_formatter(plain)
        axes.yaxis.set_minor_formatter(plain)
    axes.set_ylabel("loss (log scale)" if axes.get_yscale() == "log" else "loss")
    axes.set_xlabel("step")
    axes.set_title(title)
    axes.grid(alpha=0.3, which="both")
    axes.legend()
    figure.savefig(path)
    return True
