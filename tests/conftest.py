"""Shared fixtures: a tiny random BERT (built offline, once per session) and one local Ray.

`tiny_model_dir`: a Hugging Face folder (config.json, model.safetensors, tokenizer files) for a
2-layer, 32-wide BERT over a ~1,000-token WordPiece vocabulary written here. Loading it takes
milliseconds, so encoder and fine-tuning tests run on it; a few slow tests use the packaged
MiniLM.

`ray_local`: one local Ray (2 CPUs, small object store) shared by every Ray test of the
session, so Ray starts once.
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from pathlib import Path

import pytest

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Words the tests write item texts with (topics, fields, fillers).
WORDS = [
    "red",
    "apple",
    "cherry",
    "strawberry",
    "tomato",
    "ruby",
    "rose",
    "crimson",
    "blood",
    "fire",
    "brick",
    "wine",
    "blue",
    "ocean",
    "sky",
    "sea",
    "lake",
    "river",
    "wave",
    "sapphire",
    "navy",
    "cobalt",
    "ice",
    "water",
    "green",
    "forest",
    "grass",
    "leaf",
    "tree",
    "moss",
    "jungle",
    "lime",
    "mint",
    "olive",
    "fern",
    "garden",
    "fruit",
    "colour",
    "color",
    "nature",
    "thing",
    "item",
    "movie",
    "news",
    "story",
    "about",
    "and",
    "the",
    "a",
    "of",
    "with",
    "long",
    "text",
    "word",
    "dress",
    "shirt",
    "shoe",
    "bag",
    "hat",
    "coat",
    "sports",
    "music",
    "film",
    "book",
]


def _vocab() -> list[str]:
    letters = list(string.ascii_lowercase + string.digits)
    punct = list(".,:;!?'\"()-/&")
    tokens = list(dict.fromkeys(SPECIAL + punct + letters + [f"##{c}" for c in letters] + WORDS))
    filler = [f"tok{i}" for i in range(1000 - len(tokens))]
    return tokens + filler


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny random BERT: vocab ~1000, hidden 32, 2 layers, 2 heads."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    d = tmp_path_factory.mktemp("tiny-bert")
    vocab = _vocab()
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer.from_pretrained(str(d), do_lower_case=True)
    tokenizer.save_pretrained(str(d))  # adds tokenizer.json and tokenizer_config.json
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    BertModel(config).save_pretrained(str(d), safe_serialization=True)
    return d


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One local Ray for the session (2 CPUs, no dashboard)."""
    import ray

    from pipelines.ray_utils import init_ray

    started = init_ray(None, num_cpus=2)
    yield
    if started:
        ray.shutdown()
