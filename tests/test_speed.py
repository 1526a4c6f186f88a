"""Padding-free batches change the work, never the result: same logits per row, same loss, same labels."""

import pytest
import torch
from conftest import build_run

from glm_sft import UserError, speed


@pytest.fixture(scope="module")
def demo_trainer(tmp_path_factory):
    """The demo recipe's trainer (tiny GLM-4, LoRA), fp32 on the CPU, dropout off for exact comparisons."""
    out = tmp_path_factory.mktemp("speed") / "out"
    run = build_run(
        ["--config", "recipes/demo.yaml", "--output_dir", str(out), "--report_to", "none", "--sample_count", "0"]
    )
    run.trainer.model.eval()
    return run.trainer, run.choices


def rows_of(trainer, count=6):
    """Rows of different lengths from the demo data, longest first then shortest, as a batch would hold them."""
    rows = [trainer.train_dataset[index] for index in range(len(trainer.train_dataset))]
    rows.sort(key=lambda row: len(row["input_ids"]))
    picked = rows[-count // 2 :] + rows[: count - count // 2]
    assert len({len(row["input_ids"]) for row in picked}) > 2
    return picked


def test_recipes_default_to_padding_free_batches_with_per_row_attention(demo_trainer):
    trainer, report = demo_trainer
    assert trainer.data_collator.padding_free
    assert trainer.model.config._attn_implementation == speed.VARLEN_ATTENTION
    assert speed.fused_lm_head_applied(trainer.model)
    assert report[0].startswith("batches: padding-free, each row attends only to itself")
    assert "fused LM head" in report[-1]


def test_packed_batch_keeps_each_rows_logits(demo_trainer):
    trainer, _ = demo_trainer
    rows = rows_of(trainer)
    batch = trainer.data_collator(rows)
    assert batch["input_ids"].shape == (1, sum(len(row["input_ids"]) for row in rows))  # no padding at all
    base = trainer.model.get_base_model()
    with torch.no_grad():
        packed = base(**{key: value for key, value in batch.items() if key != "labels"}).logits[0]
        # Without the collator's row boundaries, the rows are told apart by where position_ids restart.
        from_positions = base(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        torch.testing.assert_close(from_positions, packed, atol=1e-5, rtol=1e-5)
        bounds = batch["cu_seq_lens_q"].tolist()
        for index, row in enumerate(rows):
            alone = base(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            torch.testing.assert_close(packed[bounds[index] : bounds[index + 1]], alone, atol=1e-5, rtol=1e-5)
            # Rotary positions restart at each row.
            assert batch["position_ids"][0, bounds[index] : bounds[index + 1]].tolist() == list(range(len(alone)))


def test_packed_batch_loss_is_the_token_weighted_mean_of_row_losses(demo_trainer):
    trainer, _ = demo_trainer
    rows = rows_of(trainer)
    with torch.no_grad():
        packed_loss = trainer.compute_loss(trainer.model, trainer.data_collator(rows)).item()
        total, count = 0.0, 0
        for row in rows:
            trained = sum(label != -100 for label in row["labels"])
            total += trainer.compute_loss(trainer.model, trainer.data_collator([row])).item() * trained
            count += trained
    assert packed_loss == pytest.approx(total / count, abs=1e-5)


def test_packed_labels_are_the_rows_labels_end_to_end(demo_trainer):
    """Masks and end tokens survive: the packed labels are the rows' labels laid end to end."""
    trainer, _ = demo_trainer
    rows = rows_of(trainer)
    batch = trainer.data_collator(rows)
    expected = [label for row in rows for label in row["labels"]]
    assert batch["labels"][0].tolist() == expected


def test_varlen_attention_matches_sdpa_block_mask_and_padded_rows(demo_trainer):
    """sdpa_varlen gives what transformers' own SDPA gives with its block-diagonal mask, and a padded batch."""
    trainer, _ = demo_trainer
    rows = rows_of(trainer, count=4)
    base = trainer.model.get_base_model()
    batch = trainer.data_collator(rows)
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        varlen = base(**inputs).logits
        base.set_attn_implementation("sdpa")
        try:
            block_mask = base(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
            longest = max(len(row["input_ids"]) for row in rows)
            lengths = [len(row["input_ids"]) for row in rows]
            ids = torch.tensor([row["input_ids"] + [0] * (longest - n) for row, n in zip(rows, lengths, strict=True)])
            mask = torch.tensor([[1] * n + [0] * (longest - n) for n in lengths])
            padded = base(input_ids=ids, attention_mask=mask).logits
        finally:
            base.set_attn_implementation(speed.VARLEN_ATTENTION)
    torch.testing.assert_close(varlen, block_mask, atol=1e-5, rtol=1e-5)
    bounds = batch["cu_seq_lens_q"].tolist()
    for index, row in enumerate(rows):
        length = len(row["input_ids"])
        part = varlen[0, bounds[index] : bounds[index + 1]]
        torch.testing.assert_close(part, padded[index, :length], atol=1e-5, rtol=1e-5)


def test_fused_lm_head_never_builds_the_full_logits(demo_trainer):
    trainer, _ = demo_trainer
    batch = trainer.data_collator(rows_of(trainer))
    with torch.no_grad():
        outputs = trainer.model(**batch, fused_lm_head=True)
    assert getattr(outputs, "logits", None) is None
    trained = int((batch["labels"][0, 1:] != -100).sum())
    assert int((outputs.log_probs != 0).sum()) == trained  # one log-probability per trained position, no more


def test_ptuning_falls_back_to_length_grouped_padded_batches(tmp_path):
    run = build_run(
        ["--config", "recipes/demo.yaml", "--output_dir", str(tmp_path / "p"), "--report_to", "none"]
        + ["--finetuning_type", "ptuning", "--pre_seq_len", "4", "--sample_count", "0"]
    )
    trainer = run.trainer
    assert not trainer.data_collator.padding_free
    assert trainer.args.train_sampling_strategy == "group_by_length"
    sampler = trainer._get_train_sampler()
    assert type(sampler).__name__ == "LengthGroupedSampler"
    order = list(sampler)
    assert sorted(order) == list(range(len(trainer.train_dataset)))  # every row once, grouped by length
    assert run.choices[0].startswith("batches: padded to their longest row (P-Tuning v2")


def test_explicit_padding_free_that_cannot_hold_is_an_error(tmp_path):
    with pytest.raises(UserError, match="ptuning cannot be combined with packing or padding_free"):
        build_run(
            ["--config", "recipes/demo.yaml", "--output_dir", str(tmp_path / "p"), "--report_to", "none"]
            + ["--finetuning_type", "ptuning", "--padding_free", "true"]
        )


def test_packing_uses_the_same_per_row_attention(tmp_path):
    """`packing: true` (TRL's best-fit-decreasing packs of max_length) keeps the rows apart as well."""
    run = build_run(
        ["--config", "recipes/demo.yaml", "--output_dir", str(tmp_path / "k"), "--report_to", "none"]
        + ["--packing", "true", "--sample_count", "0"]
    )
    assert run.choices[0].startswith("batches: packed to max_length")
    trainer = run.trainer
    pack = trainer.train_dataset[0]
    assert len(pack["input_ids"]) <= 256 and len(pack["seq_lengths"]) > 1
    batch = trainer.data_collator([pack])
    base = trainer.model.get_base_model()
    base.eval()
    with torch.no_grad():
        packed = base(**{key: value for key, value in batch.items() if key != "labels"}).logits[0]
        start = 0
        for length in pack["seq_lengths"]:
            alone = base(input_ids=torch.tensor([pack["input_ids"][start : start + length]])).logits[0]
            torch.testing.assert_close(packed[start : start + length], alone, atol=1e-5, rtol=1e-5)
            start += length


def test_liger_is_refused_where_it_has_no_kernels_for_the_model(tmp_path, monkeypatch):
    """Liger's GLM patches are for Glm4ForCausalLM (GLM-4-0414); on GlmForCausalLM it would log and change nothing."""
    import sys
    import types

    argv = ["--config", "recipes/demo.yaml", "--output_dir", str(tmp_path / "l"), "--report_to", "none"]
    argv += ["--use_liger_kernel", "true", "--sample_count", "0"]
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # not installed
    with pytest.raises(UserError, match="use_liger_kernel needs the liger-kernel package"):
        build_run(argv)
    patches = types.ModuleType("liger_kernel.transformers.monkey_patch")
    patches.MODEL_TYPE_TO_APPLY_LIGER_FN = {"glm4": None, "llama": None}  # the keys Liger ships, in short
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", patches)
    with pytest.raises(UserError, match="Liger has no kernels for model type glm \\(GlmForCausalLM\\)"):
        build_run(argv)


def lora_grads(model):
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


def test_lean_lm_head_matches_trls_fused_head_and_its_gradients(demo_trainer, monkeypatch):
    """The trained-position loss gives TRL's loss, log-probabilities, entropy, top-1 flags and LoRA gradients, with
    the softmax saved and, in small tiles, recomputed in the backward."""
    trainer, report = demo_trainer
    assert "LM head on the CPU: trained positions only, one softmax pass per tile" in report
    base = trainer.model.get_base_model()
    assert base.forward.__func__.lean
    batch = trainer.data_collator(rows_of(trainer))

    def run(forward):
        trainer.model.zero_grad()
        outputs = forward(**batch, fused_lm_head=True)
        outputs.loss.backward()
        return outputs, lora_grads(trainer.model)

    reference, reference_grads = run(base.forward.__func__.fallback)
    assert reference_grads and all("lora_" in name for name in reference_grads)
    for save, tile in ((speed.SAVE_ELEMENTS, speed.TILE_ELEMENTS), (0, 7 * base.config.vocab_size)):
        monkeypatch.setattr(speed, "SAVE_ELEMENTS", save)
        monkeypatch.setattr(speed, "TILE_ELEMENTS", tile)
        ours, grads = run(base.forward)
        torch.testing.assert_close(ours.loss, reference.loss, atol=1e-6, rtol=1e-6)
        for key in ("log_probs", "entropy"):
            torch.testing.assert_close(getattr(ours, key), getattr(reference, key), atol=1e-5, rtol=1e-5)
        assert torch.equal(ours.is_top1, reference.is_top1) and torch.equal(ours.label_mask, reference.label_mask)
        assert grads.keys() == reference_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference_grads[name], atol=1e-5, rtol=1e-4)
    trainer.model.zero_grad()


def test_trained_log_probs_and_head_gradient_match_log_softmax():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    targets[0] = int((hidden[0] @ weight.t()).argmax())
    log_probs, entropy, top1 = speed.trained_log_probs(hidden, weight, targets)
    reference = torch.log_softmax(hidden @ weight.t(), dim=-1)
    torch.testing.assert_close(log_probs, reference.gather(-1, targets[:, None]).squeeze(-1).float())
    torch.testing.assert_close(entropy, -(reference.exp() * reference).sum(-1).float())
    assert torch.equal(top1, reference.argmax(-1) == targets) and top1[0]
    nothing = speed.trained_log_probs(hidden[:0], weight, targets[:0])  # a batch without trained positions
    assert [value.shape for value in nothing] == [(0,)] * 3
    nothing[0].sum().backward()
    assert hidden.grad.abs().sum() == 0
    hidden.grad = weight.grad = None
    weights = torch.rand(37, dtype=torch.float64)
    ours = torch.autograd.grad((log_probs * weights).sum(), (hidden, weight))
    expected = torch.autograd.grad(
        (reference.gather(-1, targets[:, None]).squeeze(-1) * weights).sum(), (hidden, weight)
    )
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got, want.float().to(got.dtype), atol=1e-5, rtol=1e-5)


def test_dropout_mask_keeps_each_entry_with_probability_one_minus_p():
    torch.manual_seed(0)
    mask, keep = speed.dropout_mask(torch.zeros(400, 500), 0.1)
    assert keep == 1 - round(0.1 * 2**32) / 2**32 and abs(keep - 0.9) < 1e-9
    assert mask.dtype == torch.bool and mask.shape == (400, 500)
    assert abs(mask.float().mean().item() - 0.9) < 0.003  # 200,000 draws: the standard error is 0.0007
    assert speed.dropout_mask(torch.zeros(8), 0.0)[0].all()


def test_lean_lora_forward_is_peft_lora_with_the_scale_on_the_rank_side(demo_trainer):
    """Dropout off: PEFT's forward; dropout on: base(x) + B(A(x * mask)) * scaling / keep with the mask drawn from the
    same random state."""
    from peft.tuners.lora.layer import Linear

    trainer, report = demo_trainer
    assert any(line.startswith("LoRA: lean forward on ") for line in report)
    layer = next(module for module in trainer.model.modules() if isinstance(module, Linear))
    assert type(layer).forward is speed._lean_lora_forward
    x = torch.randn(1, 5, layer.in_features)
    original = layer.lora_dropout["default"]  # the demo recipe has none
    weight_b = layer.lora_B["default"].weight
    saved_b = weight_b.detach().clone()
    with torch.no_grad():
        try:
            weight_b.normal_()  # B starts at zero, which would hide the LoRA term
            torch.testing.assert_close(layer(x), Linear.forward(layer, x), atol=1e-6, rtol=1e-6)
            layer.lora_dropout["default"] = torch.nn.Dropout(0.1)
            layer.train()
            torch.manual_seed(3)
            ours = layer(x)
            after = torch.get_rng_state()
            torch.manual_seed(3)  # as checkpointing's recomputation does: the same state, the same mask, not redrawn
            again = layer(x)
            assert torch.equal(torch.get_rng_state(), after)
            different = layer(x)  # another state: another mask
            torch.manual_seed(3)
            mask, keep = speed.dropout_mask(x, 0.1)
            lora_a, lora_b = layer.lora_A["default"], layer.lora_B["default"]
            expected = layer.base_layer(x) + lora_b(lora_a(x * mask)) * layer.scaling["default"] / keep
        finally:
            layer.eval()
            layer.lora_dropout["default"] = original
            weight_b.copy_(saved_b)
    assert torch.equal(again, ours) and not torch.equal(different, ours)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)


def test_checkpointed_lora_dropout_gives_the_gradients_of_the_plain_run(demo_trainer, monkeypatch):
    """Recomputation under gradient checkpointing takes the mask of the first run: the gradients are those of a run
    without checkpointing from the same seed, and the random stream ends where it does."""
    from peft.tuners.lora.layer import Linear
    from torch.utils.checkpoint import checkpoint

    trainer, _ = demo_trainer
    layer = next(module for module in trainer.model.modules() if isinstance(module, Linear))
    original = layer.lora_dropout["default"]
    layer.lora_dropout["default"] = torch.nn.Dropout(0.1)
    layer.train()
    weight_b = layer.lora_B["default"].weight
    saved_b = weight_b.detach().clone()
    with torch.no_grad():
        weight_b.normal_()  # B starts at zero, which would leave A without a gradient
    x = torch.randn(2, 7, layer.in_features, requires_grad=True)
    draws = []
    draw = speed.dropout_mask
    monkeypatch.setattr(speed, "dropout_mask", lambda *args: draws.append(1) or draw(*args))
    results = []
    try:
        for checkpointed in (False, True):
            layer._last_dropout_mask = None
            draws.clear()
            torch.manual_seed(5)
            out = checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x)
            out.pow(2).sum().backward()
            grads = [x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad]
            results.append(([grad.clone() for grad in grads], torch.get_rng_state()))
            assert len(draws) == 1  # checkpointed: the recomputation took the first run's mask
            trainer.model.zero_grad()
            x.grad = None
    finally:
        layer.eval()
        layer.lora_dropout["default"] = original
        with torch.no_grad():
            weight_b.copy_(saved_b)
    (plain, plain_state), (checkpointed, checkpointed_state) = results
    assert torch.equal(plain_state, checkpointed_state)
    for got, want in zip(checkpointed, plain, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert plain[1].abs().sum() > 0
