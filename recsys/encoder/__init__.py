"""The text encoder: item texts → unit vectors, fine-tuned on click labels (LoRA by default).

    enc = TextEncoder.load()                      # packaged all-MiniLM-L6-v2, fp32 CPU
    enc = TextEncoder.load(dir, quantize="int8")  # a fine-tuned encoder directory, int8
    texts, n_fallback = item_texts(items, template)
    vectors = enc.embed(texts)                    # (n, 384) float32, unit rows

    result = train_encoder(FinetuneConfig(), dataset)   # plain loop, no Ray
    save_encoder(result, "out/encoder")                 # encoder.json + adapter safetensors

Modules: `text` (item text template, hashes), `model` (transformer, pooling, head, precision),
`quantize` (int8 kernels), `textencoder` (`TextEncoder`), `store` (encoder directories),
`vectors` (item vectors table, incremental embedding). Fine-tuning: `config`
(`FinetuneConfig`), `examples`, `tokens`, `loss`, `head` (the head phase), `loop` (`fit`),
`callbacks` (step and epoch payloads, early stopping, progress, tracking), `validation`,
`trainable` (the model trained), `trainer` (`train_encoder`, in process). Pure
torch/transformers: no Ray, MLflow or web imports.
"""

from recsys.encoder.config import FinetuneConfig
from recsys.encoder.examples import Examples, build_examples, split_by_time
from recsys.encoder.loop import fit
from recsys.encoder.model import EncoderConfig, default_model_path, embed_tokens, mean_pool
from recsys.encoder.store import encoder_id_for, is_encoder_dir, read_manifest, save_encoder
from recsys.encoder.text import DEFAULT_TEMPLATE, TEXT_FIELDS, item_texts, text_hash
from recsys.encoder.textencoder import TextEncoder
from recsys.encoder.trainer import TrainResult, train_encoder
from recsys.encoder.validation import evaluate
from recsys.encoder.vectors import (
    embed_catalogue,
    load_item_vectors,
    plan_embedding,
    read_item_vectors,
    vectors_frame,
)

__all__ = [
    "DEFAULT_TEMPLATE",
    "TEXT_FIELDS",
    "EncoderConfig",
    "Examples",
    "FinetuneConfig",
    "TextEncoder",
    "TrainResult",
    "build_examples",
    "default_model_path",
    "embed_catalogue",
    "embed_tokens",
    "encoder_id_for",
    "evaluate",
    "fit",
    "is_encoder_dir",
    "item_texts",
    "load_item_vectors",
    "mean_pool",
    "plan_embedding",
    "read_item_vectors",
    "read_manifest",
    "save_encoder",
    "split_by_time",
    "text_hash",
    "train_encoder",
    "vectors_frame",
]
