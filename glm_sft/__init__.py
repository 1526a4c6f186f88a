"""glm-sft: supervised fine-tuning recipes for the GLM family (ChatGLM3-6B, GLM-4-9B, GLM-4-0414, GLM-Z1, GLM-4.5 to
4.7, GLM-4.7-Flash, GLM-5, 5.1 and 5.2), each in its released chat format."""

import functools
import logging
import sys
import warnings

# Noise on every run that says nothing to our users, silenced at the one place each comes from:
# bitsandbytes' CPU backend warns on import that an optional kernel from the hub is not installed (not needed);
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# DeepSpeed announces at import that it found no GPU (also in export and chat, which never use it);
logging.getLogger("DeepSpeed").addFilter(lambda record: not record.getMessage().startswith("Setting accelerator to"))
# PEFT looks up the config of `builtin:...` (our name for the tiny models) at each save, to see if the vocabulary grew;
warnings.filterwarnings("ignore", message="Could not find a config file in builtin:", category=UserWarning)
# transformers 5 renamed is_gradient_checkpointing; TRL and PEFT still call the old name.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
# PEFT's conversion of LoRA on transformers v5 MoE experts writes rank/alpha patterns for gate_up_proj that then match
# no module (the experts are parameters): harmless, and printed at every load of a GLM-4.5-style adapter.
warnings.filterwarnings(
    "ignore", message="The following (rank|alpha)_pattern keys did not match", category=RuntimeWarning
)


class UserError(Exception):
    """A problem the user can fix (bad recipe, bad data, missing weights): reported in one message, no traceback."""


def exit_on_user_error(main):
    """Wrap a script's main(): a UserError ends the run with its message on stderr and exit code 1. However main
    ends, the output_dir lock it took (glm_sft.outputs) is released."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            _release_locks()  # before a launch's other processes are ended: the lock goes with the error
            from glm_sft.distributed import defer_to_main_process

            defer_to_main_process()  # under accelerate launch, the main process reports an error all processes share
            print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(1)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        finally:
            _release_locks()

    return wrapper


def _release_locks() -> None:
    outputs = sys.modules.get("glm_sft.outputs")  # only a script that took a lock has imported it
    if outputs is not None:
        outputs.release_output_locks()
