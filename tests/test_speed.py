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
