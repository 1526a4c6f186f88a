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
from glm_sft.replies import MalformedCall, Reply, parse_reply, split_reasoning
from glm_sft.template import CONTROL_TOKENS
from glm_sft.tools import ToolSession, result_text, tool_names

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # Gradio reports usage to its servers unless told not to

CALL_TITLE = "Tool call: {name}"
RESULT_TITLE = "Tool result: {name}"
THINKING_TITLE = "Thinking"  # a thinking family's reasoning: a bubble of its own, folded under this title


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

    @staticmethod
    def waiting_call(conversation: dict) -> str | None:
        """The function whose result the conversation waits for (a call of the last assistant message that has no
        result yet), else None."""
        messages = conversation["messages"]
        results = 0
        for message in reversed(messages):
            if message["role"] == "tool":
                results += 1
                continue
            calls = message.get("tool_calls") or [] if message["role"] == "assistant" else []
            return calls[results]["function"]["name"] if results < len(calls) else None
        return None

    def respond(self, text, conversation, system, temperature, top_p, max_tokens, session: str = ""):
        """Take the text the person sent and answer it; yields (conversation, status) as the reply grows."""
        stop = self.stops[session] = threading.Event()
        text = (text or "").strip()
        if not text:
            yield conversation, "Type a message first."
            return
        if token := next((token for token in CONTROL_TOKENS if token in text + (system or "")), None):
            yield conversation, f"Not sent: {token} is a token of the chat format; remove it from the message."
            return
        conversation = {"messages": list(conversation["messages"]), "shown": list(conversation["shown"])}
        if name := self.waiting_call(conversation):  # the text is the result of the call the model made
            self.add_result(conversation, name, text)
            if name := self.fill_results(conversation):  # several calls: the next one waits for its result
                yield conversation, f"The model called {name}: send its result as your next message."
                return
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
        yield conversation, "Generating…"
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
                yield conversation, "Generating…"
        answer = bubbles.setdefault("answer", {"role": "assistant", "content": ""})
        if answer not in conversation["shown"]:
            conversation["shown"].append(answer)
        message = {"role": "assistant", "content": answer["content"]}
        if "reasoning" in bubbles:
            message["reasoning_content"] = bubbles["reasoning"]["content"]
        conversation["messages"].append(message)
        yield conversation, "Stopped." if stop.is_set() else self.finished(usage)

    def tool_turn(self, conversation: dict, system_prompt: list[dict], settings: dict, stop: threading.Event):
        """Generate until the model answers in text, or calls a function whose result has to come from the person."""
        yield conversation, "Generating…"
        for _ in range(ToolSession.MAX_CALLS_PER_TURN):
            if stop.is_set():
                yield conversation, "Stopped."
                return
            usage = {}
            reply = self.tool_reply(system_prompt + conversation["messages"], usage, settings)
            conversation["messages"].append(reply.message())
            if reply.reasoning:
                conversation["shown"].append(
                    {"role": "assistant", "content": reply.reasoning, "metadata": {"title": THINKING_TITLE}}
                )
            if not reply.calls or reply.content:
                conversation["shown"].append({"role": "assistant", "content": reply.content})
            if not reply.calls:
                yield conversation, self.finished(usage)
                return
            for call in reply.calls:
                unknown = "" if call["name"] in tool_names(self.tools.tools) else " (not one of the tools)"
                conversation["shown"].append(
                    {
                        "role": "assistant",
                        "content": f"```json\n{json.dumps(call['arguments'], ensure_ascii=False, indent=2)}\n```",
                        "metadata": {"title": CALL_TITLE.format(name=call["name"]) + unknown},
                    }
                )
            if name := self.fill_results(conversation):
                yield conversation, f"The model called {name}: send its result as your next message."
                return
            yield conversation, "Generating…"
        yield conversation, f"Stopped: the model made {ToolSession.MAX_CALLS_PER_TURN} calls without answering."

    def tool_reply(self, messages: list[dict], usage: dict, settings: dict) -> Reply:
        """The model's reply with the tools offered; one whose call cannot be read is shown as text, with why."""
        raw = self.chat.raw_reply(messages, tools=self.tools.tools, usage=usage, **settings)
        try:
            return parse_reply(raw, self.chat.family, self.tools.tools)
        except MalformedCall as error:
            reasoning, answer = split_reasoning(raw) if self.chat.thinks else ("", raw.strip())
            return Reply(f"{answer}\n\n(could not read this call: {error})", [], reasoning)

    def fill_results(self, conversation: dict) -> str | None:
        """Add the results file's result for each call still waiting, in turn; the function whose result has to come
        from the person, else None."""
        results = (self.tools.results if self.tools else None) or {}
        while name := self.waiting_call(conversation):
            if name not in results:
                return name
            self.add_result(conversation, name, result_text(results[name]))
        return None

    @staticmethod
    def add_result(conversation: dict, name: str, result: str) -> None:
        conversation["messages"].append({"role": "tool", "content": result})
        shown = {"role": "assistant", "content": result, "metadata": {"title": RESULT_TITLE.format(name=name)}}
        conversation["shown"].append(shown)  # beside the call it answers, not as the person's words

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
