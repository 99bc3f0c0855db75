"""The text encoder: item texts, embedding contract, quantisation, encoder ids, bad folders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from recsys.encoder import (
    DEFAULT_TEMPLATE,
    EncoderConfig,
    TextEncoder,
    default_model_path,
    encoder_id_for,
    item_texts,
    load_item_vectors,
    mean_pool,
    text_hash,
    vectors_frame,
)
from recsys.encoder.model import keep_freed_memory, load_base, resolve_precision, tokenize
from recsys.encoder.quantize import Int8FusedLinear, Int8Linear, Int8Part, quantize_int8
from recsys.errors import ConfigError, DataError

TEXTS = [
    "red apple",
    "blue ocean sky sea lake river wave sapphire navy cobalt ice water and the long text",
    "",
    "green",
    "a movie about the sea and a story with a dress, a shirt and a hat",
    "red apple",
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> TextEncoder:
    return TextEncoder.load(tiny_model_dir)


# --- item texts ---------------------------------------------------------------------------------


def test_item_texts_template_skips_empty_fields_and_counts_fallbacks() -> None:
    items = pl.DataFrame(
        {
            "item_id": ["a", "b", "c", "d"],
            "title": ["Red  apple", "Blue sky", "", "  "],
            "category": ["fruit", None, None, ""],
            "subcategory": [None, None, "orchard", None],
            "description": ["Sweet\nand crisp.", "Clear", None, None],
        }
    )
    texts, fallbacks = item_texts(items, DEFAULT_TEMPLATE)
    assert texts == ["Red apple. fruit. Sweet and crisp.", "Blue sky. Clear", "orchard", "item d"]
    assert fallbacks == 2  # c: only a subcategory (not in the template); d: nothing at all


def test_item_texts_missing_columns_count_as_empty() -> None:
    texts, fallbacks = item_texts(pl.DataFrame({"item_id": ["x"], "title": ["Hat"]}))
    assert (texts, fallbacks) == (["Hat"], 0)


def test_template_with_unknown_field_is_a_config_error() -> None:
    items = pl.DataFrame({"item_id": ["a"], "title": ["t"]})
    with pytest.raises(ConfigError, match=r"unknown field \{price\}.*\{title\}"):
        item_texts(items, "{title} {price}")
    with pytest.raises(ConfigError, match="names no field"):
        EncoderConfig(template="just words")


def test_text_hash_is_stable_and_content_sensitive() -> None:
    assert text_hash("red apple") == "ac5b7eb9485bac6a8f2b9a0842249698"
    assert text_hash("red apple") != text_hash("red apple ")


def test_encoder_config_validation_names_key_and_allowed_values() -> None:
    with pytest.raises(ConfigError, match=r"encoder.quantize must be one of auto, none, int8"):
        EncoderConfig(quantize="int4")
    with pytest.raises(ConfigError, match=r"encoder.max_length must be in \[8, 512\]"):
        EncoderConfig(max_length=4)


# --- embedding contract -------------------------------------------------------------------------


def test_embed_unit_float32_rows_in_input_order(tiny: TextEncoder) -> None:
    vecs = tiny.embed(TEXTS, batch_size=2)  # length-sorted batches of 2
    assert vecs.shape == (len(TEXTS), tiny.dim) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    one_by_one = np.stack([tiny.embed([t], batch_size=1)[0] for t in TEXTS])
    np.testing.assert_allclose(vecs, one_by_one, atol=1e-5)  # order and padding do not matter
    np.testing.assert_array_equal(vecs[0], vecs[5])  # same text, same vector
    assert not np.allclose(vecs[0], vecs[1])


def test_embed_empty_input(tiny: TextEncoder) -> None:
    assert tiny.embed([]).shape == (0, tiny.dim)


def test_long_text_is_truncated_to_max_length(tiny_model_dir: Path) -> None:
    enc = TextEncoder.load(tiny_model_dir, max_length=16)
    long = "red apple " * 5000
    assert len(tokenize(enc.tokenizer, [long], 16)[0]) == 16
    a, b = enc.embed([long, "red apple " * 20 + "blue ocean " * 100])
    np.testing.assert_allclose(a, b, atol=1e-6)  # only the first 16 tokens count


def test_mean_pool_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0, 3.0], [3.0, 5.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert mean_pool(hidden, mask).tolist() == [[2.0, 4.0]]


def test_int8_close_to_fp32(tiny_model_dir: Path, tiny: TextEncoder) -> None:
    q = TextEncoder.load(tiny_model_dir, quantize="int8")
    assert q.precision == "int8" and any(isinstance(m, Int8Linear) for m in q.model.modules())
    cos = (q.embed(TEXTS) * tiny.embed(TEXTS)).sum(1)
    assert cos.min() > 0.995
    assert q.encoder_id == tiny.encoder_id  # the same weights: interchangeable vectors


def test_int8_linear_matches_float_linear() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(3, 7, 64)
    x[0, 0] *= 50  # one outlier token must not spoil the others (per-token scales)
    q = quantize_int8(torch.nn.Sequential(lin))
    rel = (q(x) - lin(x)).norm(dim=-1) / lin(x).norm(dim=-1)
    assert rel.max() < 0.03


def test_int8_fuses_query_key_value_and_gelu_with_identical_results(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The fused layers compute what separate Int8Linear layers (and a separate GELU) compute."""
    model, _ = load_base(tiny_model_dir)
    layer = model.encoder.layer[0]
    attn, inter = layer.attention.self, layer.intermediate
    separate = {n: Int8Linear(getattr(attn, n)) for n in ("query", "key", "value")}
    separate_ffn, act = Int8Linear(inter.dense), inter.intermediate_act_fn
    quantize_int8(model)
    assert isinstance(attn.fused_int8, Int8FusedLinear) and isinstance(attn.query, Int8Part)
    assert isinstance(inter.intermediate_act_fn, torch.nn.Identity) and inter.dense.gelu
    torch.manual_seed(0)
    x, x2 = torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    x[0, 0] *= 40  # an outlier token
    with torch.inference_mode():
        for name in ("query", "key", "value"):  # the first call computes all three
            torch.testing.assert_close(getattr(attn, name)(x), separate[name](x), rtol=0, atol=1e-6)
        # Another input, any order, a part asked twice: recomputed, never a stale output.
        torch.testing.assert_close(attn.value(x2), separate["value"](x2), rtol=0, atol=1e-6)
        torch.testing.assert_close(attn.query(x), separate["query"](x), rtol=0, atol=1e-6)
        torch.testing.assert_close(attn.query(x2), separate["query"](x2), rtol=0, atol=1e-6)
        torch.testing.assert_close(inter(x), act(separate_ffn(x)), rtol=0, atol=1e-6)
    with torch.no_grad():  # the same tensor changed in place between two calls: recomputed too
        y = x.clone()
        attn.query(y)
        y.mul_(2)
        torch.testing.assert_close(attn.key(y), separate["key"](y), rtol=0, atol=1e-6)
    # The int8 layers also run with gradients enabled (none flows through them).
    out = model(input_ids=torch.tensor([[2, 10, 11, 3]])).last_hidden_state
    assert out.shape == (1, 4, 32) and bool(out.isfinite().all())
    # The fused weights are stored once (safetensors refuses shared tensors).
    from safetensors.torch import save_file

    state = model.state_dict()
    assert not any(k.endswith(("query.weight_t", "key.weight_t")) for k in state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "q.safetensors"))


def test_cpu_encoder_uses_eager_attention_with_the_same_vectors(tiny_model_dir: Path) -> None:
    from recsys.encoder.model import embed_tokens, pad_batch

    enc = TextEncoder.load(tiny_model_dir)
    assert enc.model.config._attn_implementation == "eager"
    sdpa, tokenizer = load_base(tiny_model_dir)  # training's form
    ids, mask = pad_batch(tokenize(tokenizer, TEXTS, 64), tokenizer.pad_token_id)
    with torch.inference_mode():
        ref = embed_tokens(sdpa, ids, mask).numpy()
    np.testing.assert_allclose(enc.embed(TEXTS), ref, atol=1e-5)


def test_keep_freed_memory_is_applied_once_on_glibc() -> None:
    import os
    import platform

    applied = keep_freed_memory()
    assert keep_freed_memory() is applied  # cached: one mallopt per process
    user_set = any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert applied == (glibc and not user_set)


def test_embed_runs_each_distinct_token_sequence_once(tiny_model_dir: Path) -> None:
    enc = TextEncoder.load(tiny_model_dir, max_length=8)
    rows: list[int] = []
    enc.model.register_forward_pre_hook(
        lambda _m, _a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    long_a = "red apple sky sea lake river wave navy"  # 8 words: cut at 6 tokens + CLS/SEP
    texts = ["red apple", "blue sky", "red apple", long_a, long_a + " cobalt ice", "blue sky"]
    out = enc.embed(texts, batch_size=2)
    assert sum(rows) == 3  # "red apple", "blue sky", and the two long ones truncated alike
    np.testing.assert_array_equal(out[0], out[2])
    np.testing.assert_array_equal(out[3], out[4])
    np.testing.assert_array_equal(out[1], out[5])
    alone = np.concatenate([enc.embed([t]) for t in texts])
    np.testing.assert_allclose(out, alone, atol=1e-6)


def test_precision_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    import recsys.encoder.model as model

    cpu = torch.device("cpu")
    monkeypatch.setattr(model, "cpu_has_fast_int8", lambda: True)
    assert resolve_precision("auto", cpu) == "int8"
    monkeypatch.setattr(model, "cpu_has_fast_int8", lambda: False)
    assert resolve_precision("auto", cpu) == "fp32"  # int8 without VNNI is a slow loop
    with pytest.warns(RuntimeWarning, match="VNNI"):
        assert resolve_precision("int8", cpu) == "int8"  # asked for: honoured, with the cost
    assert resolve_precision("none", cpu) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    with pytest.raises(ConfigError, match="fp16' needs a CUDA device"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ConfigError, match="int8' is a CPU form"):
        resolve_precision("int8", torch.device("cuda"))


def test_fast_int8_is_read_from_the_cpu_flags(tmp_path: Path) -> None:
    from recsys.encoder.model import cpu_has_fast_int8

    flags = "fpu sse2 avx2 fma"
    for extra, fast in (
        ("", False),
        (" avx512_vnni", True),
        (" avx_vnni", True),
        (" amx_int8", True),
    ):
        info = tmp_path / f"cpuinfo{extra.strip() or '_plain'}"
        info.write_text(f"processor\t: 0\nmodel name\t: X\nflags\t\t: {flags}{extra}\n\n")
        assert cpu_has_fast_int8(str(info)) is fast
    assert cpu_has_fast_int8(str(tmp_path / "absent")) is False  # no /proc (macOS): fp32


def test_encoder_id_depends_on_weights_max_length_and_template(
    tiny_model_dir: Path, tiny: TextEncoder
) -> None:
    assert encoder_id_for(tiny_model_dir, 64) == tiny.encoder_id  # no model load needed
    assert encoder_id_for(tiny_model_dir, 32) != tiny.encoder_id
    assert encoder_id_for(tiny_model_dir, 64, "{title}") != tiny.encoder_id
    assert TextEncoder.load(tiny_model_dir).encoder_id == tiny.encoder_id


# --- bad model folders --------------------------------------------------------------------------


def test_missing_model_folder_is_one_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError, match=r"no-such-model: no such model folder; expected a Hug"):
        TextEncoder.load(missing)


def test_folder_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match=r"not a model folder \(missing config.json, model"):
        TextEncoder.load(tmp_path)
    with pytest.raises(ConfigError, match="is a file, not a model folder"):
        TextEncoder.load(tmp_path / "notes.txt")


def test_broken_model_files(tmp_path: Path, tiny_model_dir: Path) -> None:
    for f in tiny_model_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(ConfigError, match=r"cannot load as a model"):
        TextEncoder.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(ConfigError, match=str(tmp_path)):
        TextEncoder.load(tmp_path)


# --- item vectors file --------------------------------------------------------------------------


def test_load_item_vectors_round_trip(tmp_path: Path) -> None:
    vecs = np.eye(3, 4, dtype=np.float32)
    vectors_frame(["a", "b", "c"], vecs, ["h1", "h2", "h3"], "E").write_parquet(tmp_path / "v.pq")
    ids, loaded = load_item_vectors(tmp_path / "v.pq")
    assert ids == ["a", "b", "c"] and loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, vecs)
    with pytest.raises(DataError, match="no item vectors file; run `recsys embed`"):
        load_item_vectors(tmp_path / "missing.parquet")
    pl.DataFrame({"item_id": ["a"]}).write_parquet(tmp_path / "bad.pq")
    with pytest.raises(
        DataError, match=r"lacks column\(s\) \['vector', 'text_hash', 'encoder_id'\]"
    ):
        load_item_vectors(tmp_path / "bad.pq")


# --- the packaged model -------------------------------------------------------------------------


@pytest.mark.slow
def test_packaged_minilm_int8_matches_fp32() -> None:
    assert (default_model_path() / "config.json").is_file()
    texts = [
        "Slim-fit jersey dress with short sleeves. Dress. Soft cotton jersey.",
        "Galaxy telescope and comet: what comes next",
        "Recipe for sourdough bread, baking in a hot oven",
        "",
    ]
    fp32 = TextEncoder.load()
    int8 = TextEncoder.load(quantize="int8")
    assert fp32.dim == 384
    cos = (fp32.embed(texts) * int8.embed(texts)).sum(1)
    assert cos.mean() >= 0.99 and cos.min() >= 0.98
    sims = fp32.embed(["a recipe for pasta", "cooking spaghetti at home", "stock market crash"])
    assert sims[0] @ sims[1] > sims[0] @ sims[2]  # the model means something
