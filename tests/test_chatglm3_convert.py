"""convert_chatglm3.py: a checkpoint in THUDM's ChatGLM3 layout becomes a native GlmForCausalLM that computes the same
logits as ChatGLM3's equations, and a fast tokenizer that gives the ids of ChatGLM3's own message builder."""

import json
import math

import pytest
import torch
from conftest import REPO

from glm_sft import UserError
from glm_sft.builtin import _corpus_texts
from glm_sft.loading import load_tokenizer, resolve_model_path
from glm_sft.template import IGNORE_INDEX, SPECIAL_TOKENS, detect_family
from glm_sft.tokenization import encode_conversation

TINY = {
    "num_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "kv_channels": 16,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "ffn_hidden_size": 96,
    "layernorm_epsilon": 1e-5,
    "seq_length": 256,
}
ENGLISH = [
    "Hello! How can I help you today?",
    "The weather in Beijing is sunny, with a high of 25 degrees.",
    "Please write a short poem about the sea and the moon.",
    "def add(a, b):    return a + b",
    "Large language models are trained on text from many sources.",
]


# --- the sentencepiece tokenizer ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sp_model_file(tmp_path_factory):
    """A tiny BPE sentencepiece model set up like ChatGLM3's (<unk> <s> </s> first, byte fallback, identity)."""
    import sentencepiece

    lines = [line for text in _corpus_texts() for line in text.splitlines() if line.strip()][:400]
    lines += ENGLISH * 20
    prefix = tmp_path_factory.mktemp("sp") / "tokenizer"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=1200,
        byte_fallback=True,
        character_coverage=0.98,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
        num_threads=1,
    )
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def sp(sp_model_file):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(sp_model_file))


def builder_ids_and_labels(sp, messages, add_generation_prompt=False, close_final_turn=False):
    """ChatGLM3's build_chat_input on the sentencepiece model: [gMASK] sop, then per message its role token,
    sp.encode(f"{metadata}\\n") and sp.encode(content); labels mark what follows each <|assistant|> up to and including
    the next role token (or </s> closing a final reply)."""
    special = {token: sp.get_piece_size() + offset for offset, token in enumerate(SPECIAL_TOKENS["chatglm3"])}
    ids, labels = [special["[gMASK]"], special["sop"]], [IGNORE_INDEX, IGNORE_INDEX]
    after_assistant = False
    for message in messages:
        role = special[f"<|{message['role']}|>"]
        ids.append(role)
        labels.append(role if after_assistant else IGNORE_INDEX)
        body = sp.encode(f"{message.get('metadata', '')}\n") + sp.encode(message["content"])
        after_assistant = message["role"] == "assistant"
        ids += body
        labels += body if after_assistant else [IGNORE_INDEX] * len(body)
    if after_assistant and close_final_turn:
        ids.append(sp.eos_id())
        labels.append(sp.eos_id())
    if add_generation_prompt:
        ids.append(special["<|assistant|>"])
        labels.append(IGNORE_INDEX)
    return ids, labels


CONVERSATIONS = [
    [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你？"},
        {"role": "user", "content": "What is the weather in Beijing today?"},
        {"role": "assistant", "content": "The weather in Beijing is sunny, with a high of 25 degrees."},
    ],
    [
        {"role": "user", "content": "  leading and trailing spaces  "},
        {"role": "assistant", "content": " 第一行\n第二行\n\n  indented line\n"},
        {"role": "user", "content": "write code:\ndef add(a, b):\n    return a + b"},
        {"role": "assistant", "content": "```python\ndef add(a, b):\n    return a + b\n```"},
    ],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "请写一首关于大海的短诗。Please!"},
        {"role": "assistant", "metadata": "get_weather", "content": "tool_call(city='北京')"},
        {"role": "observation", "content": '{"temperature": 25}'},
        {"role": "assistant", "content": "北京今天 25 度，晴。😀"},
    ],
]


@pytest.fixture(scope="module")
def converted_tokenizer(sp_model_file, tmp_path_factory):
    from glm_sft.chatglm3 import build_tokenizer

    directory = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(sp_model_file, 256).save_pretrained(directory)
    return load_tokenizer(str(directory))[0]  # through glm_sft's loader, as train.py does


def test_special_tokens_sit_right_after_the_sentencepiece_vocab(converted_tokenizer, sp):
    vocab = converted_tokenizer.get_vocab()
    assert [vocab[token] for token in SPECIAL_TOKENS["chatglm3"]] == list(
        range(sp.get_piece_size(), sp.get_piece_size() + 9)
    )
    assert (vocab["<unk>"], vocab["<s>"], vocab["</s>"]) == (0, 1, 2)
    assert converted_tokenizer.eos_token == "</s>" and converted_tokenizer.pad_token_id == 0
    assert detect_family(converted_tokenizer) == "chatglm3"


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["system-zh-en", "spaces-newlines", "metadata-tool"])
@pytest.mark.parametrize("cut", [2, 3, None])
def test_ids_equal_chatglm3s_message_builder(converted_tokenizer, sp, conversation, cut):
    messages = conversation[:cut]
    for generation_prompt in (False, True):
        text = converted_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        expected, _ = builder_ids_and_labels(sp, messages, add_generation_prompt=generation_prompt)
        assert converted_tokenizer(text, add_special_tokens=False)["input_ids"] == expected, text


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["system-zh-en", "spaces-newlines", "metadata-tool"])
def test_labels_cover_each_reply_and_the_token_that_ends_it(converted_tokenizer, sp, conversation):
    encoded = encode_conversation(converted_tokenizer, conversation)
    expected_ids, expected_labels = builder_ids_and_labels(sp, conversation, close_final_turn=True)
    assert encoded["input_ids"] == expected_ids
    assert encoded["labels"] == expected_labels


def test_plain_text_and_decoding(converted_tokenizer, sp):
    for text in ENGLISH + ["你好，世界！", "  two spaces", "tab\tand 😀"]:
        ids = converted_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == sp.encode(text)
        assert converted_tokenizer.decode(ids) == sp.decode(ids) == text


# --- the model ------------------------------------------------------------------------------------------------------


def write_chatglm3_checkpoint(directory, sp_model_file, *, rope_ratio=None, shard_format="safetensors", seed=0):
    """A random ChatGLM3 checkpoint in THUDM's layout: config.json, tokenizer.model and two weight shards."""
    from safetensors.torch import save_file

    from glm_sft.chatglm3 import expected_shapes

    directory.mkdir(parents=True)
    import sentencepiece

    sp_size = sentencepiece.SentencePieceProcessor(model_file=str(sp_model_file)).get_piece_size()
    config = {
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "auto_map": {"AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        **TINY,
        "padded_vocab_size": math.ceil((sp_size + len(SPECIAL_TOKENS["chatglm3"])) / 64) * 64,
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "rmsnorm": True,
        "post_layer_norm": True,
        "apply_residual_connection_post_layernorm": False,
        "original_rope": True,
        "pad_token_id": 0,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    if rope_ratio is not None:
        config["rope_ratio"] = rope_ratio
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "tokenizer.model").write_bytes(sp_model_file.read_bytes())
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith("layernorm.weight"):
            tensors[name] = 1 + 0.2 * torch.randn(shape, generator=generator)
        elif len(shape) == 1:
            tensors[name] = 0.5 * torch.randn(shape, generator=generator)
        else:
            tensors[name] = torch.randn(shape, generator=generator) * (1.5 / math.sqrt(shape[1]))
    tensors["transformer.rotary_pos_emb.inv_freq"] = torch.ones(4)  # shipped by THUDM, recomputed by GLM
    names = sorted(tensors)
    shards = {"1": names[: len(names) // 2], "2": names[len(names) // 2 :]}
    weight_map = {}
    for number, shard_names in shards.items():
        shard = {name: tensors[name] for name in shard_names}
        if shard_format == "safetensors":
            file_name = f"model-0000{number}-of-00002.safetensors"
            save_file(shard, directory / file_name)
        else:
            file_name = f"pytorch_model-0000{number}-of-00002.bin"
            torch.save(shard, directory / file_name)
        weight_map.update(dict.fromkeys(shard_names, file_name))
    index_name = "model.safetensors.index.json" if shard_format == "safetensors" else "pytorch_model.bin.index.json"
    (directory / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return config, tensors


def rms_norm(x, weight, eps):
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rotate_interleaved_first_half(x, base):
    """ChatGLM3's rotary embedding: on the first half of each head's dims, pairs (x0, x1), (x2, x3), ... rotate by
    position * base ** (-2i / rot_dim). x: (seq, heads, head_dim)."""
    seq, _, head_dim = x.shape
    rot_dim = head_dim // 2
    inv_freq = 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (seq, rot_dim / 2)
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    pairs = x[..., :rot_dim].reshape(seq, x.shape[1], rot_dim // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)
    return torch.cat([rotated, x[..., rot_dim:]], dim=-1)


def chatglm3_reference_logits(tensors, config, input_ids, base=None):
    """ChatGLM3's forward pass, written from its equations, in float64 on the original tensors."""
    t = {name: tensor.double() for name, tensor in tensors.items()}
    heads, groups, head_dim = config["num_attention_heads"], config["multi_query_group_num"], config["kv_channels"]
    eps = config["layernorm_epsilon"]
    base = base or 10000.0 * config.get("rope_ratio", 1)
    seq = len(input_ids)
    x = t["transformer.embedding.word_embeddings.weight"][input_ids]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    for layer in range(config["num_layers"]):
        p = f"transformer.encoder.layers.{layer}."
        h = rms_norm(x, t[p + "input_layernorm.weight"], eps)
        qkv = h @ t[p + "self_attention.query_key_value.weight"].T + t[p + "self_attention.query_key_value.bias"]
        q, k, v = qkv.split([heads * head_dim, groups * head_dim, groups * head_dim], dim=-1)
        q = rotate_interleaved_first_half(q.reshape(seq, heads, head_dim), base)
        k = rotate_interleaved_first_half(k.reshape(seq, groups, head_dim), base)
        v = v.reshape(seq, groups, head_dim)
        # each key/value group serves heads / groups consecutive query heads
        k, v = k.repeat_interleave(heads // groups, dim=1), v.repeat_interleave(heads // groups, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(head_dim)
        weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        context = torch.einsum("hqk,khd->qhd", weights, v).reshape(seq, heads * head_dim)
        x = x + context @ t[p + "self_attention.dense.weight"].T
        h = rms_norm(x, t[p + "post_attention_layernorm.weight"], eps)
        gate, up = (h @ t[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)
        x = x + (torch.nn.functional.silu(gate) * up) @ t[p + "mlp.dense_4h_to_h.weight"].T
    x = rms_norm(x, t["transformer.encoder.final_layernorm.weight"], eps)
    return x @ t["transformer.output_layer.weight"].T


@pytest.mark.parametrize(
    "rope_ratio, shard_format", [(None, "safetensors"), (3.0, "bin")], ids=["safetensors", "bin-rope-ratio-3"]
)
def test_converted_model_computes_chatglm3s_function(tmp_path, sp_model_file, rope_ratio, shard_format):
    from transformers import AutoModelForCausalLM, GlmForCausalLM

    import convert_chatglm3

    source = tmp_path / "chatglm3-6b"
    config, tensors = write_chatglm3_checkpoint(
        source, sp_model_file, rope_ratio=rope_ratio, shard_format=shard_format
    )
    convert_chatglm3.main([str(source), "--out", str(tmp_path / "chatglm3-6b-hf")])

    location = resolve_model_path(str(tmp_path / "chatglm3-6b-hf"))
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, trust_remote_code=False)
    assert isinstance(model, GlmForCausalLM)
    assert model.config.rope_parameters["rope_theta"] == 10000 * (rope_ratio or 1)
    input_ids = torch.randint(0, config["padded_vocab_size"], (24,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids[None]).logits[0].double()
    expected = chatglm3_reference_logits(tensors, config, input_ids)
    assert (logits - expected).abs().max().item() <= 1e-5
    # The comparison is sharp: a wrong rotary base would be caught.
    wrong_base = chatglm3_reference_logits(tensors, config, input_ids, base=10000.0 * (rope_ratio or 1) * 2)
    assert (logits - wrong_base).abs().max().item() > 1e-2

    tokenizer, family = load_tokenizer(location)
    assert family == "chatglm3"
    stop_tokens = ["</s>", "<|user|>", "<|observation|>"]
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids(stop_tokens)


def test_shape_mismatch_names_the_tensor(tmp_path, sp_model_file, capsys):
    import convert_chatglm3

    source = tmp_path / "chatglm3-6b"
    write_chatglm3_checkpoint(source, sp_model_file)
    config = json.loads((source / "config.json").read_text())
    config["ffn_hidden_size"] = 128  # the tensors were written for 96
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exit_info:
        convert_chatglm3.main([str(source), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert "transformer.encoder.layers.0.mlp.dense_h_to_4h.weight" in error and "(192, 64)" in error


def test_bin_shards_are_read_without_unpickling_code(tmp_path, sp_model_file):
    from glm_sft.chatglm3 import read_tensors

    source = tmp_path / "chatglm3-6b"
    write_chatglm3_checkpoint(source, sp_model_file, shard_format="bin")
    torch.save({"transformer.output_layer.weight": torch.nn.Linear(2, 2)}, source / "pytorch_model-00001-of-00002.bin")
    with pytest.raises(UserError, match="weights_only"):
        read_tensors(source)


def test_loading_an_unconverted_directory_names_the_convert_command(tmp_path):
    source = tmp_path / "chatglm3-6b"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": "chatglm"}))
    with pytest.raises(UserError) as error:
        resolve_model_path(str(source))
    assert f"python convert_chatglm3.py {source} --out {source}-hf" in str(error.value)
    assert f"--model_name_or_path {source}-hf" in str(error.value)


def test_glm3_recipes_name_the_converted_directory():
    for name in ("glm3_lora", "glm3_qlora", "glm3_ptuning", "glm3_full"):
        text = (REPO / "recipes" / f"{name}.yaml").read_text(encoding="utf-8")
        assert "model_name_or_path: models/chatglm3-6b-hf" in text
        assert "python convert_chatglm3.py models/chatglm3-6b --out models/chatglm3-6b-hf" in text.split("\n\n")[0]


def test_a_normalization_the_fast_tokenizer_cannot_reproduce_is_refused(tmp_path):
    """nmt_nfkc turns "\\n" into a space, so the metadata line cannot be found: refuse rather than give other ids."""
    import sentencepiece

    from glm_sft.chatglm3 import build_tokenizer, check_tokenizer

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(ENGLISH * 20),
        model_prefix=str(tmp_path / "nfkc"),
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        normalization_rule_name="nmt_nfkc",
        remove_extra_whitespaces=False,
        minloglevel=2,
        num_threads=1,
    )
    tokenizer = build_tokenizer(tmp_path / "nfkc.model", 256)
    with pytest.raises(UserError, match="cannot reproduce"):
        check_tokenizer(tokenizer, tmp_path / "nfkc.model")
