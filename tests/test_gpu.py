"""The CUDA paths: fp16/bf16 encoders, fine-tuning and the Ray jobs on a GPU.

They run only where torch sees a CUDA GPU (`pytest -m gpu`, e.g. on a lent device machine); CI
and this project's development machines have none, so there they are skipped, and nothing here
counts as checked until it has run on a GPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_embed_job import catalogue
from test_finetune import topic_dataset

from recsys.encoder import (
    FinetuneConfig,
    TextEncoder,
    item_texts,
    load_item_vectors,
    train_encoder,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TEXTS = ["red apple", "blue ocean sky sea lake", "", "a story about the sea and a red rose"]


def test_fp16_and_bf16_encoders_match_cpu_fp32(tiny_model_dir: Path) -> None:
    ref = TextEncoder.load(tiny_model_dir).embed(TEXTS)
    for quantize, precision in (("auto", "fp16"), ("fp16", "fp16"), ("bf16", "bf16")):
        enc = TextEncoder.load(tiny_model_dir, quantize=quantize, device="cuda")
        assert (enc.precision, enc.device.type) == (precision, "cuda")
        out = enc.embed(TEXTS)
        assert out.dtype == np.float32 and out.shape == ref.shape
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-3)
        assert (out * ref).sum(1).min() > 0.99, quantize
        assert enc.encoder_id == TextEncoder.load(tiny_model_dir).encoder_id


def test_finetuning_on_cuda_learns_the_toy_topics(tiny_model_dir: Path) -> None:
    cfg = FinetuneConfig(
        method="full", max_steps=80, epochs=10, batch_size=8, lr=1e-3, val_fraction=0.2,
        history_grad=True,
    )  # fmt: skip
    tuned = train_encoder(cfg, topic_dataset(), base_model=tiny_model_dir, device="cuda")
    assert np.mean(tuned.losses[-10:]) < np.mean(tuned.losses[:10]) - 0.2
    assert tuned.val_metrics["val_auc"] >= 0.97


@pytest.mark.slow
def test_ray_jobs_use_the_gpu(tmp_path: Path, tiny_model_dir: Path, ray_local) -> None:
    from pipelines.embed import run_embed
    from pipelines.finetune import run_finetune

    cfg = FinetuneConfig(max_steps=24, epochs=2, batch_size=8, lr=2e-2, lora_r=4)
    report = run_finetune(topic_dataset(), tmp_path / "enc", cfg, base_model=tiny_model_dir)
    assert report.device == "cuda x1" and len(report.step_losses) == 24

    r = run_embed(catalogue(), tiny_model_dir, tmp_path / "v.parquet")
    assert r.device.startswith("cuda") and "fp16" in r.device and r.embedded == 12
    ids, vectors = load_item_vectors(tmp_path / "v.parquet")
    assert ids == catalogue()["item_id"].to_list()
    ref = TextEncoder.load(tiny_model_dir).embed(item_texts(catalogue())[0])
    assert (vectors * ref).sum(1).min() > 0.99
