"""glm-sft: supervised fine-tuning recipes for the GLM family (ChatGLM3-6B, GLM-4-9B)."""

import functools
import logging
import sys

# bitsandbytes' CPU backend warns on import that an optional kernel from the hub is not installed; it is not needed.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


class UserError(Exception):
    """A problem the user can fix (bad recipe, bad data, missing weights): reported in one message, no traceback."""


def exit_on_user_error(main):
    """Wrap a script's main(): a UserError ends the run with its message on stderr and exit code 1."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            from glm_sft.distributed import defer_to_main_process

            defer_to_main_process()  # under accelerate launch, the main process reports an error all processes share
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
