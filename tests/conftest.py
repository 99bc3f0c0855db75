"""Shared fixtures.

`tiny_model_dir`: a Hugging Face folder (config.json, model.safetensors, tokenizer files) for a
2-layer, 32-wide BERT over a ~1,000-token WordPiece vocabulary written here. Loading it takes
milliseconds, so encoder and fine-tuning tests run on it; a few slow tests use the packaged
MiniLM.

`ray_local`: one local Ray (2 CPUs, small object store) shared by every Ray test of the
session, so Ray starts once.

`nightly`: THE nightly of the session: `recsys demo`'s code path (generated data, then the
nightly pipeline with the packaged MiniLM, LoRA, Ray jobs and MLflow tracking) on a small
catalogue, run once; every test that only reads a nightly's outputs uses it (the nightly tests,
the API's bundle, the CLI's evaluate/compare/demo). A test that needs another config runs its
own and says why. Every test that uses it is marked `slow` here, so `make test-fast` builds no
nightly. The session's stage runs are counted and printed at the end (`nightly stages run`).

`server`, `empty_server`, `bundle_dir`, `serving_model`, ...: the API over that bundle, real
uvicorn servers on 127.0.0.1 (tests/servers.py).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# ------------------------------------------------------------------ the session's nightly

# Generated data on which the known answers hold (LightGBM over text and behaviour beats every
# single signal) and every stage has work (fine-tuning, both freshness modes, lists): the sizes
# the nightly tests have always used.
NIGHTLY_SIZES = {"items": 800, "users": 500, "shown": 16_000, "seed": 7}
NIGHTLY_TOML = """\
[finetune]
method = "lora"
max_steps = 8
batch_size = 8
# the projection head learns the topics here (validation AUC 0.640 frozen, 0.664 tuned, in
# process), so the tuned encoder ships and the bundle carries both vector sets (the API's
# two-encoder path)
head_epochs = 6
head_lr = 3e-3
head_batch_size = 16

[ranker]
n_estimators = 300
num_threads = 2

[pipeline]
ship = "lgbm_full"  # both halves on the API's hot path, whatever the gate's noise says
"""
# Stage runs of the session, in process and in subprocesses ("[stage] running ..." lines).
STAGE_RUNS: Counter[str] = Counter()
STAGE_LINE = re.compile(r"^\[(\w+)\] running", re.M)


def count_stages(line: str) -> None:
    """A nightly's `log`: counts the stages that ran (the session summary prints them)."""
    for match in STAGE_LINE.finditer(line):
        STAGE_RUNS[match.group(1)] += 1


@dataclass(frozen=True)
class Nightly:
    """The session nightly: its result and how it was made (to run it again, or resume it)."""

    result: Any  # pipelines.nightly.NightlyResult
    out: Path  # the demo folder: data/ and run/
    config_file: Path
    tracking_uri: str

    @property
    def data_dir(self) -> Path:
        return self.out / "data"

    @property
    def run_dir(self) -> Path:
        return self.out / "run"

    def demo_args(self, out: Path | None = None, tracking_uri: str | None = None) -> list[str]:
        """`recsys demo` arguments that make this run (into `out`, by default its own)."""
        sizes = [f"--{k}={v}" for k, v in NIGHTLY_SIZES.items()]
        return ["demo", "--out", str(out or self.out), *sizes, "--config", str(self.config_file),
                "--tracking-uri", tracking_uri or self.tracking_uri]  # fmt: skip


@pytest.fixture(scope="session")
def nightly(tmp_path_factory: pytest.TempPathFactory) -> Nightly:
    from pipelines.demo import run_demo
    from recsys.generate import GeneratorConfig

    root = tmp_path_factory.mktemp("nightly")
    config_file = root / "nightly.toml"
    config_file.write_text(NIGHTLY_TOML)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    sizes = NIGHTLY_SIZES
    gen = GeneratorConfig(n_items=sizes["items"], n_users=sizes["users"],
                          n_shown=sizes["shown"], seed=sizes["seed"])  # fmt: skip
    result = run_demo(root / "demo", gen, config_path=config_file, tracking_uri=uri,
                      log=count_stages)  # fmt: skip
    return Nightly(result, root / "demo", config_file, uri)


def copy_run(nightly: Nightly, dest: Path) -> Path:
    """The session nightly's run folder copied to `dest` (relative links kept): a rerun there
    reuses every stage whose inputs did not change, as a second nightly on one folder would."""
    import shutil

    shutil.copytree(nightly.run_dir, dest, symlinks=True,
                    ignore=shutil.ignore_patterns(".nightly.lock"))  # fmt: skip
    return dest


NIGHTLY_FIXTURES = {"nightly", "bundle_dir", "serving_model", "server", "second_bundle",
                    "corrupt_bundle", "frozen_model"}  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs the session nightly is slow, whatever its own marks say."""
    for item in items:
        if NIGHTLY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if STAGE_RUNS:
        runs = ", ".join(f"{k} {v}" for k, v in STAGE_RUNS.items())
        terminalreporter.write_line(
            f"nightly stages run: {runs}; nightlies from scratch: {STAGE_RUNS['validate']}"
        )


# ------------------------------------------------------------------ the API over its bundle


@pytest.fixture(scope="session")
def bundle_dir(nightly: Nightly) -> Path:
    return Path(nightly.result.bundle_dir)


@pytest.fixture(scope="session")
def serving_model(bundle_dir: Path) -> Any:
    from recsys.bundle import Bundle
    from serving.ranking import ServingModel

    return ServingModel.from_bundle(Bundle.load(bundle_dir), preload_encoder=True)


@pytest.fixture(scope="session")
def second_bundle(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from servers import bundle_copy

    return bundle_copy(bundle_dir, tmp_path_factory.mktemp("second") / "bundle", "second-v2")


@pytest.fixture(scope="session")
def corrupt_bundle(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle whose ranker model file is truncated garbage."""
    from servers import bundle_copy

    dest = bundle_copy(bundle_dir, tmp_path_factory.mktemp("corrupt") / "bundle", "corrupt-v3")
    model = dest / "ranker" / "model.txt"
    model.write_text(model.read_text()[:200] + "\nnot a tree\n")
    return dest


@pytest.fixture(scope="session")
def server(
    serving_model: Any, bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """The loaded bundle served with admin on (session-wide: tests that reload swap back).
    Its MLflow store is an empty sqlite file of its own (never ./mlflow.db)."""
    from servers import TOKEN, live_server

    from serving.app import create_app
    from serving.settings import Settings

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    settings = Settings(bundle=bundle_dir, admin_token=TOKEN, tracking_uri=uri)  # type: ignore[call-arg]
    yield from live_server(create_app(settings, model=serving_model))


@pytest.fixture(scope="module")
def empty_server() -> Iterator[Any]:
    """A server with no bundle configured and admin off (fast: no model)."""
    from servers import live_server

    from serving.app import create_app
    from serving.settings import Settings

    settings = Settings(max_body_bytes=10_000)  # type: ignore[call-arg]
    yield from live_server(create_app(settings))


@pytest.fixture
def client() -> Iterator[Any]:
    import httpx

    with httpx.Client(timeout=60) as c:
        yield c


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Any]:
    """A redis-server of this test's own on 127.0.0.1 (tests/servers.py: RedisServer)."""
    from servers import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()
