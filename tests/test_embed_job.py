"""The embed and finetune jobs: incremental embedding (pure and on Ray), Ray Train fine-tuning."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from test_finetune import topic_dataset

from recsys.encoder import (
    DEFAULT_TEMPLATE,
    EncoderConfig,
    FinetuneConfig,
    TextEncoder,
    embed_catalogue,
    item_texts,
    load_item_vectors,
    read_item_vectors,
    read_manifest,
)
from recsys.errors import ConfigError


def catalogue(n: int = 12) -> pl.DataFrame:
    words = [
        "red",
        "apple",
        "blue",
        "ocean",
        "green",
        "leaf",
        "tree",
        "sky",
        "sea",
        "rose",
        "lime",
        "wave",
    ]
    return pl.DataFrame(
        {
            "item_id": [f"i{k}" for k in range(n)],
            "title": [f"{words[k % 12]} {words[(k * 5) % 12]}" for k in range(n)],
            "category": ["fruit"] * n,
            "description": [None if k % 3 else "a long story about the sea" for k in range(n)],
        }
    )


def edited(items: pl.DataFrame) -> pl.DataFrame:
    """i1's text changes, i2 leaves the catalogue, i99 arrives (no text but a subcategory)."""
    changed = items.with_columns(
        pl.when(pl.col("item_id") == "i1")
        .then(pl.lit("green moss"))
        .otherwise("title")
        .alias("title")
    ).filter(pl.col("item_id") != "i2")
    new = pl.DataFrame({"item_id": ["i99"], "title": [""], "subcategory": ["orchard"]})
    return pl.concat([changed, new], how="diagonal_relaxed")


def test_incremental_embedding_skips_unchanged_items(tiny_model_dir: Path) -> None:
    enc = TextEncoder.load(tiny_model_dir)
    calls: list[list[str]] = []

    def embed(texts: list[str]) -> np.ndarray:
        calls.append(texts)
        return enc.embed(texts)

    items = catalogue()
    first, plan = embed_catalogue(embed, items, DEFAULT_TEMPLATE, enc.encoder_id)
    assert plan.todo.height == 12 and first["item_id"].to_list() == items["item_id"].to_list()
    second, plan2 = embed_catalogue(embed, edited(items), DEFAULT_TEMPLATE, enc.encoder_id, first)
    assert calls[1] == ["green moss. fruit", "orchard"]  # only the changed and the new item
    assert (plan2.reused.height, plan2.dropped, plan2.fallback_texts) == (10, 1, 1)
    assert second["item_id"].to_list() == edited(items)["item_id"].to_list()
    keep = [f"i{k}" for k in range(12) if k not in (1, 2)]
    old = first.filter(pl.col("item_id").is_in(keep))["vector"].to_numpy()
    new = second.filter(pl.col("item_id").is_in(keep))["vector"].to_numpy()
    np.testing.assert_array_equal(old, new)  # identical, not recomputed
    # A different encoder id re-embeds everything.
    _, plan3 = embed_catalogue(embed, edited(items), DEFAULT_TEMPLATE, "other", second)
    assert plan3.todo.height == 12 and plan3.reused.height == 0


def head_encoder(tiny_model_dir: Path, out: Path, *, trained_adapter: bool = False) -> Path:
    """An encoder dir as fine-tuning writes when a head epoch ships: the LoRA adapter untouched
    (every lora_B zero) plus a trained projection head; trained_adapter: one lora_B moved."""
    from recsys.encoder.model import projection_head
    from recsys.encoder.store import save_encoder
    from recsys.encoder.trainable import build_model

    cfg = FinetuneConfig(lora_layers=1, lora_r=4, target_modules=("query", "value"))
    model, _ = build_model(cfg, tiny_model_dir)
    head = projection_head(model)
    assert head is not None
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        head.weight.copy_(torch.eye(32) + 0.5 * torch.randn(32, 32, generator=g))
        if trained_adapter:
            b = next(p for n, p in model.named_parameters() if "lora_B" in n)
            b.add_(0.1)
    return save_encoder(model, out, base_model=tiny_model_dir, config=cfg)


def test_a_head_only_encoder_is_its_head_on_the_base_vectors(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """The shortcut the nightly takes when fine-tuning shipped a head epoch: the head applied to
    the frozen vectors gives what the tuned encoder itself computes, without running it."""
    from recsys.encoder.store import head_only
    from recsys.encoder.vectors import plan_embedding, through_head

    enc_dir = head_encoder(tiny_model_dir, tmp_path / "enc")
    found = head_only(enc_dir)
    assert found is not None and found[1].resolve() == tiny_model_dir.resolve()
    assert head_only(head_encoder(tiny_model_dir, tmp_path / "b", trained_adapter=True)) is None
    assert head_only(tiny_model_dir) is None  # a plain model folder: nothing to derive
    base, tuned = TextEncoder.load(tiny_model_dir), TextEncoder.load(enc_dir)
    assert base.encoder_id != tuned.encoder_id
    items = catalogue()
    base_table, _ = embed_catalogue(base.embed, items, DEFAULT_TEMPLATE, base.encoder_id)
    plan = plan_embedding(items.head(10), DEFAULT_TEMPLATE, tuned.encoder_id, None)
    rows, left = through_head(plan, base_table.head(8), base.encoder_id, found[0],
                              tuned.encoder_id)  # fmt: skip
    assert rows["item_id"].to_list() == [f"i{k}" for k in range(8)]
    assert left.todo["item_id"].to_list() == ["i8", "i9"]  # not in the base table: the encoder
    assert rows["encoder_id"].unique().to_list() == [tuned.encoder_id]
    want = tuned.embed(plan.todo["text"].to_list()[:8])
    np.testing.assert_allclose(rows["vector"].to_numpy(), want, atol=1e-5)
    # base vectors under another id (another encoder or form) are not used
    rows, left = through_head(plan, base_table, "other", found[0], tuned.encoder_id)
    assert rows.height == 0 and left.todo.height == 10


# --- Ray jobs (a real local Ray) ---------------------------------------------------------------


@pytest.mark.slow
def test_embed_job_on_ray_is_incremental(tmp_path: Path, tiny_model_dir: Path, ray_local) -> None:
    from pipelines.embed import run_embed

    out = tmp_path / "item_vectors.parquet"
    items = catalogue()
    r1 = run_embed(items, tiny_model_dir, out)
    assert (r1.embedded, r1.reused, r1.dropped) == (12, 0, 0)
    assert r1.device.startswith("cuda" if torch.cuda.is_available() else "cpu")
    ids, v1 = load_item_vectors(out)
    assert ids == items["item_id"].to_list() and v1.shape == (12, 32) and v1.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v1, axis=1), 1.0, atol=1e-5)
    table = read_item_vectors(out)
    assert table.columns == ["item_id", "vector", "text_hash", "encoder_id"]
    assert table["encoder_id"].unique().to_list() == [r1.encoder_id]
    # the default form (int8 on a CPU with VNNI, else fp32): close to the fp32 encoder
    fp32 = TextEncoder.load(tiny_model_dir).embed(["red apple. fruit. a long story about the sea"])
    assert float(v1[0] @ fp32[0]) > 0.99

    r2 = run_embed(edited(items), tiny_model_dir, out)
    assert (r2.embedded, r2.reused, r2.dropped, r2.fallback_texts) == (2, 10, 1, 1)
    ids2, v2 = load_item_vectors(out)
    assert ids2 == edited(items)["item_id"].to_list()
    same = [ids.index(i) for i in ids2 if i not in ("i1", "i99")]
    np.testing.assert_array_equal(v1[same], v2[[ids2.index(ids[k]) for k in same]])
    assert not np.allclose(v1[ids.index("i1")], v2[ids2.index("i1")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["item_vectors.parquet"]  # atomic

    r3 = run_embed(edited(items), tiny_model_dir, out)  # nothing to do: Ray is not needed
    assert (r3.embedded, r3.reused, r3.actors) == (0, 12, 0)

    # Items sharing a text (colour variants) send that text to the actors once.
    twins = pl.concat([items, items.with_columns(pl.format("t{}", "item_id").alias("item_id"))])
    r4 = run_embed(twins, tiny_model_dir, tmp_path / "twins.parquet")
    assert (r4.embedded, r4.distinct_texts, r4.reused) == (24, 12, 0)
    ids4, v4 = load_item_vectors(tmp_path / "twins.parquet")
    assert ids4 == twins["item_id"].to_list()
    np.testing.assert_array_equal(v4[:12], v4[12:])
    np.testing.assert_allclose(v4[:12], v1, atol=1e-5)


@pytest.mark.slow
def test_embed_job_gives_every_actor_work_and_names_the_form(
    tmp_path: Path, tiny_model_dir: Path, ray_local
) -> None:
    from pipelines.embed import run_embed

    out = tmp_path / "v.parquet"
    items = catalogue(400).with_columns(pl.format("{} {}", "title", "item_id").alias("title"))
    r = run_embed(items, tiny_model_dir, out, num_actors=2)
    assert r.actors == 2 and sum(r.texts_per_actor.values()) == 400
    assert len(r.texts_per_actor) == 2 and min(r.texts_per_actor.values()) > 0, r.texts_per_actor
    from recsys.encoder.model import cpu_has_fast_int8

    cpu_form = "int8" if cpu_has_fast_int8() else "fp32"  # "auto" on this CPU
    form = "cuda-fp16" if torch.cuda.is_available() else f"cpu-{cpu_form}"
    base = TextEncoder.load(tiny_model_dir).encoder_id
    assert r.encoder_id == f"{base}+{form}"
    assert read_item_vectors(out)["encoder_id"].unique().to_list() == [r.encoder_id]
    # Another form is another identity: every vector is recomputed, none mixed in.
    other = "bf16" if torch.cuda.is_available() else {"int8": "none", "fp32": "int8"}[cpu_form]
    r2 = run_embed(items, tiny_model_dir, out, config=EncoderConfig(quantize=other))
    assert (r2.embedded, r2.reused) == (400, 0) and r2.encoder_id != r.encoder_id
    # A form the device cannot compute is refused, not swapped.
    wrong = "int8" if torch.cuda.is_available() else "fp16"
    with pytest.raises(ConfigError, match="quantize"):
        run_embed(catalogue(), tiny_model_dir, tmp_path / "w.parquet",
                  config=EncoderConfig(quantize=wrong))  # fmt: skip


@pytest.mark.slow
def test_embed_job_applies_a_head_only_encoder_to_the_base_vectors(
    tmp_path: Path, tiny_model_dir: Path, ray_local
) -> None:
    from pipelines.embed import run_embed

    enc_dir = head_encoder(tiny_model_dir, tmp_path / "enc")
    fp32 = EncoderConfig(quantize="none")  # so the in-process encoder is the reference
    base = tmp_path / "frozen.parquet"
    run_embed(
        catalogue(10), None, base, config=dataclasses.replace(fp32, model_path=str(tiny_model_dir))
    )
    r = run_embed(catalogue(), enc_dir, tmp_path / "v.parquet", config=fp32, base_vectors=base)
    # 10 texts through the head, the 2 the frozen file lacks on the actors
    assert (r.embedded, r.through_head, r.distinct_texts, r.actors) == (12, 10, 2, 1)
    table = read_item_vectors(tmp_path / "v.parquet")
    assert table["encoder_id"].unique().to_list() == [r.encoder_id]
    want = TextEncoder.load(enc_dir).embed(item_texts(catalogue(), DEFAULT_TEMPLATE)[0])
    np.testing.assert_allclose(table["vector"].to_numpy(), want, atol=1e-5)
    # everything in the frozen file: Ray is not needed at all
    r2 = run_embed(catalogue(10), enc_dir, tmp_path / "v2.parquet", config=fp32,
                   base_vectors=base)  # fmt: skip
    assert (r2.through_head, r2.actors, r2.device) == (10, 0, "head on base vectors")
    assert r2.encoder_id == r.encoder_id


@pytest.mark.slow
def test_finetune_job_on_ray_train(tmp_path: Path, tiny_model_dir: Path, ray_local) -> None:
    from pipelines.embed import run_embed
    from pipelines.finetune import run_finetune

    cfg = FinetuneConfig(
        max_steps=24,
        epochs=2,
        batch_size=8,
        lr=2e-2,
        lora_r=4,
        val_fraction=0.2,
        history_grad=True,
        target_modules=("query", "value"),
        head_epochs=2,
        patience=None,
    )
    seen: list[dict] = []
    lines: list[str] = []
    report = run_finetune(
        topic_dataset(), tmp_path / "enc", cfg, base_model=tiny_model_dir, on_epoch=seen.append,
        log=lines.append,
    )  # fmt: skip
    # the head's 2 epochs, then the adapter's 2, numbered on
    assert [(m["epoch"], m["phase"]) for m in seen] == [
        (1, "head"), (2, "head"), (3, "adapter"), (4, "adapter")
    ]  # fmt: skip
    assert len(report.losses) == 4
    assert len(report.val_scores) == 5 and report.best_epoch >= 1 and not report.fell_back
    assert report.val_scores[report.best_epoch] == max(report.val_scores)
    assert report.peak_rss_mb > 0
    assert sum(len(m["step_losses"]) for m in report.epochs if m["phase"] == "adapter") == 24
    assert any("epoch 1 (head)" in line for line in lines)  # per-epoch progress on the driver
    assert report.device == ("cuda x1" if torch.cuda.is_available() else "cpu x1")
    assert report.val_metrics["val_auc"] > 0.9 and 0 < report.val_metrics["val_mrr"] <= 1
    # the adapter: 2 layers x (query, value) x (A: 4x32 + B: 32x4); the head: 32 x 32
    assert report.trainable_params == 2 * 2 * (4 * 32 + 32 * 4) + 32 * 32 < report.total_params
    manifest = read_manifest(report.encoder_dir)
    assert manifest["method"] == "lora" and (report.encoder_dir / "adapter").is_dir()
    assert (report.encoder_dir / "adapter" / "head.safetensors").is_file()
    # Downstream: the embed job takes the encoder directory.
    r = run_embed(catalogue(), report.encoder_dir, tmp_path / "v.parquet")
    base_id = TextEncoder.load(tiny_model_dir).encoder_id
    assert r.embedded == 12 and r.encoder_id != base_id


@pytest.mark.slow
def test_finetune_job_falls_back_to_the_frozen_encoder(
    tmp_path: Path, tiny_model_dir: Path, ray_local
) -> None:
    """A run whose epochs never beat the frozen weights on validation ships the frozen encoder
    and says so (a learning rate too small to change any ranking)."""
    from pipelines.finetune import run_finetune

    cfg = FinetuneConfig(max_steps=4, epochs=2, batch_size=8, lr=1e-12, lora_r=4,
                         val_fraction=0.2, head=False, patience=None)  # fmt: skip
    lines: list[str] = []
    report = run_finetune(topic_dataset(), tmp_path / "enc", cfg, base_model=tiny_model_dir,
                          log=lines.append)  # fmt: skip
    assert report.fell_back and report.best_epoch == 0
    assert len(report.val_scores) == 3 and report.val_scores[1:] == [report.val_scores[0]] * 2
    assert read_manifest(report.encoder_dir)["method"] == "none"
    assert not (report.encoder_dir / "adapter").exists()
    frozen = TextEncoder.load(tiny_model_dir)
    assert TextEncoder.load(report.encoder_dir).encoder_id == frozen.encoder_id
    assert any("step 4/4" in line for line in lines)  # progress reached the driver


def test_finetune_none_writes_a_reference_dir_without_ray(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from pipelines.finetune import run_finetune

    report = run_finetune(
        topic_dataset(n_users=6),
        tmp_path / "enc",
        FinetuneConfig(method="none"),
        base_model=tiny_model_dir,
    )
    assert read_manifest(report.encoder_dir)["method"] == "none" and report.losses == []
    assert (
        TextEncoder.load(report.encoder_dir).encoder_id
        == TextEncoder.load(tiny_model_dir).encoder_id
    )


def test_jobs_name_a_bad_model_folder(tmp_path: Path) -> None:
    from pipelines.embed import run_embed
    from pipelines.finetune import run_finetune

    with pytest.raises(ConfigError, match="nowhere: no such model folder"):
        run_finetune(
            topic_dataset(n_users=6),
            tmp_path / "enc",
            FinetuneConfig(),
            base_model=tmp_path / "nowhere",
        )
    with pytest.raises(ConfigError, match="nowhere: no such model folder"):
        run_embed(catalogue(), tmp_path / "nowhere", tmp_path / "v.parquet")
