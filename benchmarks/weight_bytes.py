"""Weight bytes of GLM-4.7-Flash and GLM-4.5-Air under QLoRA with 4-bit experts, counted from their configurations.

    python benchmarks/weight_bytes.py

The model is built on the meta device from the released config.json values below (nothing is downloaded, no GPU):
the routed experts (glm_sft.quantized_experts) and the nn.Linear layers (bitsandbytes) in NF4 with double
quantization (per 64 weights: 32 bytes of 4-bit codes and one uint8 absmax; per 256 absmax one fp32: about 4.13 bits
a weight), the rest in bf16 as it loads: embeddings, the LM head, norms, the router, biases (in training, PEFT's k-bit
preparation casts that rest to fp32). A count of stored weights, not a GPU measurement: activations, LoRA factors,
their optimizer state and the CUDA context come on top.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# config.json of zai-org/GLM-4.7-Flash (Glm4MoeLiteForCausalLM), as released.
GLM47_FLASH = dict(
    model_type="glm4_moe_lite",
    vocab_size=154880,
    hidden_size=2048,
    intermediate_size=10240,
    moe_intermediate_size=1536,
    num_hidden_layers=47,
    num_attention_heads=20,
    num_key_value_heads=20,
    q_lora_rank=768,
    kv_lora_rank=512,
    qk_nope_head_dim=192,
    qk_rope_head_dim=64,
    v_head_dim=256,
    n_routed_experts=64,
    n_shared_experts=1,
    num_experts_per_tok=4,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    attention_bias=False,
    tie_word_embeddings=False,
)
# GLM-4.5-Air (Glm4MoeForCausalLM): 46 layers (1 dense), 128 routed experts, GQA 96/8; these values come from a public
# training script's model arguments for GLM-4.5-Air (slime, scripts/models/glm4.5-106B-A12B.sh), not its config.json.
GLM45_AIR = dict(
    model_type="glm4_moe",
    vocab_size=151552,
    hidden_size=4096,
    intermediate_size=10944,
    moe_intermediate_size=1408,
    num_hidden_layers=46,
    num_attention_heads=96,
    num_key_value_heads=8,
    head_dim=128,
    partial_rotary_factor=0.5,
    attention_bias=True,
    use_qk_norm=False,
    n_routed_experts=128,
    n_shared_experts=1,
    num_experts_per_tok=8,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    tie_word_embeddings=False,
)
MODELS = {"GLM-4.7-Flash": GLM47_FLASH, "GLM-4.5-Air": GLM45_AIR}
BLOCK, BLOCK2 = 64, 256


def nf4_bytes(numel: int) -> float:
    """Stored bytes of `numel` weights in NF4 with double quantization (4-bit codes, uint8 absmax per 64 weights,
    fp32 absmax per 256 of those)."""
    return numel / 2 + numel / BLOCK + 4 * numel / (BLOCK * BLOCK2)


def count(values: dict) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    from glm_sft.experts import EXPERT_PARAMETERS, routed_experts

    config = AutoConfig.for_model(**values)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    head = model.get_output_embeddings()
    expert_ids = {id(getattr(module, name)) for module in routed_experts(model) for name in EXPERT_PARAMETERS}
    linear_ids = {
        id(module.weight) for module in model.modules() if isinstance(module, torch.nn.Linear) and module is not head
    }
    sizes = {"experts": 0, "linear": 0, "bf16": 0}
    for parameter in model.parameters():
        kind = "experts" if id(parameter) in expert_ids else "linear" if id(parameter) in linear_ids else "bf16"
        sizes[kind] += parameter.numel()
    stored = {
        "experts": nf4_bytes(sizes["experts"]),
        "linear": nf4_bytes(sizes["linear"]),
        "bf16": 2 * sizes["bf16"],
    }
    return {"parameters": sizes, "bytes": stored, "moe_layers": len(routed_experts(model))}


def main() -> None:
    for name, values in MODELS.items():
        result = count(values)
        sizes, stored = result["parameters"], result["bytes"]
        total = sum(sizes.values())
        print(f"{name}: {total / 1e9:.2f}B parameters (transformers' model, no MTP layer)")
        print(f"  routed experts {sizes['experts'] / 1e9:.2f}B -> NF4 {stored['experts'] / 1e9:.2f} GB")
        print(f"  other linear   {sizes['linear'] / 1e9:.2f}B -> NF4 {stored['linear'] / 1e9:.2f} GB")
        print(f"  bf16 (embeddings, LM head, norms, router, biases) {sizes['bf16'] / 1e9:.2f}B", end=" ")
        print(f"-> {stored['bf16'] / 1e9:.2f} GB")
        weights = sum(stored.values())
        print(f"  weights with 4-bit experts: {weights / 1e9:.2f} GB ({weights / 2**30:.2f} GiB)")
        training = weights + stored["bf16"]
        print(f"  in training: {training / 1e9:.2f} GB (PEFT's k-bit preparation keeps the bf16 rest in fp32)")
        layer = 2 * sizes["experts"] / result["moe_layers"]
        print(f"  one MoE layer's routed experts in bf16: {layer / 1e9:.2f} GB (a QLoRA load gathers them per layer)")
        without = 2 * sizes["experts"] + stored["linear"] + stored["bf16"]
        print(f"  QLoRA with bf16 experts (before): {without / 1e9:.2f} GB; all bf16: {2 * total / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
