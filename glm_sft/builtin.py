"""The embedded tiny models, one per GLM generation: `builtin:tiny-glm4`, `builtin:tiny-chatglm3`,
`builtin:tiny-glm4-0414`, `builtin:tiny-glmz1`, `builtin:tiny-glm45` (MoE), `builtin:tiny-glm47-flash` (MoE with
multi-head latent attention), `builtin:tiny-glm5` (GLM-5: MoE, latent attention and the DSA indexer) and
`builtin:tiny-glm52` (the same, shipping GLM-5.2's template).

Each is transformers' native class for its generation (GlmForCausalLM, Glm4ForCausalLM, Glm4MoeForCausalLM,
Glm4MoeLiteForCausalLM, GlmMoeDsaForCausalLM) at a tiny size, with a byte-level BPE tokenizer trained on the bundled
data that carries the family's special tokens, chat template and stop tokens. The newer generations ship the released
template text, as their checkpoints do (so the start-up check of the shipped template runs on them too); the two older
ones ship ours. They stand in for the real checkpoints wherever there is no GPU or no network (the demo recipe, the
tests). Built offline from a fixed seed, so a name always gives the same tokenizer and weights; cached after the first
build.
"""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from glm_sft.template import SPECIAL_TOKENS, TEMPLATE_DIR

PREFIX = "builtin:"
BUILD_VERSION = "2"  # bump when the build below changes, so old caches are not reused
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
# The newer generations: the same tokenizer settings as GLM-4's, each with its family's tokens, released template and
# architecture.
for _name, _family, _architecture in [
    ("tiny-glm4-0414", "glm4_0414", "glm4"),
    ("tiny-glmz1", "glmz1", "glm4"),
    ("tiny-glm45", "glm45", "glm4_moe"),
    ("tiny-glm47-flash", "glm47", "glm4_moe_lite"),
    ("tiny-glm5", "glm5", "glm_moe_dsa"),
    ("tiny-glm52", "glm52", "glm_moe_dsa"),  # the same model, shipping GLM-5.2's text (reasoning_effort)
]:
    FAMILY_SPECS[_name] = {
        **FAMILY_SPECS["tiny-glm4"],
        "family": _family,
        "special_tokens": SPECIAL_TOKENS[_family],
        "architecture": _architecture,
        "released_template": True,
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
# The class of each architecture, by model type.
ARCHITECTURES = {
    "glm": "GlmForCausalLM",
    "glm4": "Glm4ForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",
    "glm4_moe_lite": "Glm4MoeLiteForCausalLM",
    "glm_moe_dsa": "GlmMoeDsaForCausalLM",
}
# The mixture-of-experts generations at the same width: 8 routed experts (2 per token) and 1 shared one; the first
# layer dense, as in the released models.
MOE_SIZE = {
    "moe_intermediate_size": 128,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
}
# GLM-4.7-Flash's multi-head latent attention, scaled down (the released ranks are 768 / 512, heads 192 + 64).
MLA_SIZE = {"q_lora_rank": 96, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 32, "v_head_dim": 64}
# GLM-5's DSA indexer, scaled down (released: 32 heads of 128, the top 2048 keys): at 64 keys it selects on the
# longer demo rows too.
DSA_SIZE = {"index_n_heads": 2, "index_head_dim": 32, "index_topk": 64}
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
    sizes = [MODEL_SIZE, MOE_SIZE, MLA_SIZE, DSA_SIZE, VOCAB_SIZE]
    digest.update(json.dumps([BUILD_VERSION, SEED, name, FAMILY_SPECS[name], sizes]).encode())
    digest.update(_shipped_template(FAMILY_SPECS[name]).encode())
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


def _shipped_template(spec: dict) -> str:
    """The chat template the built-in tokenizer carries: the released text for the newer generations, else ours."""
    from glm_sft.template import family_template

    if spec.get("released_template"):
        return (TEMPLATE_DIR / "released" / f"{spec['family']}.jinja").read_text(encoding="utf-8")
    return family_template(spec["family"])


def _model(spec: dict, tokenizer, stop_ids: list[int]):
    """The architecture of the spec at the tiny size, random weights from the fixed seed."""
    import torch
    import transformers

    common = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": stop_ids,
        "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": spec["rope_theta"]},
    }
    architecture = spec.get("architecture", "glm")
    if architecture in ("glm", "glm4"):  # bias on q/k/v only, as in GLM
        config_class = transformers.GlmConfig if architecture == "glm" else transformers.Glm4Config
        config = config_class(**MODEL_SIZE, **common, attention_bias=True)
        if architecture == "glm4":
            config.rope_parameters["partial_rotary_factor"] = MODEL_SIZE["partial_rotary_factor"]
    elif architecture == "glm4_moe":
        config = transformers.Glm4MoeConfig(
            **MODEL_SIZE, **MOE_SIZE, **common, attention_bias=True, use_qk_norm=True, num_nextn_predict_layers=0
        )
        config.rope_parameters["partial_rotary_factor"] = MODEL_SIZE["partial_rotary_factor"]
    else:  # glm4_moe_lite and glm_moe_dsa: latent attention, the first layer dense
        size = {key: value for key, value in MODEL_SIZE.items() if key not in ("head_dim", "partial_rotary_factor")}
        layers = ["dense"] * MOE_SIZE["first_k_dense_replace"]
        layers += ["sparse"] * (size["num_hidden_layers"] - len(layers))
        moe = {key: value for key, value in MOE_SIZE.items() if key != "first_k_dense_replace"}
        size["num_key_value_heads"] = size["num_attention_heads"]  # latent attention: no grouped KV heads
        if architecture == "glm4_moe_lite":
            config = transformers.Glm4MoeLiteConfig(**size, **moe, **MLA_SIZE, **common, mlp_layer_types=layers)
        else:
            config = transformers.GlmMoeDsaConfig(
                **size, **moe, **MLA_SIZE, **DSA_SIZE, **common, mlp_layer_types=layers
            )
    torch.manual_seed(SEED)
    return getattr(transformers, ARCHITECTURES[architecture])(config)


def _build(name: str, target: Path) -> None:
    from transformers import GenerationConfig

    from glm_sft.template import stop_token_ids

    spec = FAMILY_SPECS[name]
    tokenizer = _build_tokenizer(spec, _shipped_template(spec))
    stop_ids = stop_token_ids(tokenizer, spec["family"])
    model = _model(spec, tokenizer, stop_ids)
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
