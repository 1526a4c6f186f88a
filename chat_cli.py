"""Talk to a fine-tuned GLM model.

    python chat_cli.py --adapter output/demo                       # the adapter knows its base model
    python chat_cli.py --model output/full-run                     # a full fine-tune or any GLM model directory
    python chat_cli.py --adapter output/demo --prompt "你是谁？"    # answer once, print only the reply
    python chat_cli.py --adapter output/demo-tools --tools data/tools.json   # tool calling; asks for each result

In the REPL: `clear` starts a new conversation, `exit` (or Ctrl-D) quits, Ctrl-C stops a reply; arrow keys edit
the line and recall earlier ones. With --tools, a reply that calls a function is printed as one JSON line
{"name", "arguments"}; the result is read from --tool_results (a JSON object: function name -> result) or asked
for, and the model goes on with it.
"""

import argparse
import sys

from glm_sft import exit_on_user_error
from glm_sft.inference import add_model_arguments, add_tool_arguments, check_model_arguments, load_from_arguments
from glm_sft.tools import ToolSession


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--system", help="system prompt for the conversation")
    parser.add_argument("--prompt", help="answer this one message, print only the reply, and exit")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 means greedy decoding (default 0.8)")
    parser.add_argument("--top_p", "--top-p", type=float, default=0.8)
    parser.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=512)
    add_tool_arguments(parser)
    args = parser.parse_args(argv)
    check_model_arguments(parser, args)
    return args


def answer(chat, messages, args, tools, stream=None) -> str:
    """The model's reply to the conversation (appended to it); streamed to `stream` when given and there are no
    tools. Ctrl-C stops the generation and leaves the conversation as it was before the question."""
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    if tools is not None:
        return tools.answer(chat, messages, **settings)
    pieces = []
    for piece in chat.stream(messages, **settings):
        pieces.append(piece)
        if stream is not None:
            stream.write(piece)
            stream.flush()
    reply = "".join(pieces).strip()
    messages.append({"role": "assistant", "content": reply})
    return reply


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
    if args.prompt is None:
        repl(chat, args, tools)
        return
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print(answer(chat, [*messages, {"role": "user", "content": args.prompt}], args, tools))


if __name__ == "__main__":
    main()
