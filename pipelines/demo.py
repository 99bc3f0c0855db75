"""`recsys demo`: the embedded default data (the seeded generator) through the nightly pipeline.

The data is generated once into OUT/data (a rerun keeps it, so the run folder OUT/run resumes);
the sizes default to the generator's and can be made smaller (the test suite runs the same path
on a small catalogue).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipelines.nightly import NightlyResult, run_nightly
from recsys.data import write_dataset
from recsys.generate import GeneratorConfig, generate


def run_demo(
    out: str | os.PathLike[str],
    generator: GeneratorConfig | None = None,
    *,
    config_path: str | os.PathLike[str] | None = None,
    ray_address: str | None = None,
    tracking_uri: str | None = None,
    log: Any = print,
) -> NightlyResult:
    """Generate OUT/data (unless it is there) and run the nightly into OUT/run."""
    gen = generator or GeneratorConfig()
    data_dir = Path(out) / "data"
    if not (data_dir / "manifest.json").is_file():
        log(f"Generating the embedded default data into {data_dir} ...")
        data, _ = generate(gen)
        write_dataset(data_dir, data, source={"generator": "default", "seed": gen.seed})
    return run_nightly(
        data_dir,
        Path(out) / "run",
        config_path=config_path,
        ray_address=ray_address,
        tracking_uri=tracking_uri,
        log=log,
    )
