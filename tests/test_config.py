"""Config loading, overrides and the errors a user sees."""

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from attnlab import config
from attnlab.errors import ConfigError

BASE = ["train.max_steps=10"]


def err(*overrides) -> str:
    with pytest.raises(ConfigError) as e:
        config.load(None, BASE + list(overrides))
    return str(e.value)


def test_overrides_are_typed():
    cfg = config.load(
        None,
        BASE
        + [
            "model.n_layer=8",
            "optim.lr=3e-4",
            "model.qk_norm=true",
            "data.categories=cs.LG,cs.CL",
            "train.epochs=none",
        ],
    )
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


@pytest.mark.parametrize("preset", ["quickstart", "shakespeare-char", "mainrun", "mainrun-fixed", "mainrun-best"])
def test_presets_load(preset):
    cfg = config.load(f"configs/{preset}.yaml")
    assert cfg.name == preset


def test_mainrun_fixed_is_the_mainrun_protocol_with_fixed_attention(tmp_path):
    from attnlab.training.trainer import train
    from runkit import write_corpus

    mainrun, fixed = config.load("configs/mainrun.yaml"), config.load("configs/mainrun-fixed.yaml")
    assert dataclasses.replace(fixed, name=mainrun.name, attention=mainrun.attention) == mainrun
    assert fixed.attention.pattern == "fixed"
    corpus = write_corpus(tmp_path / "titles.txt", n_docs=200)
    tiny = [f"data.source={corpus}", "data.path=none", "data.format=lines", "data.max_docs=200"]
    tiny += ["data.vocab_size=300", "model.n_layer=1", "model.d_model=32", "train.batch_size=2", "train.max_steps=2"]
    tiny += [f"data.dir={tmp_path / 'data'}", f"out_dir={tmp_path / 'runs'}", "logging.progress=false"]
    summary = train(config.load("configs/mainrun-fixed.yaml", tiny))
    assert summary["steps"] == 2 and summary["attention"][0]["pattern"] == "fixed"


def test_mainrun_best_keeps_the_protocol_rules():
    mainrun, best = config.load("configs/mainrun.yaml"), config.load("configs/mainrun-best.yaml")
    assert best.data == mainrun.data  # the same titles, tokenizer, validation fraction and seed
    assert (best.train.epochs, best.train.seed, best.model.context) == (7, 1337, 128)
    assert best.attention.document_mask and best.model.position_reset == "document"


@given(st.integers(min_value=1, max_value=256))
def test_in_range_ints_round_trip(n):
    assert config.load(None, BASE + [f"model.n_layer={n}"]).model.n_layer == n


def test_yaml_1_1_words_stay_strings(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("logging:\n  wandb: off\n  progress: false\ntrain:\n  max_steps: 3\n")
    assert config.load(p).logging.wandb == "off" and config.load(p).logging.progress is False
    assert config.load(None, BASE + ["logging.wandb=off"]).logging.wandb == "off"


# ------------------------------------------------------- hostile YAML files


def load_err(tmp_path, text: str | bytes, *overrides) -> str:
    p = tmp_path / "cfg.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    with pytest.raises(ConfigError) as e:
        config.load(p, BASE + list(overrides))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_duplicate_keys_are_refused_with_both_lines(tmp_path):
    text = "model:\n  n_layer: 2\ntrain:\n  max_steps: 5\nmodel:\n  n_layer: 8\n"
    msg = load_err(tmp_path, text)
    assert "'model'" in msg and "lines 1 and 5" in msg and "keep one" in msg
    msg = load_err(tmp_path, "model:\n  n_layer: 2\n  n_head: 2\n  n_layer: 4\n")
    assert "'model.n_layer'" in msg and "lines 2 and 4" in msg


def test_sweep_files_refuse_duplicate_keys_too(tmp_path):
    import yaml

    with pytest.raises(yaml.YAMLError, match=r"'a' appears twice \(lines 1 and 2\)"):
        yaml.load("a: 1\na: 2\n", Loader=config._Loader)


def test_a_binary_config_file_is_one_line(tmp_path):
    msg = load_err(tmp_path, b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x00garbage")
    assert "not a UTF-8 text file" in msg


def test_a_nul_character_in_a_name_is_refused(tmp_path):
    msg = load_err(tmp_path, 'name: "run\\0x"\n')
    assert "name contains a NUL character" in msg
    with pytest.raises(ConfigError, match="data.dir contains a NUL character"):
        config.load(None, BASE + ["data.dir=a\0b"])


def bomb(levels: int = 9, width: int = 9) -> str:
    """A value whose YAML aliases expand to width**levels strings."""
    rows = [f"&l0 [{', '.join(['xxxxxxxxxx'] * width)}]"]
    rows += [f"&l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "[" + ", ".join(rows) + "]"


@pytest.mark.parametrize("key", ["name", "data.categories", "model.n_layer"])
def test_an_alias_bomb_gives_a_short_message_and_no_memory_blowup(tmp_path, key):
    import resource
    import time

    section, _, leaf = key.rpartition(".")
    text = f"{section}:\n  {leaf}: {bomb()}\n" if section else f"{leaf}: {bomb()}\n"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    msg = load_err(tmp_path, text)
    assert time.perf_counter() - t0 < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: no expansion in memory
    assert len(msg) < 600 and key in msg and "aliases" in msg


def test_long_values_are_cut_in_messages():
    msg = err("model.position=" + "x" * 100_000)
    assert len(msg) < 600 and "xxx..." in msg
