"""Configs: every bad value names its field and the valid range; presets and overrides load."""

from pathlib import Path

import pytest

from experiments.config import load_config
from mot.blocks import DenseConfig
from mot.config import ModelConfig
from tests.conftest import tiny_config

CONFIGS = Path(__file__).parent.parent / "experiments" / "configs"


@pytest.mark.parametrize("overrides, message", [
    (dict(n_heads=5), r"n_heads \(5\) must divide dim \(32\)"),
    (dict(dim=-8), r"dim \(-8\) must be a positive integer"),
    (dict(n_layers=0), r"n_layers \(0\) must be a positive integer"),
    (dict(n_kv_heads=3), r"n_kv_heads \(3\) must divide n_heads \(4\)"),
    (dict(layers="dense,sparse"), r"unknown block kind 'sparse'; valid: \['dense'"),
    (dict(layers="dense,dense,dense"), r"layers \('dense,dense,dense'\) has 3 entries"),
    (dict(dropout=1.5), r"dropout \(1.5\) must be in \[0, 1\)"),
    (dict(z_loss=-1.0), r"z_loss \(-1.0\) must be >= 0"),
    (dict(attention={"backend": "xformers"}), r"attention.backend \('xformers'\) must be one of"),
    (dict(attention={"mask": "full"}), r"attention.mask \('full'\) must be one of"),
    (dict(attention={"bidirectional_modalities": ["video"]}),
     r"unknown modality 'video'; valid: \['text', 'image', 'audio'\]"),
    (dict(modalities=[{"name": "text", "vocab_size": 0}]),
     r"modalities.text.vocab_size \(0\) must be a positive integer"),
    (dict(modalities=[{"name": "text", "vocab_size": 8}, {"name": "text", "vocab_size": 8}]),
     r"modalities names \(\['text', 'text'\]\) must be unique"),
    (dict(blocks={"dense": {"hidden": -1}}), r"blocks.dense.hidden \(-1\) must be a positive"),
    (dict(blocks={"dense": {"width": 3}}), r"blocks.dense: unknown option\(s\) \['width'\]"),
])
def test_model_config_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


@pytest.mark.parametrize("overrides, message", [
    (["train.steps=0"], r"train.steps \(0\) must be a positive integer"),
    (["train.lr=-1"], r"train.lr \(-1\) must be > 0"),
    (["train.seq_len=4096"], r"train.seq_len \(4096\) must be <= model.max_seq_len \(128\)"),
    (["model.dimm=3"], r"unknown key\(s\) \['model.dimm'\]; valid keys under model."),
    (["model.modalities.video.vocab_size=3"], r"no item 'video'"),
    (["data.name=imagenet"], r"data.name \('imagenet'\) must be one of"),
    (["steps"], r"override 'steps' must look like key=value"),
])
def test_run_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(CONFIGS / "default.yaml", overrides)


def test_overrides_reach_typed_fields():
    cfg = load_config(CONFIGS / "default.yaml",
                      ["model.dim=64", "model.layers=dense", "model.blocks.dense.hidden=96",
                       "model.modalities.image.loss_weight=0.5", "model.attention.mask=causal",
                       "train.steps=7"])
    assert cfg.model.dim == 64 and cfg.train.steps == 7
    assert cfg.model.modalities[1].loss_weight == 0.5
    assert isinstance(cfg.model.blocks["dense"], DenseConfig)
    assert cfg.model.blocks["dense"].hidden == 96


def test_missing_config_file():
    with pytest.raises(ValueError, match="config file 'nope.yaml' does not exist"):
        load_config("nope.yaml")


def test_layer_pattern_repeats():
    cfg = ModelConfig(n_layers=4, layers="dense, dense")
    assert [cfg.layer_block(i).kind for i in range(4)] == ["dense"] * 4


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_loads(path):
    load_config(path)


@pytest.mark.parametrize("layers, blocks", [
    ("dense", {}), ("mot", {"mot": {"untie": "ffn"}}), ("moe", {"moe": {"top_k": 1}}),
    ("moma", {"moma": {"num_experts": 4, "top_k": 1}}),
    ("mot_moe", {"mot_moe": {"moe": {"num_experts": 4}}})])
def test_saved_config_loads_back(layers, blocks):
    """What a run writes to config.yaml builds the same config again (every block kind)."""
    import yaml

    from experiments.config import RunConfig, config_to_dict, from_dict

    cfg = load_config(CONFIGS / "default.yaml", [f"model.layers={layers}"])
    cfg.model = ModelConfig(**{**config_to_dict(cfg)["model"], "layers": layers,
                               "blocks": blocks})
    text = yaml.safe_dump(config_to_dict(cfg))
    again = from_dict(RunConfig, yaml.safe_load(text))
    assert config_to_dict(again) == config_to_dict(cfg)
