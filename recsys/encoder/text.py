"""Item text: the string the encoder sees for each catalogue item, and its content hash.

A template names item fields in braces, e.g. "{title}. {category}. {description}". The literal
text after a field is that field's separator: it is kept only when the field is non-empty and a
later field is too, so a missing category gives "Title. Description", not "Title. .
Description", and a title alone gives "Title". Whitespace runs are collapsed to one space.

When every templated field of an item is empty, the text falls back to the item's other text
fields joined with ". " (title, category, subcategory, description), and if those are empty too,
to "item <item_id>". Each fallback is counted, so a catalogue with empty texts shows up in reports.
"""

from __future__ import annotations

import hashlib
import string

import polars as pl

from recsys.errors import ConfigError

TEXT_FIELDS: tuple[str, ...] = ("title", "category", "subcategory", "description")
DEFAULT_TEMPLATE = "{title}. {category}. {description}"


def template_fields(template: str) -> tuple[str, ...]:
    """The field names used in `template`, in order; a `ConfigError` for a malformed template."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ConfigError(f"encoder.template {template!r} is malformed ({e})") from e
    fields = []
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in TEXT_FIELDS or spec or conversion:
            raise ConfigError(
                f"encoder.template {template!r}: unknown field {{{name}}}; "
                f"use only {', '.join('{' + f + '}' for f in TEXT_FIELDS)}"
            )
        fields.append(name)
    if not fields:
        raise ConfigError(
            f"encoder.template {template!r} names no field; "
            f"use some of {', '.join('{' + f + '}' for f in TEXT_FIELDS)}"
        )
    return tuple(fields)


def _clean(col: str) -> pl.Expr:
    """A text column with nulls as "" and whitespace runs collapsed."""
    return pl.col(col).cast(pl.String).fill_null("").str.replace_all(r"\s+", " ").str.strip_chars()


def item_texts(items: pl.DataFrame, template: str = DEFAULT_TEMPLATE) -> tuple[list[str], int]:
    """Texts for `items` (canonical items table, or any frame with item_id and text fields).

    Returns (texts in row order, number of items that needed the fallback text).
    Missing text columns count as empty.
    """
    names = template_fields(template)  # validates
    parts = list(string.Formatter().parse(template))  # (literal before, field, spec, conversion)
    frame = items.select(
        pl.col("item_id").cast(pl.String),
        *[_clean(c) if c in items.columns else pl.lit("").alias(c) for c in TEXT_FIELDS],
    )
    exprs: list[pl.Expr] = [pl.lit(parts[0][0])]  # literal before the first field
    fields = [(j, p[1]) for j, p in enumerate(parts) if p[1] is not None]
    for k, (j, name) in enumerate(fields):
        after = parts[j + 1][0] if j + 1 < len(parts) else ""
        later = [pl.col(n) for _, n in fields[k + 1 :]]
        # The literal after a field separates it from the next non-empty field; after the
        # last field it closes the text (e.g. a ")").
        keep_after = pl.concat_str(later) != "" if later else pl.lit(True)
        col = pl.col(name)
        exprs.append(
            pl.when(col == "")
            .then(pl.lit(""))
            .when(keep_after)
            .then(col + pl.lit(after))
            .otherwise(col)
        )
    templated = pl.concat_str(exprs).str.replace_all(r"\s+", " ").str.strip_chars()
    content = pl.concat_str([pl.col(n) for n in names])
    others = pl.concat_str(
        [pl.when(pl.col(c) != "").then(pl.col(c)) for c in TEXT_FIELDS],
        separator=". ",
        ignore_nulls=True,
    )
    fallback = pl.when(others != "").then(others).otherwise(pl.lit("item ") + pl.col("item_id"))
    out = frame.select(
        pl.when(content != "").then(templated).otherwise(fallback).alias("text"),
        (content == "").alias("fallback"),
    )
    return out["text"].to_list(), int(out["fallback"].sum())


def text_hash(text: str) -> str:
    """A stable 32-hex-digit digest of `text` (BLAKE2b-128 of its UTF-8 bytes)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def text_hashes(texts: list[str]) -> list[str]:
    return [text_hash(t) for t in texts]
