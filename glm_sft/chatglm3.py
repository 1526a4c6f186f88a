"""Convert a ChatGLM3 checkpoint in THUDM's remote-code layout to transformers' native GLM classes.

ChatGLM3-6B (chat, base, 32k) is the same network as transformers' GlmForCausalLM: grouped-query attention, rotary
embeddings on the first half of each head with interleaved pairs (x0, x1), (x2, x3), ..., RMSNorm, SwiGLU, bias on
the query/key/value projection only. So the conversion renames tensors and splits the fused ones; no weight is
permuted (GLM's apply_rotary_pos_emb rotates the same pairs of the same dims at the same frequencies, and its MLP
takes silu of the first half of gate_up_proj times the second half, as ChatGLM's swiglu does).

The sentencepiece tokenizer becomes a fast tokenizer that gives the ids of ChatGLM3's own message builder, which
encodes `{metadata}\\n` and the content of every message separately, each with sentencepiece's leading "▁".
"""

import json
from pathlib import Path

from glm_sft import UserError
from glm_sft.template import SPECIAL_TOKENS

# Tensors of the original checkpoint that carry nothing the native model needs (recomputed from the config).
IGNORED_TENSORS = ("transformer.rotary_pos_emb.inv_freq",)
ROPE_BASE = 10000.0
# The first "\n" of a text chunk (the one after a role token) ends the `{metadata}\n` part of a message.
METADATA_LINE = r"\A[^\n]*\n"


def read_chatglm_config(source: Path) -> dict:
    config_file = source / "config.json"
    if not config_file.is_file():
        raise UserError(f"{source}: no config.json in it; expected a ChatGLM3 checkpoint directory")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("model_type") != "chatglm":
        raise UserError(f"{config_file}: model_type is {config.get('model_type')!r}, not 'chatglm'")
    required = ["num_layers", "hidden_size", "ffn_hidden_size", "kv_channels", "num_attention_heads"]
    required += ["multi_query_group_num", "padded_vocab_size", "layernorm_epsilon", "seq_length"]
    missing = [key for key in required if key not in config]
    if missing:
        raise UserError(f"{config_file}: lacks {', '.join(missing)}; expected a ChatGLM3 config")
    # Variants of the architecture the native GLM classes do not implement.
    unsupported = {
        "rmsnorm": True,
        "apply_residual_connection_post_layernorm": False,
        "post_layer_norm": True,
        "add_bias_linear": False,
        "add_qkv_bias": True,
    }
    for key, expected in unsupported.items():
        if config.get(key, expected) != expected:
            raise UserError(f"{config_file}: {key}={config[key]} is not supported (ChatGLM3 has {key}={expected})")
    return config


def glm_config(chatglm: dict, eos_token_ids: list[int] | None = None):
    """The GlmConfig of the same network."""
    from transformers import GlmConfig

    heads = chatglm["num_attention_heads"]
    kv_heads = chatglm["multi_query_group_num"] if chatglm.get("multi_query_attention", True) else heads
    return GlmConfig(
        vocab_size=chatglm["padded_vocab_size"],
        hidden_size=chatglm["hidden_size"],
        intermediate_size=chatglm["ffn_hidden_size"],
        num_hidden_layers=chatglm["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=chatglm["kv_channels"],
        hidden_act="silu",
        max_position_embeddings=chatglm["seq_length"],
        rms_norm_eps=chatglm["layernorm_epsilon"],
        # ChatGLM3 scales its rotary base by rope_ratio (chatglm3-6b-32k); rotary covers half of each head.
        # (original_rope only chose between two implementations of the same function in THUDM's code.)
        rope_parameters={
            "rope_type": "default",
            "rope_theta": ROPE_BASE * chatglm.get("rope_ratio", 1),
            "partial_rotary_factor": 0.5,
        },
        attention_bias=True,
        tie_word_embeddings=False,
        pad_token_id=chatglm.get("pad_token_id", 0),
        eos_token_id=eos_token_ids or chatglm.get("eos_token_id", 2),
        bos_token_id=None,
    )


def _weight_files(source: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_file = source / index_name
        if index_file.is_file():
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
            files = [source / name for name in sorted(set(weight_map.values()))]
            missing = [str(path) for path in files if not path.is_file()]
            if missing:
                raise UserError(f"{index_file} names shards that are not there: {', '.join(missing)}")
            return files
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        files = sorted(source.glob(pattern))
        if files:
            return files
    raise UserError(f"{source}: no weights in it (no *.safetensors or pytorch_model*.bin)")


def read_tensors(source: Path) -> dict:
    """Every tensor of the checkpoint; .bin shards are read with weights_only=True, never unpickling code."""
    import torch
    from safetensors.torch import load_file

    tensors = {}
    for path in _weight_files(source):
        if path.suffix == ".safetensors":
            tensors.update(load_file(path))
        else:
            try:
                tensors.update(torch.load(path, map_location="cpu", weights_only=True))
            except Exception as error:  # an unpickling error names what the file tried to load
                raise UserError(f"{path}: cannot be read as plain tensors (weights_only=True): {error}") from None
    return tensors


def expected_shapes(chatglm: dict) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of a ChatGLM3 checkpoint with this config."""
    hidden, head_dim = chatglm["hidden_size"], chatglm["kv_channels"]
    heads = chatglm["num_attention_heads"]
    kv_heads = chatglm["multi_query_group_num"] if chatglm.get("multi_query_attention", True) else heads
    qkv_rows = (heads + 2 * kv_heads) * head_dim
    ffn, vocab = chatglm["ffn_hidden_size"], chatglm["padded_vocab_size"]
    shapes = {
        "transformer.embedding.word_embeddings.weight": (vocab, hidden),
        "transformer.encoder.final_layernorm.weight": (hidden,),
        "transformer.output_layer.weight": (vocab, hidden),
    }
    for layer in range(chatglm["num_layers"]):
        prefix = f"transformer.encoder.layers.{layer}."
        shapes[prefix + "input_layernorm.weight"] = (hidden,)
        shapes[prefix + "self_attention.query_key_value.weight"] = (qkv_rows, hidden)
        shapes[prefix + "self_attention.query_key_value.bias"] = (qkv_rows,)
        shapes[prefix + "self_attention.dense.weight"] = (hidden, heads * head_dim)
        shapes[prefix + "post_attention_layernorm.weight"] = (hidden,)
        shapes[prefix + "mlp.dense_h_to_4h.weight"] = (2 * ffn, hidden)
        shapes[prefix + "mlp.dense_4h_to_h.weight"] = (hidden, ffn)
    return shapes


def check_tensors(tensors: dict, chatglm: dict, source: Path) -> None:
    shapes = expected_shapes(chatglm)
    missing = [name for name in shapes if name not in tensors]
    if missing:
        raise UserError(f"{source}: the checkpoint lacks {len(missing)} tensors its config needs, e.g. {missing[0]}")
    unknown = [name for name in tensors if name not in shapes and name not in IGNORED_TENSORS]
    if unknown:
        raise UserError(f"{source}: tensors that are not part of ChatGLM3: {', '.join(sorted(unknown)[:5])}")
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise UserError(
                f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, but config.json implies {shape}"
            )


def convert_state_dict(tensors: dict, chatglm: dict) -> dict:
    """The tensors renamed (and the fused query_key_value split) for GlmForCausalLM."""
    head_dim, heads = chatglm["kv_channels"], chatglm["num_attention_heads"]
    kv_heads = chatglm["multi_query_group_num"] if chatglm.get("multi_query_attention", True) else heads
    # query_key_value's rows: every query head, then the key groups, then the value groups.
    split = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    converted = {
        "model.embed_tokens.weight": tensors["transformer.embedding.word_embeddings.weight"],
        "model.norm.weight": tensors["transformer.encoder.final_layernorm.weight"],
        "lm_head.weight": tensors["transformer.output_layer.weight"],
    }
    for layer in range(chatglm["num_layers"]):
        source, target = f"transformer.encoder.layers.{layer}.", f"model.layers.{layer}."
        for kind in ("weight", "bias"):
            query, key, value = tensors[f"{source}self_attention.query_key_value.{kind}"].split(split, dim=0)
            converted[f"{target}self_attn.q_proj.{kind}"] = query.clone()
            converted[f"{target}self_attn.k_proj.{kind}"] = key.clone()
            converted[f"{target}self_attn.v_proj.{kind}"] = value.clone()
        renames = {
            "input_layernorm.weight": "input_layernorm.weight",
            "post_attention_layernorm.weight": "post_attention_layernorm.weight",
            "self_attention.dense.weight": "self_attn.o_proj.weight",
            "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",  # [gate; up] in both
            "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
        }
        for old, new in renames.items():
            converted[target + new] = tensors[source + old]
    return converted


def build_tokenizer(sp_model_file: Path, model_max_length: int):
    """A fast tokenizer equal to ChatGLM3's: the sentencepiece BPE model, its special tokens after the vocabulary, and
    a leading "▁" for each text chunk and for the content after a message's `{metadata}\\n` line."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from glm_sft.template import family_template

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp_model_file.read_bytes())
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise UserError(f"{sp_model_file}: not a BPE sentencepiece model, as ChatGLM3's is")
    piece_type = sentencepiece_model_pb2.ModelProto.SentencePiece
    vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    # sentencepiece BPE merges the adjacent pair whose joined piece scores highest; as ranked merges, that is every
    # way to split a normal piece into two known pieces, ordered by the joined piece's score.
    mergeable = {piece.piece for piece in proto.pieces if piece.type in (piece_type.NORMAL, piece_type.USER_DEFINED)}
    ranked = []
    for index, piece in enumerate(proto.pieces):
        if piece.type != piece_type.NORMAL:
            continue
        text = piece.piece
        for cut in range(1, len(text)):
            if text[:cut] in mergeable and text[cut:] in mergeable:
                ranked.append((-piece.score, index, vocab[text[:cut]], (text[:cut], text[cut:])))
    merges = [pair for *_, pair in sorted(ranked)]
    unk = proto.pieces[proto.trainer_spec.unk_id].piece
    backend = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))

    spec = proto.normalizer_spec
    steps = []
    if spec.name != "identity" and spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:  # per encoded part: no leading, trailing or repeated spaces
        steps += [
            normalizers.Replace(Regex(" {2,}"), " "),
            normalizers.Replace(Regex(r"\A +| +\z"), ""),
            normalizers.Replace(Regex(METADATA_LINE + r"\K +"), ""),
        ]
    steps.append(normalizers.Replace(" ", "▁"))
    if spec.add_dummy_prefix:
        steps += [normalizers.Prepend("▁"), normalizers.Replace(Regex(METADATA_LINE + r"\K(?=[\s\S])"), "▁")]
    backend.normalizer = normalizers.Sequence(steps)
    # Encode `{metadata}\n` and the content apart, as ChatGLM3's message builder does.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(METADATA_LINE), "isolated")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )

    controls = [piece.piece for piece in proto.pieces if piece.type in (piece_type.CONTROL, piece_type.UNKNOWN)]
    # sop and eop are plain words: match them only as whole words.
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in controls]
        + [
            AddedToken(token, special=True, normalized=False, single_word=token.isalpha())
            for token in SPECIAL_TOKENS["chatglm3"]
        ]
    )
    for offset, token in enumerate(SPECIAL_TOKENS["chatglm3"]):
        if backend.token_to_id(token) != len(proto.pieces) + offset:
            raise UserError(f"{sp_model_file}: the sentencepiece vocabulary already holds {token!r}")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=proto.pieces[proto.trainer_spec.eos_id].piece,
        unk_token=unk,
        pad_token=unk,  # ChatGLM3 pads with <unk>
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = family_template("chatglm3")
    return tokenizer


# Messages that exercise what the tokenizer must get right: metadata lines, leading, trailing and inner spaces,
# newlines inside content, Chinese and English, empty content.
PROBE_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant. 你是一个乐于助人的助手。"},
    {"role": "user", "content": "  two leading spaces, two trailing  "},
    {"role": "assistant", "metadata": "get_weather", "content": "tool_call(city='北京')"},
    {"role": "observation", "content": '{"temperature": 25}\n'},
    {"role": "assistant", "content": "\n第一行\n\n    indented  line\n"},
    {"role": "user", "content": ""},
]


def check_tokenizer(tokenizer, sp_model_file: Path) -> None:
    """Stop unless the fast tokenizer gives the ids of ChatGLM3's message builder (role token, then
    sp.encode(f"{metadata}\\n") and sp.encode(content) for every message) on PROBE_MESSAGES."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(sp_model_file))
    expected = tokenizer.convert_tokens_to_ids(["[gMASK]", "sop"])
    for message in PROBE_MESSAGES:
        expected.append(tokenizer.convert_tokens_to_ids(f"<|{message['role']}|>"))
        expected += sp.encode(f"{message.get('metadata', '')}\n") + sp.encode(message["content"])
    text = tokenizer.apply_chat_template(PROBE_MESSAGES, tokenize=False)
    if tokenizer(text, add_special_tokens=False)["input_ids"] != expected:
        raise UserError(
            f"{sp_model_file}: the fast tokenizer cannot reproduce this sentencepiece model's normalization; its "
            "token ids for a conversation would differ from ChatGLM3's own, so nothing was converted"
        )


def convert_chatglm3(source: str | Path, output: str | Path) -> Path:
    """Write `source` (THUDM's layout) to `output` as a native GlmForCausalLM with its fast tokenizer."""
    import torch
    from transformers import GenerationConfig, GlmForCausalLM

    from glm_sft.template import stop_token_ids

    source, output = Path(source).expanduser(), Path(output).expanduser()
    if not source.is_dir():
        raise UserError(f"{source}: no such directory")
    if output.exists() and any(output.iterdir()):
        raise UserError(f"{output} exists and is not empty; choose another --out or remove it")
    chatglm = read_chatglm_config(source)
    sp_model_file = source / "tokenizer.model"
    if not sp_model_file.is_file():
        raise UserError(f"{source}: no tokenizer.model in it")
    tokenizer = build_tokenizer(sp_model_file, chatglm["seq_length"])
    check_tokenizer(tokenizer, sp_model_file)
    stop_ids = stop_token_ids(tokenizer, "chatglm3")
    if max(stop_ids) >= chatglm["padded_vocab_size"]:
        raise UserError(f"{source}: padded_vocab_size {chatglm['padded_vocab_size']} is smaller than the tokenizer")

    tensors = read_tensors(source)
    check_tensors(tensors, chatglm, source)
    state_dict = convert_state_dict(tensors, chatglm)
    del tensors
    config = glm_config(chatglm, stop_ids)
    config.dtype = state_dict["model.embed_tokens.weight"].dtype
    with torch.device("meta"):
        model = GlmForCausalLM(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.generation_config = GenerationConfig(eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return output
