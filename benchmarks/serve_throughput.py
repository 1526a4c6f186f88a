"""serve.py's throughput: in-flight batching against the one-at-a-time path, measured in the same run.

Each arm is `python serve.py --max_batch_size N` (N 1: one request at a time, through ChatModel.stream_parts; N above
1: the replies of the requests waiting generated together), on a free loopback port, loaded by `concurrency` clients
in a closed loop (each sends its next request when its reply has come) at each concurrency level. The requests are the
same in every arm: the instructions of data/alpaca_zh_demo.json in turn, greedy unless --temperature says otherwise
(greedy, each arm must write the same replies, which is checked), max_tokens cycling over 1/2, 3/4 and all of
--max_tokens so the replies end at different times (the untrained tiny model rarely ends a reply by itself).

Figures per arm and level: requests_per_s (requests over the wall time of the level), p50_s / p95_s (latency of a
request: sent to its last byte), tokens_per_s (generated tokens over the wall time), and the batched arm's throughput
over the one-at-a-time arm's (speedup). The client runs in this process: on a small machine it shares the CPU with
the server, in both arms alike.

python benchmarks/serve_throughput.py                                   # tiny-glm4 on the CPU, about two minutes
python benchmarks/serve_throughput.py --adapter output/demo --output serve.json   # the demo adapter
python benchmarks/serve_throughput.py --concurrency 1,4,16,32 --requests 16,48,128,256 --stream
"""

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="what serve.py serves (default builtin:tiny-glm4)")
    parser.add_argument("--adapter", default=None, help="a train.py adapter to serve instead")
    parser.add_argument("--concurrency", default="1,4,16", help="comma list of concurrent clients")
    parser.add_argument("--requests", default="16,48,128", help="comma list: requests sent at each level")
    parser.add_argument("--max_batch_sizes", default="1,16", help="comma list of arms (1: one at a time)")
    parser.add_argument("--max_tokens", type=int, default=64, help="the longest reply (default 64)")
    parser.add_argument("--stream", action="store_true", help="streamed requests (server-sent events)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy, replies compared")
    parser.add_argument(
        "--output", default="output/serve_throughput.json", help="where the figures go (JSON; output/ is not tracked)"
    )
    args = parser.parse_args(argv)
    args.concurrency = [int(value) for value in args.concurrency.split(",")]
    args.requests = [int(value) for value in args.requests.split(",")]
    args.max_batch_sizes = [int(value) for value in args.max_batch_sizes.split(",")]
    if len(args.requests) != len(args.concurrency):
        parser.error("--requests needs one count per --concurrency level")
    if not args.model and not args.adapter:
        args.model = "builtin:tiny-glm4"
    return args


def request_bodies(count: int, max_tokens: int, stream: bool, temperature: float) -> list[dict]:
    rows = json.loads((REPO / "data" / "alpaca_zh_demo.json").read_text(encoding="utf-8"))
    lengths = [max(max_tokens // 2, 1), max(3 * max_tokens // 4, 1), max_tokens]
    return [
        {
            "model": "bench",
            "messages": [{"role": "user", "content": rows[number % len(rows)]["instruction"]}],
            "temperature": temperature,
            "max_tokens": lengths[number % len(lengths)],
            "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {}),
        }
        for number in range(count)
    ]


def start_server(args, max_batch_size: int, log_path: Path):
    """`python serve.py` on a free port: (process, base URL)."""
    what = ["--adapter", args.adapter] if args.adapter else []
    what += ["--model", args.model] if args.model else []
    command = [sys.executable, "serve.py", *what, "--port", "0", "--max_batch_size", str(max_batch_size)]
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not (found := re.search(r"^serving .* at (http://\S+)", log_path.read_text(), re.MULTILINE)):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"serve.py did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    return process, found[1]


def send(client, url: str, body: dict) -> tuple[float, str, int]:
    """(latency in seconds, the reply's text, tokens generated) of one request."""
    started = time.perf_counter()
    if not body["stream"]:
        response = client.post(f"{url}/chat/completions", json=body)
        response.raise_for_status()
        completion = response.json()
        text, tokens = completion["choices"][0]["message"]["content"], completion["usage"]["completion_tokens"]
    else:
        text, tokens = "", 0
        with client.stream("POST", f"{url}/chat/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if chunk["choices"]:
                    text += chunk["choices"][0]["delta"].get("content") or ""
                elif chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    return time.perf_counter() - started, text, tokens


def load(url: str, bodies: list[dict], concurrency: int) -> dict:
    """`concurrency` clients in a closed loop until every body is answered: the level's figures and replies."""
    import httpx

    pending = list(enumerate(bodies))
    lock = threading.Lock()
    results = {}

    def client_loop():
        with httpx.Client(timeout=600) as client:
            while True:
                with lock:
                    if not pending:
                        return
                    number, body = pending.pop(0)
                results[number] = send(client, url, body)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for future in [pool.submit(client_loop) for _ in range(concurrency)]:
            future.result()
    wall = time.perf_counter() - started
    latencies = sorted(results[number][0] for number in range(len(bodies)))
    return {
        "concurrency": concurrency,
        "requests": len(bodies),
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(bodies) / wall, 3),
        "p50_s": round(statistics.median(latencies), 3),
        "p95_s": round(latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))], 3),
        "tokens_per_s": round(sum(results[number][2] for number in range(len(bodies))) / wall, 1),
        "replies": [results[number][1] for number in range(len(bodies))],
    }


def run_arm(args, max_batch_size: int, work: Path) -> dict:
    log_path = work / f"serve_{max_batch_size}.log"
    process, url = start_server(args, max_batch_size, log_path)
    try:
        load(url, request_bodies(4, args.max_tokens, args.stream, args.temperature), 2)  # warm-up: first calls
        levels = []
        for concurrency, count in zip(args.concurrency, args.requests, strict=True):
            print(f"  max_batch_size {max_batch_size}, {concurrency} concurrent ...", file=sys.stderr, flush=True)
            bodies = request_bodies(count, args.max_tokens, args.stream, args.temperature)
            levels.append(load(url, bodies, concurrency))
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
    note = re.search(r"^note: .*", log_path.read_text(), re.MULTILINE)
    return {"max_batch_size": max_batch_size, "exit_code": code, "note": note[0] if note else None, "levels": levels}


def table(report: dict) -> str:
    base = next((arm for arm in report["arms"] if arm["max_batch_size"] == 1), None)
    settings = report["settings"]
    lines = [
        f"serve.py throughput: {report['served']}, max_tokens {settings['max_tokens']}, temperature "
        f"{settings['temperature']:g}, {'streamed' if settings['stream'] else 'not streamed'}, {report['machine']}",
        "| max_batch_size | concurrent | requests | wall s | requests/s | p50 s | p95 s | tokens/s | speedup |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arm in report["arms"]:
        for index, level in enumerate(arm["levels"]):
            speedup = level["requests_per_s"] / base["levels"][index]["requests_per_s"] if base else None
            lines.append(
                f"| {arm['max_batch_size']} | {level['concurrency']} | {level['requests']} | {level['wall_s']:.1f} | "
                f"{level['requests_per_s']:.2f} | {level['p50_s']:.2f} | {level['p95_s']:.2f} | "
                f"{level['tokens_per_s']:.0f} | {f'{speedup:.1f}x' if speedup else '-'} |"
            )
    if report["same_replies"] is not None:
        lines.append(f"same replies in every arm: {'yes' if report['same_replies'] else 'NO'}")
    lines += [arm["note"] for arm in report["arms"] if arm["note"]]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    import torch

    with tempfile.TemporaryDirectory() as work:
        arms = [run_arm(args, size, Path(work)) for size in args.max_batch_sizes]
    replies = [[level.pop("replies") for level in arm["levels"]] for arm in arms]
    report = {
        "served": args.adapter or args.model,
        "settings": {"max_tokens": args.max_tokens, "stream": args.stream, "temperature": args.temperature},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {'CUDA' if torch.cuda.is_available() else 'no GPU'}",
        # greedy: every arm must write the same replies; sampled ones differ
        "same_replies": all(other == replies[0] for other in replies) if args.temperature == 0 else None,
        "arms": arms,
    }
    print(table(report))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
