"""Talk to a fine-tuned GLM model.

    python chat_cli.py --adapter output/demo                       # the adapter knows its base model
    python chat_cli.py --model output/full-run                     # a full fine-tune or any GLM model directory
    python chat_cli.py --adapter output/demo --prompt "你是谁？"    # answer once, print only the reply
    python chat_cli.py --adapter output/demo-tools --tools data/tools.json   # tool calling; asks for each result
    python chat_cli.py --model builtin:tiny-glm45 --enable_thinking false   # a thinking family, answering at once

In the REPL: `clear` starts a new conversation, `exit` (or Ctrl-D) quits, Ctrl-C stops a reply; arrow keys edit
the line and recall earlier ones. With --tools, a reply that calls a function is printed as one JSON line
{"name", "arguments"}; the result is read from --tool_results (a JSON object: function name -> result) or asked
for, and the model goes on with it. A thinking family's reasoning is shown apart from the answer: dimmed on a
terminal, else (and with --prompt) under a "thinking:" heading, the answer under "answer:".
"""

import argparse
import sys

from glm_sft import UserError, exit_on_user_error
from glm_sft.inference import add_model_arguments, add_tool_arguments, check_model_arguments, load_from_arguments
from glm_sft.tools import ToolSession

DIM, UNDIM = "\033[2m", "\033[0m"  # a thinking family's reasoning, on a terminal


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--system", help="system prompt for the conversation")
    parser.add_argument("--prompt", help="answer this one message, print only the reply, and exit")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 means greedy decoding (default 0.8)")
    parser.add_argument("--top_p", "--top-p", type=float, default=0.8)
    parser.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=512)
    thinking = "true|false: a thinking family reasons before it answers (default: as the run trained, else on)"
    parser.add_argument("--enable_thinking", "--enable-thinking", type=yes_or_no, help=thinking)
    add_tool_arguments(parser)
    args = parser.parse_args(argv)
    check_model_arguments(parser, args)
    return args


def yes_or_no(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")
    return text.lower() == "true"


def answer(chat, messages, args, tools, stream=None) -> str:
    """The model's reply to the conversation (appended to it, reasoning and all); streamed to `stream` when given and
    there are no tools, the reasoning dimmed on a terminal, else under a heading. Returns the answer; when it was not
    streamed and the model reasoned, the reasoning and the answer under their headings. Ctrl-C stops the generation
    and leaves the conversation as it was before the question."""
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    if tools is not None:
        reply = tools.answer(chat, messages, **settings)
        parts = {"reasoning": reply.reasoning, "answer": reply.content}
    else:
        parts, dim = {}, stream is not None and stream.isatty()
        headings = {"reasoning": DIM if dim else "thinking:\n", "answer": f"{UNDIM}\n" if dim else "\n\nanswer:\n"}
        try:
            for kind, piece in chat.stream_parts(messages, **settings):
                if stream is not None:
                    new_part = kind not in parts and (kind == "reasoning" or bool(parts))
                    stream.write((headings[kind] if new_part else "") + piece)
                    stream.flush()
                parts[kind] = parts.get(kind, "") + piece
        finally:
            if dim and "reasoning" in parts and "answer" not in parts:
                stream.write(UNDIM)
        message = {"role": "assistant", "content": parts.get("answer", "")}
        messages.append({**message, "reasoning_content": parts["reasoning"]} if "reasoning" in parts else message)
    if parts.get("reasoning") and (stream is None or tools is not None):
        return f"thinking:\n{parts['reasoning']}\n\nanswer:\n{parts.get('answer', '')}"
    return parts.get("answer", "")


def repl(chat, args, tools) -> None:
    try:
        import readline  # noqa: F401 (line editing and history for input())
    except ImportError:  # not on every platform
        pass
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
        if text == "exit":
            return
        if text == "clear":
            messages = list(system)
            print("(new conversation)")
            continue
        if not text:
            continue
        start = len(messages)
        messages.append({"role": "user", "content": text})
        if tools is None:
            print("assistant> ", end="", flush=True)
        try:
            reply = answer(chat, messages, args, tools, stream=sys.stdout)
        except KeyboardInterrupt:
            del messages[start:]
            print("\n(reply stopped)")
            continue
        print(f"assistant> {reply}" if tools is not None else "")


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    tools = ToolSession(args.tools, args.tool_results) if args.tools else None  # bad files fail before the model loads
    chat = load_from_arguments(args)
    if args.enable_thinking is not None:
        if args.enable_thinking and not chat.thinks:
            raise UserError(f"--enable_thinking true: {chat.family} models have no thinking mode")
        chat.template_kwargs["enable_thinking"] = args.enable_thinking
    if args.prompt is None:
        repl(chat, args, tools)
        return
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print(answer(chat, [*messages, {"role": "user", "content": args.prompt}], args, tools))


if __name__ == "__main__":
    main()
