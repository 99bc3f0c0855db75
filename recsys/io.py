"""Atomic file output: write to a temporary name in the same folder, then rename.

A crash mid-write leaves the previous file (or nothing) in place, never a partial file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import polars as pl

from recsys.errors import DataError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, else delete it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def replace_dir(src: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Rename the complete folder `src` to `target`, replacing an existing `target` (moved
    aside first, then deleted), so `target` is never half-written."""
    out = Path(target)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(src, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty folder beside `target` (named `.<name>.*.tmp`); on success it replaces
    `target` (`replace_dir`), on an error it is deleted. `target` is never half-written."""
    out = Path(target)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_parquet(df: pl.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write `df` to `path` atomically (zstd Parquet)."""
    with atomic_path(path) as tmp:
        df.write_parquet(tmp, compression="zstd")
    return Path(path)


def write_parquet_chunks(frames: Iterable[pl.DataFrame], path: str | os.PathLike[str]) -> int:
    """Write the frames one after another as one Parquet file at `path`, atomically (zstd;
    each frame one or more row groups), holding one frame at a time; the frames written. Every
    frame must have the first one's schema (a DataError names the difference)."""
    import pyarrow.parquet as pq

    count, writer, schema = 0, None, None
    with atomic_path(path) as tmp:
        try:
            for df in frames:
                if schema is None:
                    schema = df.schema
                    table = df.to_arrow()
                    writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
                elif df.schema != schema:
                    raise DataError(
                        f"{path}: a chunk's columns {dict(df.schema)} differ from the first "
                        f"chunk's {dict(schema)}"
                    )
                else:
                    table = df.to_arrow()
                assert writer is not None
                writer.write_table(table)
                count += 1
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            raise DataError(f"{path}: nothing to write (no chunk)")
    return count


def write_json(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write `obj` as indented JSON to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    return Path(path)


def write_text(text: str, path: str | os.PathLike[str]) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def file_digest(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def json_digest(obj: Any) -> str:
    """SHA-256 of the canonical JSON form of `obj` (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def fsync_tree(path: str | os.PathLike[str]) -> None:
    """Flush every file under `path`, then every folder (deepest first) and `path` itself, so
    that what a rename or a pointer flip publishes is on disk first."""
    root = Path(path)
    dirs = [root]
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            continue
        if p.is_dir():
            dirs.append(p)
        else:
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        fsync_dir(d)


def fsync_dir(path: Path) -> None:
    """fsync a folder, so an entry created or renamed in it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


CURRENT = "current"


def publish_version(
    build: Callable[[Path], None], versions_dir: str | os.PathLike[str], name: str, keep: int
) -> Path:
    """Publish an immutable version folder `versions_dir/name` and point `versions_dir/current`
    at it.

    build(folder): fills an empty temporary folder with the version's files. The folder is
    fsynced and renamed to `name` (an existing `name` is the same version: it is kept as it is
    and `build` is not called), then the `current` symlink is replaced in one rename, so a
    reader that resolves `current` always finds a complete version. The `keep` newest versions
    (by publication) stay, older ones are deleted; `current`'s target is never deleted.
    Returns the version folder.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(versions_dir)
    root.mkdir(parents=True, exist_ok=True)
    target = root / name
    if not target.is_dir():
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
        try:
            build(tmp)
            fsync_tree(tmp)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    os.utime(target)  # publication order, for pruning
    link = root / f".{CURRENT}.{os.getpid()}.tmp"
    link.unlink(missing_ok=True)
    os.symlink(name, link)
    os.replace(link, root / CURRENT)
    fsync_dir(root)
    versions = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and p.name[0] != "."),
        key=lambda p: p.stat().st_mtime_ns,
        reverse=True,
    )
    for old in versions[keep:]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return target
