"""Config loading, overrides and the errors a user sees."""

import pytest
from hypothesis import given, strategies as st

from attnlab import config
from attnlab.errors import ConfigError

BASE = ["train.max_steps=10"]


def err(*overrides) -> str:
    with pytest.raises(ConfigError) as e:
        config.load(None, BASE + list(overrides))
    return str(e.value)


def test_overrides_are_typed():
    cfg = config.load(None, BASE + ["model.n_layer=8", "optim.lr=3e-4", "model.qk_norm=true", "data.categories=cs.LG,cs.CL",
                                    "train.epochs=none"])
    assert cfg.model.n_layer == 8 and isinstance(cfg.model.n_layer, int)
    assert cfg.optim.lr == 3e-4 and cfg.model.qk_norm is True
    assert cfg.data.categories == ["cs.LG", "cs.CL"] and cfg.train.epochs is None


def test_unknown_key_suggests_the_closest():
    assert "did you mean model.n_layer?" in err("model.n_layr=3")
    assert "did you mean optim.lr?" in err("optim.rl=1")
    assert "unknown config key 'nonsense.key'" in err("nonsense.key=1")


def test_bad_values_name_the_allowed_range():
    assert "use one of learned, sinusoidal, rope, none, alibi" in err("model.position=xpos")
    assert "out of range: use a value in [0.0, 10.0]" in err("optim.lr=-1")
    assert "expects an integer" in err("model.n_layer=2.5")
    assert "expects true or false" in err("model.qk_norm=maybe")
    assert "not key=value" in err("model.n_layer")


def test_cross_field_rules():
    assert "not divisible by model.n_head" in err("model.d_model=100", "model.n_head=3")
    with pytest.raises(ConfigError, match="no stopping rule"):
        config.load(None, [])


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)
    bad.write_text("model:\n  n_heads: 4\ntrain:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match="did you mean model.n_head"):
        config.load(bad)


def test_saved_config_reloads_identically(tmp_path):
    cfg = config.load("configs/mainrun.yaml", ["model.n_layer=3"])
    config.save(cfg, tmp_path / "c.yaml")
    again = config.load(tmp_path / "c.yaml")
    assert again == cfg and config.diff(cfg, again) == []


@pytest.mark.parametrize("preset", ["quickstart", "shakespeare-char", "mainrun"])
def test_presets_load(preset):
    cfg = config.load(f"configs/{preset}.yaml")
    assert cfg.name == preset


@given(st.integers(min_value=1, max_value=256))
def test_in_range_ints_round_trip(n):
    assert config.load(None, BASE + [f"model.n_layer={n}"]).model.n_layer == n


def test_yaml_1_1_words_stay_strings(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("logging:\n  wandb: off\n  progress: false\ntrain:\n  max_steps: 3\n")
    assert config.load(p).logging.wandb == "off" and config.load(p).logging.progress is False
    assert config.load(None, BASE + ["logging.wandb=off"]).logging.wandb == "off"
