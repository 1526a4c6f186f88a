"""A web chat with a fine-tuned GLM model (Gradio): streamed replies, a system prompt, sampling settings, tool calls.

    python webchat.py --adapter output/demo                      # http://127.0.0.1:7860, this machine only
    python webchat.py --model output/glm4-export --port 7000     # a full fine-tune or an exported directory
    python webchat.py --adapter output/demo-tools --tools data/tools.json --tool_results data/tool_results.json
    python webchat.py --adapter output/demo --host 0.0.0.0       # open to the network (no login: mind who reaches it)
    python webchat.py --adapter output/demo --share              # also a temporary public gradio.live link

The page names the model it serves. Replies stream as they are generated (with --tools they come whole, as each may
be a call); `Clear` starts a new conversation. With --tools, each call the model makes is shown as a call with its
arguments, and its result (from --tool_results, a JSON object: function name -> result, or else the next message you
send) as a result; the model then goes on with it. One model, one reply at a time: other visitors wait their turn.
"""

import argparse
import contextlib
import json
import os
import threading

from glm_sft import UserError, exit_on_user_error
from glm_sft.inference import add_model_arguments, add_tool_arguments, check_model_arguments, load_from_arguments
from glm_sft.replies import Reply
from glm_sft.template import control_token_in
from glm_sft.tools import ToolSession, tool_names, waiting_calls

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # Gradio reports usage to its servers unless told not to

CALL_TITLE = "Tool call: {name}"
RESULT_TITLE = "Tool result: {name}"
THINKING_TITLE = "Thinking"  # a thinking family's reasoning: a bubble of its own, folded under this title
GENERATING = "Generating…"


class WebChat:
    """The model behind the page and one conversation's turns. A conversation is a dict in the page's state:
    "messages" (canonical rows, what the model sees, without the system prompt) and "shown" (the chat bubbles)."""

    def __init__(self, chat, tools: ToolSession | None = None, *, max_new_tokens=512, temperature=0.8, top_p=0.8):
        self.chat = chat
        self.tools = tools
        self.defaults = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
        self.stops: dict[str, threading.Event] = {}  # per browser session: set by Stop, ends the reply being written

    def stop(self, session: str) -> None:
        if session in self.stops:
            self.stops[session].set()

    @staticmethod
    def new_conversation() -> dict:
        return {"messages": [], "shown": []}

    def respond(self, text, conversation, system, temperature, top_p, max_tokens, session: str = ""):
        """Take the text the person sent and answer it; yields (conversation, status) as the reply grows."""
        stop = self.stops[session] = threading.Event()
        text = (text or "").strip()
        if not text:
            yield conversation, "Type a message first."
            return
        if token := control_token_in(text, system or ""):
            yield conversation, f"Not sent: {token} is a token of the chat format; remove it from the message."
            return
        conversation = {"messages": list(conversation["messages"]), "shown": list(conversation["shown"])}
        if waiting := waiting_calls(conversation["messages"]):  # the text is the result of the call the model made
            conversation["messages"].append({"role": "tool", "content": text})
            conversation["shown"].append(self.result_bubble(waiting[0]["name"], text))
        else:
            conversation["messages"].append({"role": "user", "content": text})
            conversation["shown"].append({"role": "user", "content": text})
        settings = dict(max_new_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p))
        system_prompt = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
        if self.tools is None:
            yield from self.stream_reply(conversation, system_prompt, settings, stop)
        else:
            yield from self.tool_turn(conversation, system_prompt, settings, stop)

    def stream_reply(self, conversation: dict, system_prompt: list[dict], settings: dict, stop: threading.Event):
        bubbles = {}  # "reasoning" (a thinking family's, folded under THINKING_TITLE) and "answer", as they come
        usage = {}
        yield conversation, GENERATING
        messages = system_prompt + conversation["messages"]
        with contextlib.closing(self.chat.stream_parts(messages, usage=usage, **settings)) as pieces:
            for kind, piece in pieces:
                if stop.is_set():
                    break  # closing the stream ends the generation
                if kind not in bubbles:
                    bubbles[kind] = {"role": "assistant", "content": ""}
                    if kind == "reasoning":
                        bubbles[kind]["metadata"] = {"title": THINKING_TITLE}
                    conversation["shown"].append(bubbles[kind])
                bubbles[kind]["content"] += piece
                yield conversation, GENERATING
        answer = bubbles.setdefault("answer", {"role": "assistant", "content": ""})
        if answer not in conversation["shown"]:
            conversation["shown"].append(answer)
        message = {"role": "assistant", "content": answer["content"]}
        if "reasoning" in bubbles:
            message["reasoning_content"] = bubbles["reasoning"]["content"]
        conversation["messages"].append(message)
        yield conversation, "Stopped." if stop.is_set() else self.finished(usage)

    def tool_turn(self, conversation: dict, system_prompt: list[dict], settings: dict, stop: threading.Event):
        """ToolSession.turn on the page: each reply, call and result a bubble, until the model answers in text or
        calls a function whose result has to come from the person (their next message)."""
        yield conversation, GENERATING
        usage = {}  # the last reply's
        messages, shown = conversation["messages"], conversation["shown"]
        turn = self.tools.turn(self.chat, messages, None, stop.is_set, system_prompt, usage=usage, **settings)
        for kind, value in turn:
            status = GENERATING
            if kind == "reply":
                self.show_reply(shown, value)
                status = GENERATING if value.calls else self.finished(usage)
            elif kind == "call":
                unknown = "" if self.tools.defines(value["name"]) else " (not one of the tools)"
                shown.append(
                    {
                        "role": "assistant",
                        "content": f"```json\n{json.dumps(value['arguments'], ensure_ascii=False, indent=2)}\n```",
                        "metadata": {"title": CALL_TITLE.format(name=value["name"]) + unknown},
                    }
                )
            elif kind == "result":
                call, result = value
                shown.append(self.result_bubble(call["name"], result))
            elif kind == "waiting":
                status = f"The model called {value['name']}: send its result as your next message."
            elif kind == "stopped":
                status = "Stopped."
            else:
                status = f"Stopped: the model made {value} calls without answering."
            yield conversation, status

    @staticmethod
    def show_reply(shown: list[dict], reply: Reply) -> None:
        """A reply's reasoning (folded) and text as bubbles; one whose call could not be read is shown as text, with
        why."""
        if reply.reasoning:
            shown.append({"role": "assistant", "content": reply.reasoning, "metadata": {"title": THINKING_TITLE}})
        if reply.unread:
            shown.append(
                {"role": "assistant", "content": f"{reply.content}\n\n(could not read this call: {reply.unread})"}
            )
        elif not reply.calls or reply.content:
            shown.append({"role": "assistant", "content": reply.content})

    @staticmethod
    def result_bubble(name: str, result: str) -> dict:
        return {"role": "assistant", "content": result, "metadata": {"title": RESULT_TITLE.format(name=name)}}

    @staticmethod
    def finished(usage: dict) -> str:
        if not usage:
            return "Done."
        ending = "the model ended its turn" if usage["finish_reason"] == "stop" else "max tokens reached"
        return f"Done: {usage['completion_tokens']} tokens, {ending}."


def build_page(webchat: WebChat):
    """The Gradio page: the chat, a message box with Send, Stop and Clear, and the settings."""
    import gradio as gr

    chat = webchat.chat
    tools = f" · tools: {', '.join(tool_names(webchat.tools.tools))}" if webchat.tools else ""
    with gr.Blocks(title=f"glm-sft · {chat.name}", analytics_enabled=False) as page:
        gr.Markdown(f"## glm-sft web chat\nModel: `{chat.name}` ({chat.family}){tools}", elem_id="model-name")
        conversation = gr.State(WebChat.new_conversation())
        with gr.Row():
            with gr.Column(scale=3):
                shown = gr.Chatbot(label=chat.name, height=440, elem_id="chat", buttons=["copy"])
                with gr.Row():
                    message = gr.Textbox(
                        placeholder="Type a message and press Enter",
                        show_label=False,
                        scale=1,
                        elem_id="message",
                        autofocus=True,
                    )
                    send = gr.Button("Send", variant="primary", scale=0, min_width=90, elem_id="send")
                    stop = gr.Button("Stop", scale=0, min_width=90, elem_id="stop")
                    clear = gr.Button("Clear", scale=0, min_width=90, elem_id="clear")
                status = gr.Markdown("Ready.", elem_id="status")
            with gr.Column(scale=1, min_width=240):
                system = gr.Textbox(label="System prompt", lines=3, elem_id="system")
                defaults = webchat.defaults
                temperature = gr.Slider(
                    0,
                    2,
                    value=defaults["temperature"],
                    step=0.05,
                    label="Temperature (0: greedy)",
                    elem_id="temperature",
                )
                top_p = gr.Slider(0.05, 1, value=defaults["top_p"], step=0.05, label="Top p", elem_id="top_p")
                max_tokens = gr.Slider(
                    1,
                    chat.context,
                    value=min(defaults["max_new_tokens"], chat.context),
                    step=1,
                    label="Max tokens",
                    elem_id="max_tokens",
                )

        def answer(text, state, system_prompt, temperature_value, top_p_value, max_tokens_value, request: gr.Request):
            replies = webchat.respond(
                text, state, system_prompt, temperature_value, top_p_value, max_tokens_value, request.session_hash
            )
            for state, status_text in replies:
                yield state["shown"], state, status_text

        def take_message(text):
            return "", text  # empty the box at once; the text goes on to answer()

        pending = gr.State("")
        inputs = [pending, conversation, system, temperature, top_p, max_tokens]
        runs = []
        for trigger in (message.submit, send.click):
            taken = trigger(take_message, [message], [message, pending], queue=False)
            # One reply at a time for all visitors: the model is one. Stop ends the reply, which stays as it is.
            runs.append(taken.then(answer, inputs, [shown, conversation, status], concurrency_id="model"))

        def stop_reply(request: gr.Request):
            webchat.stop(request.session_hash)

        stop.click(stop_reply, None, None, queue=False)

        def start_over(request: gr.Request):
            webchat.stop(request.session_hash)
            return [], WebChat.new_conversation(), "Ready.", ""

        clear.click(start_over, None, [shown, conversation, status, message], cancels=runs, queue=False)
        shown.clear(
            start_over, None, [shown, conversation, status, message], cancels=runs, queue=False
        )  # its bin icon
    page.queue(default_concurrency_limit=1)
    return page


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=None, help="port (default: 7860, or the next free one)")
    parser.add_argument("--share", action="store_true", help="also open a temporary public gradio.live link")
    parser.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=512, help="the page's default")
    parser.add_argument("--temperature", type=float, default=0.8, help="the page's default; 0 means greedy")
    parser.add_argument("--top_p", "--top-p", type=float, default=0.8, help="the page's default")
    add_tool_arguments(parser)
    args = parser.parse_args(argv)
    check_model_arguments(parser, args)
    if args.port is not None and not 1 <= args.port <= 65535:
        parser.error("--port must be between 1 and 65535")
    return args


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    tools = ToolSession(args.tools, args.tool_results) if args.tools else None  # bad files fail before the model loads
    chat = load_from_arguments(args)
    webchat = WebChat(chat, tools, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    page = build_page(webchat)
    try:
        _, local_url, share_url = page.launch(
            server_name=args.host, server_port=args.port, share=args.share, prevent_thread_lock=True, quiet=True
        )
    except OSError as error:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {error}") from None
    print(f"web chat for {chat.name} ({chat.family}) at {local_url}" + (f" and {share_url}" if share_url else ""))
    print("Ctrl-C stops it.", flush=True)
    try:
        page.block_thread()
    finally:
        page.close()


if __name__ == "__main__":
    main()
