"""Experiment configs: typed, frozen, validated; errors name the key and what is allowed."""

from pathlib import Path

import pytest

from experiments.config import CONFIG_DIR, NightlyConfig, config_from_dict, load_config
from recsys.errors import ConfigError


def test_named_configs_load():
    names = {p.stem for p in CONFIG_DIR.glob("*.toml")}
    assert {"baseline", "lora", "full-finetune", "no-semantic"} <= names
    for name in names:
        cfg = load_config(name)
        assert cfg.name == name
        assert cfg.to_params()["name"] == name
    assert load_config("lora").finetune.method == "lora"
    assert load_config("full-finetune").finetune.method == "full"
    assert load_config("no-semantic").pipeline.use_semantic is False


def test_defaults_and_params_are_flat():
    cfg = load_config(None)
    assert isinstance(cfg, NightlyConfig)
    params = cfg.to_params()
    assert "finetune.method" in params and "ranker.num_leaves" in params
    assert all("." in k or k == "name" for k in params)


def test_unknown_key_names_the_key_and_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"unknown config key ranker\.leaves.*num_leaves"):
        config_from_dict({"ranker": {"leaves": 3}})
    with pytest.raises(ConfigError, match=r"unknown config section or key 'rankr'"):
        config_from_dict({"rankr": {}})


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match=r"pipeline\.top_n must be an integer"):
        config_from_dict({"pipeline": {"top_n": "ten"}})
    with pytest.raises(ConfigError, match=r"pipeline\.test_fraction"):
        config_from_dict({"pipeline": {"test_fraction": 1.5}})
    with pytest.raises(ConfigError, match="method"):
        config_from_dict({"finetune": {"method": "qlora"}})
    with pytest.raises(ConfigError, match=r"tracking\.primary_metric"):
        config_from_dict({"tracking": {"primary_metric": "accuracy"}})


def test_lists_become_tuples_and_file_errors(tmp_path: Path):
    cfg = config_from_dict({"finetune": {"target_modules": ["query", "key", "value"]}})
    assert cfg.finetune.target_modules == ("query", "key", "value")
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[ranker\nx=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_list_rules_and_retrieval_settings():
    cfg = config_from_dict(
        {"rules": {"exclude_categories": ["sport"], "max_per_category": 2, "diversity": 0.3},
         "pipeline": {"k_fresh": 0, "live_window_days": 0.0}}
    )  # fmt: skip
    assert cfg.rules.exclude_categories == ("sport",) and cfg.rules.max_per_category == 2
    assert cfg.pipeline.quotas["fresh"] == 0 and cfg.pipeline.live_window_days == 0.0
    assert cfg.pipeline.popular_half_life_days is None  # fitted to the data by default
    with pytest.raises(ConfigError, match="diversity"):
        config_from_dict({"rules": {"diversity": 2.0}})
    with pytest.raises(ConfigError, match="max_per_category"):
        config_from_dict({"rules": {"max_per_category": -1}})
    with pytest.raises(ConfigError, match=r"pipeline\.k_category"):
        config_from_dict({"pipeline": {"k_category": -3}})
    with pytest.raises(ConfigError, match=r"pipeline\.live_window_days"):
        config_from_dict({"pipeline": {"live_window_days": -1.0}})
    assert cfg.pipeline.list_prior_weight is None  # chosen at the validation cut-off
    fixed = config_from_dict({"pipeline": {"list_prior_weight": 0.5}})
    assert fixed.pipeline.list_prior_weight == 0.5
    with pytest.raises(ConfigError, match=r"pipeline\.list_prior_weight must be in \[0, 1\]"):
        config_from_dict({"pipeline": {"list_prior_weight": 1.5}})


def test_batch_refresh_auto_tries_each_candidate_period():
    assert NightlyConfig().pipeline.refreshes == ("1d", "2d")  # the default: "auto"
    assert config_from_dict({"pipeline": {"refresh": "6h"}}).pipeline.refreshes == ("6h",)
    auto = config_from_dict({"pipeline": {"refresh_candidates": ["12h", "1d", "3d"]}})
    assert auto.pipeline.refreshes == ("12h", "1d", "3d")
    with pytest.raises(
        ConfigError, match=r"pipeline\.refresh must be 'auto' .*'online' or a polars"
    ):
        config_from_dict({"pipeline": {"refresh": "daily"}})
    with pytest.raises(ConfigError, match=r"refresh_candidates are batch periods"):
        config_from_dict({"pipeline": {"refresh_candidates": ["1d", "online"]}})
    with pytest.raises(ConfigError, match=r"refresh_candidates must name at least one"):
        config_from_dict({"pipeline": {"refresh_candidates": []}})


def test_one_base_model_for_the_fine_tune_and_the_frozen_vectors(tmp_path: Path):
    """[finetune] base_model is also the frozen encoder's model (the semantic_frozen baseline
    and the head's inputs); a different [encoder] model_path beside it is an error."""
    cfg = config_from_dict({"finetune": {"base_model": "/models/multilingual"}})
    assert cfg.finetune.base_model == "/models/multilingual"
    assert cfg.encoder.model_path == "/models/multilingual"
    same = {"base_model": "/models/m"}
    assert config_from_dict({"finetune": same, "encoder": {"model_path": "/models/m"}})
    with pytest.raises(ConfigError, match=r"base_model .* and encoder\.model_path .* differ"):
        config_from_dict({"finetune": same, "encoder": {"model_path": "/models/other"}})
    assert load_config(None).finetune.base_model is None  # the packaged MiniLM


def test_the_finetune_stage_starts_from_the_configured_base_model(
    tmp_path: Path, tiny_model_dir: Path
):
    """The nightly's finetune stage hands [finetune] base_model on: the encoder it writes
    names that folder as its base (method none: the base itself, no training)."""
    from pipelines import prepare, train
    from pipelines.stages import StageEnv, StageRunner
    from recsys.data import dataset_fingerprint, write_dataset
    from recsys.encoder import FinetuneConfig
    from recsys.encoder.store import base_model_dir, read_manifest
    from recsys.generate import GeneratorConfig, generate

    data, _ = generate(GeneratorConfig(n_items=60, n_users=30, n_shown=600, seed=1))
    write_dataset(tmp_path / "data", data)
    source = prepare.DataSource(tmp_path / "data", dataset_fingerprint(tmp_path / "data"))
    runner = StageRunner(tmp_path / "run", StageEnv(log=lambda _: None))
    valid = runner.run("validate", prepare.validate, source=source, negatives=0, seed=0,
                       popular_share=0.0)  # fmt: skip
    times = runner.run("split", prepare.split, validated=valid, split_at=None,
                       test_fraction=0.2, valid_fraction=0.1, encoder_fraction=0.5)  # fmt: skip
    config = FinetuneConfig(method="none", base_model=str(tiny_model_dir))
    tuned = runner.run("finetune", train.finetune, validated=valid, split=times, config=config)
    manifest = read_manifest(tuned.path / "encoder")
    assert base_model_dir(manifest).resolve() == tiny_model_dir.resolve()
