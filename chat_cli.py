"""Talk to a fine-tuned GLM model.

    python chat_cli.py --adapter output/demo                       # the adapter knows its base model
    python chat_cli.py --model output/full-run                     # a full fine-tune or any GLM model directory
    python chat_cli.py --adapter output/demo --prompt "你是谁？"    # answer once, print only the reply

In the REPL: `clear` starts a new conversation, `exit` (or Ctrl-D) quits, Ctrl-C stops a reply.
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="base or fully fine-tuned model: directory, hub id or builtin:tiny-glm4")
    parser.add_argument("--adapter", help="LoRA adapter directory written by train.py")
    parser.add_argument("--system", help="system prompt for the conversation")
    parser.add_argument("--prompt", help="answer this one message, print only the reply, and exit")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 means greedy decoding (default 0.8)")
    parser.add_argument("--top_p", type=float, default=0.8)
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--template", default=None, help="auto, glm4 or chatglm3 (default: the run's template)")
    parser.add_argument("--trust_remote_code", action="store_true")
    args = parser.parse_args(argv)
    if not args.model and not args.adapter:
        parser.error("give --model DIR, --adapter DIR, or both")
    if args.temperature < 0:
        parser.error("--temperature must be 0 (greedy) or positive")
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


def fit_history(tokenizer, messages, budget: int):
    """Prompt ids for the conversation, dropping the oldest user/assistant rounds until it fits `budget` tokens."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    while True:
        ids = tokenizer.apply_chat_template(
            system + turns, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        if len(ids) <= budget or len(turns) <= 1:
            return ids[-budget:], system + turns
        turns = turns[2:]  # the oldest round: a user message and its reply


def generate_reply(model, tokenizer, stop_ids, messages, args, stream=None) -> str:
    import torch
    from transformers import TextIteratorStreamer

    context = getattr(model.config, "max_position_embeddings", 4096)
    prompt_ids, kept = fit_history(tokenizer, messages, context - args.max_new_tokens)
    messages[:] = kept
    input_ids = torch.tensor([prompt_ids], device=model.device)
    sampling = (
        {"do_sample": False}
        if args.temperature == 0
        else {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
    )
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=args.max_new_tokens,
        eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id,
        streamer=streamer,
        **sampling,
    )
    thread = Thread(target=model.generate, kwargs=kwargs, daemon=True)
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


def repl(model, tokenizer, stop_ids, args):
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
    model, tokenizer, stop_ids = load_chat_model(args)
    if args.prompt is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        print(generate_reply(model, tokenizer, stop_ids, messages, args))
        return
    repl(model, tokenizer, stop_ids, args)


if __name__ == "__main__":
    main()
