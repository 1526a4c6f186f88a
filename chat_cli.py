"""Talk to a fine-tuned GLM model.

    python chat_cli.py --adapter output/demo                       # the adapter knows its base model
    python chat_cli.py --model output/full-run                     # a full fine-tune or any GLM model directory
    python chat_cli.py --adapter output/demo --prompt "你是谁？"    # answer once, print only the reply
    python chat_cli.py --adapter output/demo-tools --tools data/tools.json   # tool calling; asks for each result

In the REPL: `clear` starts a new conversation, `exit` (or Ctrl-D) quits, Ctrl-C stops a reply.
With --tools, a reply that calls a function is printed as one JSON line {"name", "arguments"}; the result is read
from --tool_results (a JSON object: function name -> result) or asked for, and the model goes on with it.
"""

import argparse
import json
import sys
from pathlib import Path
from threading import Thread

from glm_sft import UserError, exit_on_user_error
from glm_sft.modeling import (
    load_adapter_model,
    load_model,
    load_tokenizer,
    quiet_transformers,
    read_run_recipe,
)
from glm_sft.template import template_family
from glm_sft.tools import MalformedCall, canonical_tools, parse_reply, result_text, tool_call, tool_names


def add_model_arguments(parser) -> None:
    """--model/--adapter/--template/--trust_remote_code, the arguments load_chat_model reads (evaluate.py too)."""
    parser.add_argument("--model", help="base or fully fine-tuned model: directory, hub id or builtin:tiny-glm4")
    parser.add_argument("--adapter", help="adapter directory written by train.py (it knows its base model)")
    parser.add_argument("--template", default=None, help="auto, glm4 or chatglm3 (default: the run's template)")
    parser.add_argument("--trust_remote_code", action="store_true")


def check_model_arguments(parser, args) -> None:
    if not args.model and not args.adapter:
        parser.error("give --model DIR, --adapter DIR, or both")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--system", help="system prompt for the conversation")
    parser.add_argument("--prompt", help="answer this one message, print only the reply, and exit")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 means greedy decoding (default 0.8)")
    parser.add_argument("--top_p", type=float, default=0.8)
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--tools", help="JSON file with the function definitions the model may call (a list)")
    parser.add_argument("--tool_results", help="JSON file {function name: result} answering calls without asking")
    args = parser.parse_args(argv)
    check_model_arguments(parser, args)
    if args.temperature < 0:
        parser.error("--temperature must be 0 (greedy) or positive")
    if args.tool_results and not args.tools:
        parser.error("--tool_results needs --tools")
    return args


def load_chat_model(args):
    """(model, tokenizer, stop ids) for a base/full model, or a base model with the adapter applied."""
    import torch

    quiet_transformers()
    adapter = Path(args.adapter) if args.adapter else None
    recipe, base = {}, args.model
    if adapter is not None:
        if not (adapter / "adapter_config.json").is_file():
            raise UserError(
                f"{adapter}: not an adapter directory (no adapter_config.json); use --model for full models"
            )
        recorded_base = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get(
            "base_model_name_or_path"
        )
        base = args.model or recorded_base
        if not base:
            raise UserError(f"{adapter}: the adapter does not name its base model; pass --model")
        recipe = read_run_recipe(adapter)
    template = args.template or recipe.get("template", "auto")
    # The adapter directory carries the run's tokenizer and template; a model directory carries its own.
    tokenizer_source = str(adapter) if adapter is not None else base
    tokenizer, family = load_tokenizer(tokenizer_source, template, args.trust_remote_code)
    dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    if adapter is not None:
        model = load_adapter_model(adapter, base, recorded_base, dtype=dtype, trust_remote_code=args.trust_remote_code)
    else:
        model = load_model(base, dtype=dtype, trust_remote_code=args.trust_remote_code)
    if torch.cuda.is_available():
        model = model.to("cuda")
    model.eval()
    from glm_sft.template import stop_token_ids

    return model, tokenizer, stop_token_ids(tokenizer, family)


def fit_history(tokenizer, messages, budget: int, tools=None):
    """Prompt ids for the conversation, dropping the oldest rounds until it fits `budget` tokens.

    A round is a user message and everything up to the next one (replies, calls, results); the system prompt and the
    tools stay.
    """
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    while True:
        ids = tokenizer.apply_chat_template(
            system + turns, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        if len(ids) <= budget or len(turns) <= 1:
            return ids[-budget:], system + turns
        next_round = next((i for i, turn in enumerate(turns[1:], 1) if turn["role"] == "user"), len(turns) - 1)
        turns = turns[next_round:]


def generation_inputs(model, tokenizer, stop_ids, messages, args, tools=None) -> dict:
    """model.generate's arguments for the conversation, trimmed to fit the context (`messages` is trimmed too)."""
    import torch

    context = getattr(model.config, "max_position_embeddings", 4096)
    prompt_ids, kept = fit_history(tokenizer, messages, context - args.max_new_tokens, tools)
    messages[:] = kept
    input_ids = torch.tensor([prompt_ids], device=model.device)
    sampling = (
        {"do_sample": False}
        if args.temperature == 0
        else {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
    )
    return dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=args.max_new_tokens,
        eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )


def generate_reply(model, tokenizer, stop_ids, messages, args, stream=None) -> str:
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = generation_inputs(model, tokenizer, stop_ids, messages, args)
    thread = Thread(target=model.generate, kwargs={**kwargs, "streamer": streamer}, daemon=True)
    thread.start()
    pieces = []
    for piece in streamer:
        if not pieces:
            piece = piece.lstrip()  # the model opens its turn with a newline
            if not piece:
                continue
        pieces.append(piece)
        if stream is not None:
            stream.write(piece)
            stream.flush()
    thread.join()
    return "".join(pieces).strip()


def generate_raw(model, tokenizer, stop_ids, messages, args, tools) -> str:
    """The reply as written after <|assistant|> ({metadata}\n{content}, special tokens kept), not streamed."""
    import torch

    kwargs = generation_inputs(model, tokenizer, stop_ids, messages, args, tools)
    with torch.no_grad():
        output = model.generate(**kwargs)
    new_ids = output[0, kwargs["input_ids"].shape[1] :].tolist()
    if new_ids and new_ids[-1] in stop_ids:
        new_ids = new_ids[:-1]
    return tokenizer.decode(new_ids, skip_special_tokens=False)


class ToolSession:
    """The tools the model may call, and where call results come from: a results file, or the person at the prompt."""

    MAX_CALLS_PER_TURN = 8  # a model stuck calling would otherwise never hand the turn back

    def __init__(self, tools_file: str, results_file: str | None, family: str):
        self.tools = read_tools_file(tools_file)
        self.results = read_results_file(results_file) if results_file else None
        self.results_file = results_file
        self.family = family

    def result_for(self, call: dict) -> str:
        if self.results is not None and call["name"] in self.results:
            return result_text(self.results[call["name"]])
        if self.results is not None and not sys.stdin.isatty():
            raise UserError(f"{self.results_file} has no result for {call['name']}; add one")
        try:
            return input("result> ")
        except EOFError:
            raise UserError(f"no result for the call to {call['name']}: give --tool_results FILE or type it") from None

    def answer(self, model, tokenizer, stop_ids, messages, args) -> str:
        """Generate until the model replies in text: each call is printed as JSON and answered with its result."""
        for _ in range(self.MAX_CALLS_PER_TURN):
            raw = generate_raw(model, tokenizer, stop_ids, messages, args, self.tools)
            try:
                reply = parse_reply(raw, self.family)
            except MalformedCall as error:
                print(f"warning: {error}", file=sys.stderr)
                reply = raw.strip()
            if isinstance(reply, str):
                messages.append({"role": "assistant", "content": reply})
                return reply
            print(json.dumps(reply, ensure_ascii=False), flush=True)
            if reply["name"] not in tool_names(self.tools):
                print(f"warning: the model called {reply['name']}, which is not in the tools", file=sys.stderr)
            messages.append({"role": "assistant", "content": "", "tool_calls": [tool_call(**reply)]})
            messages.append({"role": "tool", "content": self.result_for(reply)})
        raise UserError(f"the model made {self.MAX_CALLS_PER_TURN} calls in one turn without replying; stopped")


def read_tools_file(path: str) -> list[dict]:
    tools, problems = canonical_tools(_read_json(path, "a list of function definitions"))
    if problems:
        raise UserError(f"{path}: {problems[0]}")
    if not tools:
        raise UserError(f"{path}: no tools defined")
    return tools


def read_results_file(path: str) -> dict:
    results = _read_json(path, "an object mapping function names to results")
    if not isinstance(results, dict):
        raise UserError(f"{path}: expected a JSON object mapping function names to results")
    return results


def _read_json(path: str, expected: str):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise UserError(f"{path}: cannot read it ({error.strerror})") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path}:{error.lineno}: not valid JSON ({error.msg}); expected {expected}") from None


def repl(model, tokenizer, stop_ids, args, tools: ToolSession | None = None):
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    print("Chat with the model. `clear` starts over, `exit` or Ctrl-D quits, Ctrl-C stops a reply.")
    while True:
        try:
            text = input("\nuser> ").strip()
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            continue
        if not text:
            continue
        if text == "exit":
            return
        if text == "clear":
            messages = list(system)
            print("(new conversation)")
            continue
        messages.append({"role": "user", "content": text})
        if tools is not None:
            start = len(messages) - 1
            try:
                reply = tools.answer(model, tokenizer, stop_ids, messages, args)
            except KeyboardInterrupt:
                del messages[start:]
                print("\n(reply stopped)")
                continue
            print(f"assistant> {reply}")
            continue
        print("assistant> ", end="", flush=True)
        try:
            reply = generate_reply(model, tokenizer, stop_ids, messages, args, stream=sys.stdout)
        except KeyboardInterrupt:
            messages.pop()
            print("\n(reply stopped)")
            continue
        print()
        messages.append({"role": "assistant", "content": reply})


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    tools = ToolSession(args.tools, args.tool_results, family=None) if args.tools else None  # bad files: fail fast
    model, tokenizer, stop_ids = load_chat_model(args)
    if tools is not None:
        tools.family = template_family(tokenizer)
    if args.prompt is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        if tools is not None:
            print(tools.answer(model, tokenizer, stop_ids, messages, args))
        else:
            print(generate_reply(model, tokenizer, stop_ids, messages, args))
        return
    repl(model, tokenizer, stop_ids, args, tools)


if __name__ == "__main__":
    main()
