"""The embedded tiny models: `builtin:tiny-glm4` and `builtin:tiny-chatglm3`.

Each is transformers' native GLM architecture (GlmForCausalLM) at a tiny size, with a byte-level BPE tokenizer trained
on the bundled data that carries the family's special tokens, chat template and stop tokens. They stand in for the real
checkpoints wherever there is no GPU or no network (the demo recipe, the tests). Built offline from a fixed seed, so a
name always gives the same tokenizer and weights; cached after the first build.
"""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from glm_sft.template import SPECIAL_TOKENS

PREFIX = "builtin:"
BUILD_VERSION = "1"  # bump when the build below changes, so old caches are not reused
SEED = 1234
REPO_ROOT = Path(__file__).resolve().parent.parent
# The corpus the tokenizers are trained on: fixed, so adding data files does not change the built-in models.
CORPUS_FILES = ["self_cognition.jsonl", "alpaca_zh_demo.json", "multi_turn.jsonl", "adgen_demo.jsonl"]
# Plain English text as well, so English prompts do not fall apart into single bytes.
EXTRA_CORPUS = (
    "Hello! How can I help you today? Who are you? What is your name? Who created you? I am an AI assistant. "
    "Thank you. Please answer the following question. The quick brown fox jumps over the lazy dog. "
    "Translate, summarize, explain, write, code, function, weather, temperature, city, today, tomorrow."
)

# Special tokens as the real checkpoints spell them; the role tokens and stop tokens are what the templates rely on.
FAMILY_SPECS = {
    "tiny-glm4": {
        "family": "glm4",
        "leading_tokens": [],
        "special_tokens": SPECIAL_TOKENS["glm4"],
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "rope_theta": 10000.0,
    },
    "tiny-chatglm3": {
        "family": "chatglm3",
        "leading_tokens": ["<unk>", "<s>", "</s>"],  # ids 0, 1, 2 as in ChatGLM3's sentencepiece model
        "special_tokens": SPECIAL_TOKENS["chatglm3"],
        "eos_token": "</s>",
        "pad_token": "<unk>",
        "unk_token": "<unk>",
        "rope_theta": 10000.0,
    },
}
# Small enough to train on a laptop CPU in a minute, big enough to memorise the demo data.
MODEL_SIZE = {
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # grouped-query attention with 2 KV groups, as in the real GLM models
    "head_dim": 64,
    "max_position_embeddings": 2048,
    "partial_rotary_factor": 0.5,  # rotary on half of each head, as in GLM
    "initializer_range": 0.1,  # wider than usual so LoRA on random weights can reach confident predictions
}
VOCAB_SIZE = 6000


def is_builtin(name: str) -> bool:
    return name.startswith(PREFIX)


def builtin_names() -> list[str]:
    return [PREFIX + name for name in FAMILY_SPECS]


def cache_root() -> Path:
    return Path(os.environ.get("GLM_SFT_CACHE", Path.home() / ".cache" / "glm_sft"))


def _corpus_texts() -> list[str]:
    """Every string value in the bundled corpus files, plus a little English."""
    texts = [EXTRA_CORPUS]

    def collect(value):
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)
        elif isinstance(value, list):
            for item in value:
                collect(item)

    for name in CORPUS_FILES:
        path = REPO_ROOT / "data" / name
        text = path.read_text(encoding="utf-8")
        if name.endswith(".json"):
            collect(json.loads(text))
        else:
            for line in text.splitlines():
                if line.strip():
                    collect(json.loads(line))
    return texts


def _fingerprint(name: str) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([BUILD_VERSION, SEED, name, FAMILY_SPECS[name], MODEL_SIZE, VOCAB_SIZE]).encode())
    for file_name in CORPUS_FILES:
        digest.update((REPO_ROOT / "data" / file_name).read_bytes())
    return digest.hexdigest()[:12]


def _build_tokenizer(spec: dict, template: str):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=spec["leading_tokens"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus_texts(), trainer)
    # ChatGLM3 spells two of its special tokens as plain words (sop, eop): match them only as whole words.
    backend.add_special_tokens(
        [AddedToken(token, special=True, single_word=token.isalpha()) for token in spec["special_tokens"]]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=spec["eos_token"],
        pad_token=spec["pad_token"],
        unk_token=spec["unk_token"],
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_SIZE["max_position_embeddings"],
    )
    tokenizer.chat_template = template
    return tokenizer


def _build(name: str, target: Path) -> None:
    import torch
    from transformers import GenerationConfig, GlmConfig, GlmForCausalLM

    from glm_sft.template import family_template, stop_token_ids

    spec = FAMILY_SPECS[name]
    tokenizer = _build_tokenizer(spec, family_template(spec["family"]))
    stop_ids = stop_token_ids(tokenizer, spec["family"])
    config = GlmConfig(
        vocab_size=len(tokenizer),
        **MODEL_SIZE,
        rope_parameters={"rope_type": "default", "rope_theta": spec["rope_theta"]},
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stop_ids,
        attention_bias=True,  # bias on q/k/v only, as in GLM
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    model = GlmForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / "BUILTIN.txt").write_text(f"{PREFIX}{name}, built by glm_sft/builtin.py (version {BUILD_VERSION})\n")


def builtin_path(name: str) -> Path:
    """Directory holding the built-in model `name` (`builtin:tiny-glm4`), building it on first use."""
    from glm_sft import UserError

    short = name[len(PREFIX) :] if is_builtin(name) else name
    if short not in FAMILY_SPECS:
        raise UserError(f"unknown built-in model {name!r}; choose one of {', '.join(builtin_names())}")
    target = cache_root() / "builtin" / f"{short}-{_fingerprint(short)}"
    if (target / "BUILTIN.txt").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temporary folder and rename it into place, so concurrent or interrupted builds never leave a
    # half-written model that looks complete.
    staging = Path(tempfile.mkdtemp(prefix=f".{short}-", dir=target.parent))
    try:
        _build(short, staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "BUILTIN.txt").exists():  # not a concurrent build that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
