"""Hugging Face export: transformers loads the folder without custom code and computes attnlab's logits;
configurations without an exact counterpart are refused in one line naming the key."""

import dataclasses
import json

import numpy as np
import pytest
import torch

import attnlab
from attnlab import cli, config
from attnlab.config import ModelConfig
from attnlab.errors import ConfigError, UserError
from attnlab.export.hf import ExportError, export_hf, plan
from attnlab.model.gpt import GPT
from runkit import tiny_config, write_corpus

transformers = pytest.importorskip(
    "transformers", reason="the Hugging Face export tests need transformers (pip install -e .[test])"
)

TEXT = "the sparse model predicts the next byte of a window"
LLAMA = {"model.position": "rope", "model.norm": "rmsnorm", "model.mlp": "swiglu"}
HAS_GQA = "n_kv_head" in {f.name for f in dataclasses.fields(ModelConfig)}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    write_corpus(root / "corpus.txt", n_docs=200)
    return root


def trained(root, name, tokenizer="bpe", **overrides):
    """A tiny run trained 2 steps (datasets shared per tokenizer), and its export."""
    cfg = tiny_config(root / "corpus.txt", root / f"data-{tokenizer}", root / "runs", name=name)
    attnlab.train(
        cfg,
        **{
            "train.max_steps": 2,
            "data.tokenizer": tokenizer,
            "data.vocab_size": 300,
            "model.dropout": 0.0,
            **overrides,
        },
    )
    info = export_hf(root / "runs" / name, root / f"hf-{name}")
    return attnlab.load(root / "runs" / name), root / f"hf-{name}", info


def assert_same_logits(run, folder, text=TEXT):
    """transformers' logits equal attnlab's within 1e-4, with its eager and its SDPA attention."""
    ours = run.logits(text)
    for attn in ("eager", "sdpa"):
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn)
        with torch.no_grad():
            theirs = hf(torch.tensor([run.encode(text)])).logits[0]
        assert theirs.shape == ours.shape
        assert torch.allclose(theirs, ours, atol=1e-4, rtol=0), (attn, (theirs - ours).abs().max())
    return hf


def assert_same_tokens(run, folder, text=TEXT):
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tok(text).input_ids
    assert ids == run.encode(text)  # <eos> first: the start of a document, as attnlab reads it
    assert tok.decode(ids, skip_special_tokens=True) == text
    return tok


@pytest.mark.parametrize(
    "name, overrides, activation",
    [
        ("gpt2", {}, "gelu"),
        (
            "gpt2-relu-untied-nobias",
            {"model.mlp": "relu", "model.tie_weights": False, "model.bias": False, "model.mlp_ratio": 2.5},
            "relu",
        ),
    ],
)
def test_gpt2_shaped_run_loads_as_gpt2_with_equal_logits(root, name, overrides, activation):
    run, folder, info = trained(root, name, **overrides)
    assert info["architecture"] == "GPT2LMHeadModel"
    hf = assert_same_logits(run, folder)
    assert type(hf).__name__ == "GPT2LMHeadModel" and hf.config.activation_function == activation
    assert hf.config.n_inner == run.model.blocks[0].mlp.fc.out_features
    assert hf.config.tie_word_embeddings == run.model.tied
    assert_same_tokens(run, folder)


def test_llama_shaped_run_loads_as_llama_with_equal_logits(root):
    run, folder, _ = trained(root, "llama", **LLAMA)
    hf = assert_same_logits(run, folder)
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.attention_bias and hf.config.mlp_bias
    assert hf.config.rms_norm_eps == torch.finfo(torch.float32).eps
    assert_same_tokens(run, folder)


def test_qk_norm_run_loads_as_qwen3_with_equal_logits(root):
    # a large learning rate moves the norms' weights away from 1, so a wrong mapping of them would show
    qk = {"model.qk_norm": True, "model.bias": False, "optim.lr": 0.05, "optim.warmup_steps": 0}
    run, folder, info = trained(root, "qwen3", **LLAMA, **qk)
    q_norm = run.model.blocks[0].attn.q_norm.weight
    assert info["architecture"] == "Qwen3ForCausalLM" and (q_norm - 1).abs().max() > 0.01
    hf = assert_same_logits(run, folder)
    assert type(hf).__name__ == "Qwen3ForCausalLM" and not hf.config.attention_bias
    torch.testing.assert_close(hf.model.layers[0].self_attn.q_norm.weight, q_norm, rtol=0, atol=0)
    assert_same_tokens(run, folder)


@pytest.mark.skipif(not HAS_GQA, reason="model.n_kv_head (grouped-query attention) is not in this version's config")
def test_grouped_query_llama_maps_its_key_value_heads(root):
    run, folder, _ = trained(root, "gqa", **LLAMA, **{"model.n_head": 4, "model.n_kv_head": 2, "model.bias": False})
    hf = assert_same_logits(run, folder)
    assert (hf.config.num_attention_heads, hf.config.num_key_value_heads) == (4, 2)


def test_local_attention_on_every_layer_loads_as_mistral_sliding_window(root):
    window = 4
    run, folder, info = trained(
        root, "mistral", **LLAMA, **{"model.bias": False, "attention.pattern": "local", "attention.window": window}
    )
    assert info["sliding_window"] == window and len(run.encode(TEXT)) > 2 * window  # the window matters here
    hf = assert_same_logits(run, folder)
    assert type(hf).__name__ == "MistralForCausalLM" and hf.config.sliding_window == window
    for other in (window - 1, window + 1):  # an off-by-one window would show: the comparison can tell
        c = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**c, "sliding_window": other}))
        off = transformers.AutoModelForCausalLM.from_pretrained(folder)
        with torch.no_grad():
            assert (off(torch.tensor([run.encode(TEXT)])).logits[0] - run.logits(TEXT)).abs().max() > 1e-3


def test_generation_in_transformers_follows_attnlabs_greedy_sample(root):
    run, folder, _ = trained(root, "greedy", **LLAMA)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    ids = tok("the model", return_tensors="pt").input_ids
    out = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=run.tokenizer.eos_id)
    ours = run.generate("the model", 8, temperature=0, stop_at_eos=False)
    assert tok.decode(out[0], skip_special_tokens=False).removeprefix("<eos>") == ours


@pytest.mark.parametrize("kind", ["bytes", "char"])
def test_byte_and_char_tokenizers_export_as_tokenizers_files(root, kind):
    run, folder, _ = trained(root, f"tok-{kind}", tokenizer=kind)
    text = "dense é\n<eos> ok"
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert tok(text).input_ids == run.encode(text)
    assert tok.decode(run.encode(text)[1:]) == run.tokenizer.decode(run.encode(text)[1:])
    assert_same_logits(run, folder, text)


def test_bpe_tokenizer_keeps_a_literal_eos_as_text(root):
    run, folder, _ = trained(root, "literal", **LLAMA)
    text = "a <eos> in the text"
    assert transformers.AutoTokenizer.from_pretrained(folder)(text).input_ids == run.encode(text)


# ------------------------------------------------------------------ refusals


def model_for(*overrides):
    cfg = config.load(
        None,
        ["train.max_steps=1", "model.n_layer=2", "model.n_head=2", "model.d_model=16", "model.context=16", *overrides],
    )
    return GPT(cfg.model, cfg.attention, 64), cfg


LLAMA_ARGS = [f"{k}={v}" for k, v in LLAMA.items()]


@pytest.mark.parametrize(
    "overrides, named",
    [
        (
            ["attention.pattern=strided", "attention.local_attn_ctx=4"],
            "attention.pattern=strided (layer 0) has no counterpart",
        ),
        (["attention.pattern=fixed", "attention.local_attn_ctx=8", "attention.blocksize=4"], "attention.pattern=fixed"),
        (["attention.pattern=sink_window", "attention.window=4"], "attention.pattern=sink_window"),
        (["attention.pattern=linear"], "attention.pattern=linear"),
        (["model.position=sinusoidal"], "model.position=sinusoidal has no counterpart"),
        (["model.position=image", "model.image_shape=4,4,1"], "model.position=image has no counterpart"),
        (["model.position=none"], "model.position=none"),
        (["model.qk_ratio=0.5"], "model.qk_ratio=0.5"),
        (["model.qk_norm=true"], "model.qk_norm=true with learned positions"),
        ([*LLAMA_ARGS, "model.qk_norm=true"], "model.bias=true with QK-norm"),
        (
            [*LLAMA_ARGS, "model.qk_norm=true", "model.bias=false", "attention.pattern=local", "attention.window=4"],
            "model.qk_norm=true with local attention (window 4)",
        ),
        (["model.norm_position=post"], "model.norm_position=post"),
        (["model.norm=rmsnorm"], "model.norm=rmsnorm with learned positions"),
        (["model.mlp=swiglu"], "model.mlp=swiglu with learned positions"),
        (["attention.pattern=local", "attention.window=4"], "GPT-2 has no sliding window"),
        (["model.position=rope", "model.norm=layernorm", "model.mlp=swiglu"], "model.norm=layernorm with RoPE"),
        (["model.position=rope", "model.norm=rmsnorm", "model.mlp=gelu"], "model.mlp=gelu with RoPE"),
        ([*LLAMA_ARGS, "attention.schedule=local,dense", "attention.window=4"], "layers differ in their attention"),
        ([*LLAMA_ARGS, "attention.pattern=local", "attention.window=4"], "model.bias=true with local attention"),
    ],
)
def test_configurations_without_an_exact_counterpart_are_refused_by_key(overrides, named):
    model, cfg = model_for(*overrides)
    with pytest.raises(ExportError, match="^cannot export to Hugging Face: ") as e:
        plan(model, cfg)
    assert named in str(e.value) and "\n" not in str(e.value)


def test_block_layouts_are_refused(tmp_path):
    np.save(tmp_path / "layout.npy", np.tril(np.ones((4, 4), dtype=bool)))
    model, cfg = model_for(
        "attention.pattern=block_layout", f"attention.layout={tmp_path / 'layout.npy'}", "attention.layout_block=4"
    )
    with pytest.raises(ExportError, match=r"attention.pattern=block_layout \(layer 0\) has no counterpart"):
        plan(model, cfg)


def test_document_masking_is_refused():
    model, cfg = model_for("attention.document_mask=true", "model.eos_id=0")
    with pytest.raises(ExportError) as e:
        plan(model, cfg)
    assert str(e.value) == (
        "cannot export to Hugging Face: attention.document_mask=true (attention within documents); "
        "transformers' GPT-2, Llama, Mistral and Qwen3 attend across <eos>"
    )


def test_score_modifiers_are_refused():
    try:
        model, cfg = model_for("attention.modifiers=softcap(cap=30)")
    except ConfigError:
        pytest.skip("this version has no attention.modifiers")
    with pytest.raises(ExportError, match="attention.modifiers=softcap"):
        plan(model, cfg)


def test_an_unknown_model_field_away_from_its_default_is_refused(monkeypatch):
    model, cfg = model_for()
    fields = [*dataclasses.fields(ModelConfig)]
    extra = dataclasses.make_dataclass("M", [("new_knob", int, dataclasses.field(default=0))], bases=(ModelConfig,))
    cfg.model = extra(**{f.name: getattr(cfg.model, f.name) for f in fields}, new_knob=3)
    with pytest.raises(ExportError, match=r"model.new_knob=3 has no counterpart; use the default 0"):
        plan(model, cfg)


def test_cli_refuses_a_strided_run_in_one_line_and_writes_nothing(root, capsys):
    cfg = tiny_config(
        root / "corpus.txt",
        root / "data-bytes",
        root / "runs",
        "train.max_steps=1",
        "data.vocab_size=300",
        "attention.pattern=strided",
        "attention.local_attn_ctx=4",
        name="strided",
    )
    attnlab.train(cfg)
    out = root / "hf-strided"
    assert cli.main(["export", str(root / "runs" / "strided"), "--format", "hf", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        (
            "attnlab: error: cannot export to Hugging Face: attention.pattern=strided (layer 0) has no counterpart; "
            "only dense attention, or local attention on every layer (as Mistral's sliding window), maps"
        )
    ]
    assert not out.exists() and not list(root.glob(".hf-strided*"))


def test_out_folder_is_never_overwritten_without_force_and_force_replaces_only_exports(root, capsys):
    run, folder, _ = trained(root, "again")
    with pytest.raises(UserError, match="exists and is not empty"):
        export_hf(run.dir, folder)
    (folder / "mine.txt").write_text("keep")
    export_hf(run.dir, folder, force=True)
    assert not (folder / "mine.txt").exists() and json.loads((folder / "attnlab_export.json").read_text())["run"]
    other = root / "notes"
    other.mkdir()
    (other / "n.txt").write_text("keep")
    with pytest.raises(UserError, match="not an attnlab export folder"):
        export_hf(run.dir, other, force=True)
    assert (other / "n.txt").read_text() == "keep"
    assert cli.main(["export", str(run.dir), "--format", "hf", "--out", str(root / "hf-cli")]) == 0
    assert json.loads(capsys.readouterr().out)["architecture"] == "GPT2LMHeadModel"


def test_image_runs_are_refused(tmp_path):
    from runkit import digits_config

    attnlab.train(digits_config(tmp_path, "model.position=learned"))
    with pytest.raises(ExportError, match=r"models images \(data.source=digits"):
        export_hf(tmp_path / "runs" / "digits", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
