"""Typed configs: every YAML loads, errors name the key, overrides and round-trips work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.config import EvalConfig
from flamingo.config import FlamingoConfig
from flamingo.training.config import TrainConfig
from flamingo.typed_config import from_dict, to_dict
from tests.helpers import ROOT, TINY


def demo_loader(path: Path):
    from demo.pretrain_clip import ClipPretrainConfig
    from demo.pretrain_lm import LMPretrainConfig
    from flamingo.typed_config import load_config

    by_stem = {
        "clip": ClipPretrainConfig,
        "lm": LMPretrainConfig,
        "model": FlamingoConfig,
        "train": TrainConfig,
        "eval": EvalConfig,
    }
    return load_config(by_stem[path.stem], path)


LOADERS = {
    "model": FlamingoConfig.from_yaml,
    "bench": FlamingoConfig.from_yaml,  # the benchmarks' models
    "train": TrainConfig.from_yaml,
    "eval": EvalConfig.from_yaml,
    "demo": demo_loader,
}


def all_yaml() -> list[Path]:
    return sorted((ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs" / "deepspeed").glob("*.json")), ids=lambda p: p.name
)
def test_deepspeed_jsons_hold_only_zero_settings(path: Path):
    from flamingo.training.engine import OWNED_KEYS

    data = json.loads(path.read_text())
    assert "zero_optimization" in data and not set(data) & set(OWNED_KEYS)


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs" / "deepspeed").glob("zero3*.json")), ids=lambda p: p.name
)
def test_zero3_jsons_set_buckets_below_deepspeeds_defaults(path: Path):
    # DeepSpeed's defaults (reduce_bucket_size 5e8, stage3_max_live_parameters 1e9) fit an 80 GB
    # GPU only; the two-rank ~1B rehearsal on CPU fit with these
    zero = json.loads(path.read_text())["zero_optimization"]
    assert zero["reduce_bucket_size"] <= 5e7 and zero["stage3_prefetch_bucket_size"] <= 5e7
    assert zero["stage3_max_live_parameters"] <= 3e8 and zero["stage3_max_reuse_distance"] <= 3e8


def test_train_configs_read_shards_with_globs_where_converters_write_several_inputs():
    # the converters name input j's k-th shard PREFIX-JJJJJ-KKKKK.tar: a brace list of
    # PREFIX-KKKKK.tar names matches none of them
    cfg = TrainConfig.from_yaml(ROOT / "configs/train/opt-1.3b.yaml")
    assert all(d.shards.endswith("-*.tar") for d in cfg.datasets), [d.shards for d in cfg.datasets]


def test_train_configs_name_existing_model_configs():
    for path in sorted((ROOT / "configs" / "train").glob("*.yaml")):
        cfg = TrainConfig.from_yaml(path)
        FlamingoConfig.from_yaml(ROOT / cfg.model)
        assert cfg.engine.deepspeed is None or (ROOT / cfg.engine.deepspeed).is_file()


def test_configs_directory_is_covered():
    kinds = {p.relative_to(ROOT / "configs").parts[0] for p in all_yaml()}
    assert kinds <= set(LOADERS), f"add a loader for config kind(s) {kinds - set(LOADERS)}"


@pytest.mark.parametrize("path", all_yaml(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_loads(path: Path):
    kind = path.relative_to(ROOT / "configs").parts[0]
    cfg = LOADERS[kind](path)
    assert from_dict(type(cfg), to_dict(cfg)) == cfg


def test_real_configs_name_hub_models():
    cfg = FlamingoConfig.from_yaml(ROOT / "configs/model/openflamingo-9b.yaml")
    assert (cfg.vision.model_name, cfg.vision.pretrained) == ("ViT-L-14", "openai")
    assert cfg.lm.name_or_path == "mosaicml/mpt-7b"
    assert (cfg.xattn.every_n_layers, cfg.xattn.first_layer) == (4, 3)
    assert cfg.xattn.layer_indices(32) == [3, 7, 11, 15, 19, 23, 27, 31]


def test_overrides_are_typed():
    cfg = FlamingoConfig.from_yaml(TINY, overrides=["resampler.depth=3", "xattn.gate=vector"])
    assert cfg.resampler.depth == 3 and cfg.xattn.gate == "vector"
    # YAML 1.1 reads "5e-4" (no dot) as a string; a float field takes it as the number
    train = TrainConfig.from_yaml(ROOT / "configs/train/tiny.yaml", ["optim.lr=5e-4"])
    assert train.optim.lr == 5e-4
    with pytest.raises(ValueError, match=r"optim\.lr"):
        TrainConfig.from_yaml(ROOT / "configs/train/tiny.yaml", ["optim.lr=fast"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("resampler.dept=2", "resampler.dept"),
        ("resampler.depth=two", "resampler.depth"),
        ("resampler.depth=0", "depth"),
        ("xattn.attend=first", "xattn.attend"),
        ("xattn.first_layer=1", "first_layer"),
        ("frozen_dtype=int8", "frozen_dtype"),
        ("vision.image_mean=[0.5, 0.5]", "vision.image_mean"),
        ("lm.disable_dropout=1", "lm.disable_dropout"),
        ("bogus=1", "bogus"),
    ],
)
def test_bad_keys_and_values_name_the_key(override: str, key: str):
    with pytest.raises(ValueError, match=key.replace(".", r"\.").replace("[", r"\[")):
        FlamingoConfig.from_yaml(TINY, overrides=[override])


def test_an_error_blames_the_command_line_or_the_file_that_gave_the_value(tmp_path: Path):
    """A command-line typo was reported as the YAML file's (``configs/train/tiny.yaml:
    unknown config key(s) optim.lrr``)."""
    tiny = ROOT / "configs/train/tiny.yaml"
    cases = {
        "optim.lrr=1": "unknown config key(s) optim.lrr",
        "datasets.0.batch_size=0": "datasets[0].batch_size must be > 0",
        "datasets=[{name: x}]": "missing config key(s) datasets[0].kind, datasets[0].shards",
        "datasets.1.at_epoch_end=stop": "at_epoch_end: stop needs resampled: false",  # unnamed
    }
    for override, error in cases.items():
        with pytest.raises(ValueError) as raised:
            TrainConfig.from_yaml(tiny, ["steps=3", override])
        assert str(raised.value).startswith(f"command line {override!r} (over {tiny}): ")
        assert error in str(raised.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text(tiny.read_text().replace("optim: {lr:", "optim: {lrr:"))
    for overrides in ([], ["steps=3", "optim.lr=1e-3"]):
        with pytest.raises(ValueError, match=rf"^{bad}: unknown config key\(s\) optim\.lrr"):
            TrainConfig.from_yaml(bad, overrides)
    with pytest.raises(ValueError, match="^model_overrides 'xattn.heads=two' \\(over "):
        FlamingoConfig.from_yaml(TINY, ["xattn.heads=two"], "model_overrides")


def test_a_dataset_that_cannot_run_out_cannot_stop_the_run():
    tiny = ROOT / "configs/train/tiny.yaml"
    with pytest.raises(ValueError, match="pairs: at_epoch_end: stop needs resampled: false"):
        TrainConfig.from_yaml(tiny, ["datasets.1.at_epoch_end=stop"])
    with pytest.raises(ValueError, match=r"at_epoch_end"):
        TrainConfig.from_yaml(tiny, ["datasets.1.at_epoch_end=never", "datasets.1.resampled=false"])
    cfg = TrainConfig.from_yaml(
        tiny, ["datasets.1.at_epoch_end=stop", "datasets.1.resampled=false"]
    )
    assert cfg.datasets[1].at_epoch_end == "stop"


def test_missing_file_and_bad_override_syntax(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        FlamingoConfig.from_yaml(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="section.key=value"):
        FlamingoConfig.from_yaml(TINY, overrides=["resampler.depth"])


def test_dict_round_trip():
    cfg = FlamingoConfig.from_yaml(TINY)
    again = FlamingoConfig.from_dict(cfg.to_dict())
    assert again == cfg


def test_configs_are_frozen_and_replace_gives_a_validated_copy():
    import dataclasses

    cfg = FlamingoConfig.from_yaml(TINY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.frozen_dtype = "bfloat16"
    changed = cfg.replace({"lm.tokenizer": "x", "xattn.heads": 4}, frozen_dtype="bfloat16")
    assert (changed.lm.tokenizer, changed.xattn.heads, changed.frozen_dtype) == ("x", 4, "bfloat16")
    assert (cfg.lm.tokenizer, cfg.xattn.heads, cfg.frozen_dtype) == ("tiny", 2, "float32")
    assert changed.resampler == cfg.resampler
    with pytest.raises(ValueError, match="xattn.heads: expected an integer"):
        cfg.replace({"xattn.heads": "four"})
    with pytest.raises(ValueError, match="first_layer must be in"):
        cfg.replace({"xattn.first_layer": 5})
    with pytest.raises(ValueError, match="unknown config key 'xattn.bogus'"):
        cfg.replace({"xattn.bogus": 1})
    with pytest.raises(ValueError, match="'frozen_dtype' is not a section"):
        cfg.replace({"frozen_dtype.x": 1})


def test_the_engine_owns_precision():
    from flamingo.training.config import EngineConfig

    cfg = FlamingoConfig.from_yaml(TINY)
    assert cfg.replace(EngineConfig(precision="bf16").model_changes()).frozen_dtype == "bfloat16"
    stored = cfg.replace(frozen_dtype="bfloat16")  # fp32 leaves a bf16-stored model as it is
    assert stored.replace(EngineConfig(precision="fp32").model_changes()) == stored
    with pytest.raises(ValueError, match=r"precision.*; precision is now engine.precision"):
        TrainConfig.from_yaml(ROOT / "configs/train/tiny.yaml", ["precision=bf16"])


def test_activation_checkpointing_takes_a_flag_or_gated_blocks():
    path = ROOT / "configs/train/tiny.yaml"
    for value, want in (("true", True), ("false", False), ("gated_blocks", "gated_blocks")):
        overrides = [f"engine.activation_checkpointing={value}"]
        assert TrainConfig.from_yaml(path, overrides).engine.activation_checkpointing == want
    with pytest.raises(ValueError, match="engine.activation_checkpointing"):
        TrainConfig.from_yaml(path, ["engine.activation_checkpointing=layers"])
    from flamingo.training.config import EngineConfig, OptimConfig
    from flamingo.training.engine import LocalEngine
    from tests.helpers import build

    for value, want in ((True, (True, False)), ("gated_blocks", (False, True))):
        engine = LocalEngine(build(), EngineConfig(activation_checkpointing=value), OptimConfig())
        assert (engine.policy.checkpoint_layers, engine.policy.checkpoint_gated_blocks) == want
