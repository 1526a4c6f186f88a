"""Watching a run: SwanLab set-up (mode, project, logged config) and the loss plot written at the end.

The metrics themselves reach SwanLab through transformers' own SwanLabCallback (`report_to: swanlab`); this module
starts the run it logs to, so that the mode is ours to choose and nothing ever waits on a login prompt:

  recipe key swanlab_mode, else the SWANLAB_MODE environment variable, else cloud when an API key is available
  (SWANLAB_API_KEY, or `swanlab login`) and SwanLab's server answers, else local. Local and offline runs are
  written under output_dir/swanlog (`swanlab watch output_dir/swanlog` shows the local dashboard).
"""

import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from glm_sft import UserError

# Our names (and SwanLab's) for its modes, mapped to what swanlab.init takes.
SWANLAB_MODES = {"cloud": "online", "online": "online", "local": "local", "offline": "offline", "disabled": "disabled"}
LOG_FOLDER = "swanlog"
LOSS_PLOT = "loss.png"


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
    """
    import swanlab

    output_dir = Path(training_args.output_dir)
    options = dict(
        project=training_args.swanlab_project or os.environ.get("SWANLAB_PROJECT") or "glm-sft",
        name=training_args.run_name or output_dir.name,
        log_dir=str(output_dir / LOG_FOLDER),
        config=config,
        settings=swanlab.Settings(interactive=False),  # never a login prompt
    )
    try:
        swanlab.init(mode=mode, **options)
    except Exception as error:  # a cloud run that cannot log in or connect must not stop training
        if mode != "online":
            raise
        print(f"warning: SwanLab cloud mode failed ({error}); tracking locally instead", file=sys.stderr)
        swanlab.init(mode="local" if _has_swanboard() else "offline", reinit=True, **options)


def active_swanlab():
    """The swanlab module when a SwanLab run is active in this process, else None."""
    if "swanlab" not in sys.modules:
        return None  # never imported: no run to log to
    import swanlab

    return swanlab if swanlab.has_run() else None


def finish_swanlab() -> None:
    swanlab = active_swanlab()
    if swanlab is not None:
        swanlab.finish()


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
