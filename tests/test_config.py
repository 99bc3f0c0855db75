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
