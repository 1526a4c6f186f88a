"""Serve a fine-tuned GLM model over an OpenAI-compatible API: POST /v1/chat/completions and GET /v1/models.

    python serve.py --adapter output/demo                          # http://127.0.0.1:8000/v1
    python serve.py --model output/glm4-export --port 8080         # a full fine-tune or an exported directory
    python serve.py --adapter output/demo --api_key sk-local       # clients send Authorization: Bearer sk-local
    python serve.py --adapter output/demo --host 0.0.0.0 --api_key sk-local   # reachable from other machines

Any OpenAI client works against it (base_url http://127.0.0.1:8000/v1). Replies are rendered with the template and
stop ids the model was trained with; a request with `tools` gets its calls back as `tool_calls` (finish_reason
"tool_calls"), parsed by the family's own parser, the one chat_cli uses. A thinking family's reasoning comes apart
from the answer, as `reasoning_content`; `chat_template_kwargs` ({"enable_thinking": false}) reach the template.
One model in one process, owned by one thread. The requests that arrive together are generated together, up to
--max_batch_size (16) at a time, each joining the running batch at the next step and leaving it when its reply ends;
each gets the reply it gets alone, greedy token for token (--max_batch_size 1: one at a time). A request that cannot
be served (bad JSON, an unknown role, a prompt longer than the context, a tool result with no call) gets a 400 with an
OpenAI error body.

On SIGTERM or Ctrl-C the server stops accepting, answers the requests still waiting with a 503, gives the replies being
written --shutdown_timeout seconds (30) to finish and ends the others with an error event and `data: [DONE]`; it exits
with 0 after SIGTERM, 130 after Ctrl-C. A second signal ends the wait at once.

Input is bounded before it costs the model anything: a body over --max_request_bytes (default 4 MiB) gets a 413 as
soon as its Content-Length says so, or as its bytes pass the limit; bodies are read, checked and their prompts counted
on a thread of their own, so a prompt longer than the context gets its 400 without waiting for the model. With
--api_key, every path but /health (the OpenAPI schema included) needs the key.

This file is the command; the server is the package glm_sft/serving (docs/serving.md says which module holds what).
"""

import argparse
import asyncio
import math
import os
import signal
import sys

import uvicorn

from glm_sft import exit_on_user_error
from glm_sft.inference import add_model_arguments, check_model_arguments, load_from_arguments
from glm_sft.serving.app import DEFAULT_MAX_REQUEST_BYTES, create_app
from glm_sft.serving.worker import ModelWorker

API_KEY_VARIABLE = "GLM_SFT_API_KEY"
DEFAULT_MAX_BATCH_SIZE = 16  # replies generated together
DEFAULT_SHUTDOWN_TIMEOUT = 30.0  # seconds the replies being written get to finish at shutdown
SHUTDOWN_MARGIN = 10.0  # seconds after that for their last events to be sent


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: any free port)")
    parser.add_argument(
        "--api_key",
        "--api-key",
        default=None,
        help=f"require Authorization: Bearer KEY (default: ${API_KEY_VARIABLE})",
    )
    parser.add_argument(
        "--served_model_name", "--served-model-name", help="the model id clients see (default: --adapter or --model)"
    )
    parser.add_argument(
        "--max_new_tokens", "--max-new-tokens", type=int, default=512, help="reply length when max_tokens is not set"
    )
    parser.add_argument("--temperature", type=float, default=0.8, help="when a request sets none; 0 means greedy")
    parser.add_argument("--top_p", "--top-p", type=float, default=0.8, help="when a request sets none")
    parser.add_argument(
        "--max_request_bytes",
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help=f"larger request bodies get a 413 before they are read (default {DEFAULT_MAX_REQUEST_BYTES}, 4 MiB; "
        "raise it for a model whose context holds more than about a million characters)",
    )
    parser.add_argument(
        "--max_batch_size",
        "--max-batch-size",
        type=int,
        default=DEFAULT_MAX_BATCH_SIZE,
        help=f"how many replies are generated together (default {DEFAULT_MAX_BATCH_SIZE}; 1: one at a time)",
    )
    parser.add_argument(
        "--shutdown_timeout",
        "--shutdown-timeout",
        type=float,
        default=DEFAULT_SHUTDOWN_TIMEOUT,
        help=f"on SIGTERM or Ctrl-C, the seconds the replies being written get to finish (default "
        f"{DEFAULT_SHUTDOWN_TIMEOUT:g}); those still running then end with an error event",
    )
    args = parser.parse_args(argv)
    check_model_arguments(parser, args)
    if not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    if args.max_request_bytes < 1:
        parser.error("--max_request_bytes must be at least 1")
    if args.max_batch_size < 1:
        parser.error("--max_batch_size must be at least 1")
    if not 0 <= args.shutdown_timeout < math.inf:
        parser.error("--shutdown_timeout must be a number of seconds, 0 or more")
    if args.api_key is None:
        args.api_key = os.environ.get(API_KEY_VARIABLE) or None
    return args


class Server(uvicorn.Server):
    """uvicorn's server, which says where it listens once it does, and shuts down gracefully. On SIGINT or SIGTERM
    it stops accepting connections, answers the requests still waiting for the model with a 503, and gives the replies
    being written `shutdown_timeout` seconds to finish; those still running then end with an error event (and
    `data: [DONE]` when streamed). A second signal ends that wait at once. The model thread has ended before run()
    returns (a thread still in the model when the interpreter exits can abort it)."""

    def __init__(self, config: uvicorn.Config, *, worker: ModelWorker, shutdown_timeout: float, announce):
        super().__init__(config)
        self.worker, self.shutdown_timeout, self.announce = worker, shutdown_timeout, announce
        self.exit_signals: list[int] = []
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None):
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.announce(host, port)

    def handle_exit(self, sig, frame) -> None:  # the signal handler, in the event loop's thread
        self.exit_signals.append(sig)
        if self.should_exit:  # a second signal: the replies still running end now
            self.shutdown_timeout = 0
            if self.loop is not None:
                self.loop.call_soon_threadsafe(self.worker.end_running)
        self.should_exit = True  # the signal is not raised again once the server has stopped, unlike uvicorn's

    async def shutdown(self, sockets=None):
        self.worker.begin_shutdown(self.shutdown_timeout)
        await super().shutdown(sockets=sockets)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    chat = load_from_arguments(args)
    app = create_app(
        chat,
        served_name=args.served_model_name,
        api_key=args.api_key,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        max_request_bytes=args.max_request_bytes,
        max_batch_size=args.max_batch_size,
    )

    def announce(host, port):
        shown = f"[{host}]" if ":" in host else host
        key = "API key required" if args.api_key else "no API key"
        print(f"serving {chat.name} ({chat.family}) at http://{shown}:{port}/v1 ({key})", flush=True)
        if not args.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: listening on {args.host} with no API key: anyone who reaches it can use it")

    # uvicorn cuts what is still open this long after the signal: only if the model thread is stuck in one step.
    grace = args.shutdown_timeout + SHUTDOWN_MARGIN
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=grace)
    server = Server(config, worker=app.state.worker, shutdown_timeout=args.shutdown_timeout, announce=announce)
    try:
        server.run()  # a port in use ends it with one uvicorn error line and a non-zero exit
    finally:
        stopped = app.state.worker.close()
    if not stopped:  # the model thread is stuck: leave without finalizing the interpreter under it
        print("error: the model thread did not stop; exiting without it", file=sys.stderr, flush=True)
        os._exit(1)
    if signal.SIGINT in server.exit_signals:
        sys.exit(130)  # Ctrl-C, as every glm-sft script ends on it; SIGTERM ends with 0


if __name__ == "__main__":
    main()
