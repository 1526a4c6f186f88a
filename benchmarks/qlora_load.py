"""Peak memory of loading an MoE checkpoint for QLoRA: the routed experts quantized as they load, against the route
before (the whole model loaded with bf16 experts, then quantized).

    python benchmarks/qlora_load.py                                   # CPU: tiny-moe with 16 MoE layers
    python benchmarks/qlora_load.py --model glm47-flash               # GPU: GLM-4.7-Flash's widths, 8 layers

The shapes are train_throughput.py's (--layers overrides the layer count). The checkpoint (random weights, bf16, one
tensor per expert as the hub's are) is written once to --work; each route then loads it in a fresh process with the
QLoRA config (NF4, double quantization):
- `after_load`: transformers' bitsandbytes 4-bit load, which leaves the 3-D experts in bf16, then
  glm_sft.quantized_experts.quantize_experts;
- `at_load`: glm_sft.loading.load_model, which stores each layer's experts in NF4 as they load.

Each reports the peak memory the load added (CUDA: torch.cuda.max_memory_allocated; CPU: the process's anonymous
resident memory, sampled every 2 ms, above what it held before the load), the weight bytes held after it, the
seconds, and whether the two routes hold the same expert codes. Writes --output (JSON) and prints a table.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

ROUTES = ("after_load", "at_load")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-moe", help="an MoE shape of train_throughput.py")
    parser.add_argument("--layers", type=int, default=None, help="layers (default: 16 for tiny-moe, else the shape's)")
    parser.add_argument("--work", default=None, help="where the checkpoint goes (default: a temporary folder)")
    parser.add_argument("--output", default="qlora_load.json")
    parser.add_argument(
        "--in_process",
        action="store_true",
        help="both routes in this process, one after the other: checks the steps (gpu_throughput's dry run); the "
        "memory figures are then not comparable",
    )
    parser.add_argument("--route", choices=ROUTES, help=argparse.SUPPRESS)  # one route, in a fresh process
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.layers is None and args.model == "tiny-moe":
        args.layers = 16
    return args


def write_checkpoint(args, folder: Path) -> dict:
    """The shape with random weights, saved in bf16 (per-expert tensors, as the released checkpoints store them)."""
    import torch
    import train_throughput

    name, shape = args.model, train_throughput.MODELS[args.model]
    if args.layers is not None:  # the shape with that many layers, beside it under a name of its own
        shape = dict(shape, num_hidden_layers=args.layers)
        if "mlp_layer_types" in shape:  # GLM-4.7-Flash: layer 0 dense, as released
            shape["mlp_layer_types"] = ["dense"] + ["sparse"] * (args.layers - 1)
        name = f"{args.model}-{args.layers}-layers"
        train_throughput.MODELS[name] = shape
    model = train_throughput.build_model(argparse.Namespace(model=name, max_length=128), dtype=torch.bfloat16)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    model.save_pretrained(folder)
    return {"parameters": sum(p.numel() for p in model.parameters()), "layers": model.config.num_hidden_layers}


class PeakMemory:
    """The most memory the process held above `start` while open: CUDA allocations on a GPU, else anonymous resident
    memory (RssAnon) sampled in a thread."""

    def __init__(self, cuda: bool):
        self.cuda, self.peak, self._done = cuda, 0, threading.Event()

    @staticmethod
    def anonymous() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        return 0

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self.anonymous()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._done.is_set():
            self.peak = max(self.peak, self.anonymous() - self.start)
            time.sleep(0.002)

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self._done.set()
            self._thread.join()
            self.peak = max(self.peak, self.anonymous() - self.start)


def run_route(args) -> dict:
    """Load the checkpoint one way in this process; its figures."""
    import hashlib

    import torch
    import train_throughput
    from transformers import AutoModelForCausalLM

    from glm_sft.arguments import ModelArguments
    from glm_sft.experts import routed_experts
    from glm_sft.loading import load_model, quiet_transformers
    from glm_sft.methods import quantization_config
    from glm_sft.quantized_experts import is_quantized, quantize_experts

    quiet_transformers()
    config = quantization_config(ModelArguments(finetuning_type="qlora", quantization_compute_dtype="bfloat16"))
    cuda = torch.cuda.is_available()
    start = time.perf_counter()
    with PeakMemory(cuda) as memory:
        if args.route == "at_load":
            model = load_model(args.work, dtype=torch.bfloat16, quantization=config)
        else:
            model = AutoModelForCausalLM.from_pretrained(args.work, dtype=torch.bfloat16, quantization_config=config)
            quantize_experts(model)
    seconds = time.perf_counter() - start
    experts = routed_experts(model)
    assert experts and all(map(is_quantized, experts)), "the routed experts are not in 4-bit"
    weights, expert_weights = train_throughput.weight_bytes(model)
    codes = hashlib.sha256()
    for module in experts:
        for tensor in module.parameters():
            codes.update(tensor.detach().cpu().numpy().tobytes())
    return {
        "route": args.route,
        "device": torch.cuda.get_device_name() if cuda else "CPU",
        "peak_load_memory_mb": round(memory.peak / 2**20, 1),
        "weight_bytes": weights,
        "expert_weight_bytes": expert_weights,
        "seconds": round(seconds, 2),
        "expert_codes_sha256": codes.hexdigest(),
    }


def run_all(args) -> dict:
    work = Path(args.work or tempfile.mkdtemp(prefix="qlora-load-"))
    try:
        if not (work / "config.json").exists():
            work.mkdir(parents=True, exist_ok=True)
            shape = write_checkpoint(args, work)
        else:
            shape = {"layers": json.loads((work / "config.json").read_text()).get("num_hidden_layers")}
        routes = {}
        for route in ROUTES:
            if args.in_process:
                routes[route] = run_route(argparse.Namespace(route=route, work=str(work)))
                continue
            with tempfile.NamedTemporaryFile(suffix=".json") as result:
                command = [sys.executable, __file__, "--route", route, "--work", str(work), "--result", result.name]
                done = subprocess.run(command, cwd=REPO, text=True, capture_output=True)
                if done.returncode != 0:
                    raise SystemExit(f"{route} failed:\n{done.stderr[-3000:]}")
                routes[route] = json.loads(Path(result.name).read_text())
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    after, at = routes["after_load"], routes["at_load"]
    return {
        "model": args.model,
        **shape,
        "in_process": args.in_process,
        "device": at["device"],
        "routes": routes,
        "at_load_vs_after_load": {
            "peak_load_memory": round(at["peak_load_memory_mb"] / max(after["peak_load_memory_mb"], 1e-9), 3),
            "same_expert_codes": at["expert_codes_sha256"] == after["expert_codes_sha256"],
        },
    }


def table(report) -> str:
    lines = [
        f"{report['model']}, {report['layers']} layers, on {report['device']}"
        + (" (both routes in one process: the memory figures are not comparable)" if report["in_process"] else ""),
        "| route | peak load memory | weights held after | experts | seconds |",
        "|---|---|---|---|---|",
    ]
    for name, route in report["routes"].items():
        lines.append(
            f"| {name} | {route['peak_load_memory_mb']:.0f} MB | {route['weight_bytes'] / 2**20:.0f} MB | "
            f"{route['expert_weight_bytes'] / 2**20:.0f} MB | {route['seconds']:.1f} |"
        )
    ratio = report["at_load_vs_after_load"]
    lines.append(
        f"at_load / after_load peak: {ratio['peak_load_memory']:.2f}x; same expert codes: {ratio['same_expert_codes']}"
    )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.route:
        Path(args.result).write_text(json.dumps(run_route(args)))
        return
    report = run_all(args)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))


if __name__ == "__main__":
    main()
