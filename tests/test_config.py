"""Configs: YAML round trip, unknown keys refused with the key and the file named."""

import dataclasses

import pytest
import yaml

from crossmodalnet.config import (
    CROSSMODALNET_SIZES,
    ModelConfig,
    TrainConfig,
    dump_yaml,
    from_dict,
    imply_missing_fields,
    load_run_config,
    load_yaml,
    to_dict,
)
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.train.preflight import load_config_file


def test_yaml_round_trip(tmp_path):
    cfg = TrainConfig(
        model=ModelConfig.from_size("crossmodalnet", "tiny", cross_attention="paper", modality_dropout=0.25),
        seed=7, epochs=3, patch_size=(32, 48, 64), max_minutes=1.5, lr=1e-5, balancing_alpha=-0.5,
    )
    path = dump_yaml(cfg, tmp_path / "run" / "config.yaml")
    text = path.read_text()
    assert "patch_size:\n- 32\n- 48\n- 64" in text  # plain YAML lists, no Python tags
    back = load_yaml(TrainConfig, path)
    assert back == cfg
    assert back.patch_size == (32, 48, 64) and back.model.depths == (1, 1, 1)  # lists back to tuples
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # written atomically
    assert load_yaml(TrainConfig, _write(tmp_path / "empty.yaml", "")) == TrainConfig()


def _write(path, text):
    path.write_text(text)
    return path


def test_unknown_keys_name_the_key_and_the_file(tmp_path):
    top = _write(tmp_path / "top.yaml", "epochs: 2\nlearning_rate: 0.1\n")
    with pytest.raises(CrossModalNetError, match=r"top.yaml: unknown TrainConfig key\(s\) \['learning_rate'\]"):
        load_yaml(TrainConfig, top)
    nested = _write(tmp_path / "nested.yaml", "model:\n  name: crossmodalnet\n  heads: 4\n")
    with pytest.raises(CrossModalNetError, match=r"nested.yaml: unknown ModelConfig key\(s\) \['heads'\]"):
        load_yaml(TrainConfig, nested)


def test_bad_files(tmp_path):
    with pytest.raises(CrossModalNetError, match="missing.yaml: config file not found"):
        load_yaml(TrainConfig, tmp_path / "missing.yaml")
    broken = _write(tmp_path / "broken.yaml", "epochs: [1, 2\n")
    with pytest.raises(CrossModalNetError, match="broken.yaml: invalid YAML") as exc:
        load_yaml(TrainConfig, broken)
    assert "\n" not in str(exc.value)
    listing = _write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(CrossModalNetError, match="list.yaml: expected a mapping for TrainConfig"):
        load_yaml(TrainConfig, listing)


def test_sizes():
    tiny = ModelConfig.from_size("crossmodalnet", "tiny")
    for key, value in CROSSMODALNET_SIZES["tiny"].items():
        assert getattr(tiny, key) == value
    assert ModelConfig.from_size("unet", "tiny").feature_size == ModelConfig().feature_size  # baselines
    # ModelConfig() is the CPU default, `small`; every size states where its Cross Transformer blocks start
    assert ModelConfig.from_size("crossmodalnet", "small") == ModelConfig()
    assert all(set(v) == set(CROSSMODALNET_SIZES["small"]) for v in CROSSMODALNET_SIZES.values())
    assert [CROSSMODALNET_SIZES[k]["cross_first_stage"] for k in ("tiny", "small", "base")] == [0, 1, 0]
    with pytest.raises(CrossModalNetError, match="unknown size 'huge'"):
        ModelConfig.from_size("crossmodalnet", "huge")
    with pytest.raises(CrossModalNetError, match=r"unknown ModelConfig key\(s\) \['depth'\]"):
        ModelConfig.from_size("crossmodalnet", "tiny", depth=3)


def test_to_dict_from_dict_inverse():
    cfg = TrainConfig()
    data = to_dict(cfg)
    assert isinstance(data["patch_size"], list) and isinstance(data["model"]["depths"], list)
    assert from_dict(TrainConfig, data) == cfg
    assert set(data) == {f.name for f in dataclasses.fields(TrainConfig)}


def test_run_configs_written_before_a_field_keep_what_they_meant(tmp_path):
    # A run's config.yaml is a full dump; one from before `cross_first_stage` existed was trained with
    # a Cross Transformer block after every stage, though `small` now starts them at stage 1.
    full = to_dict(TrainConfig(model=ModelConfig.from_size("crossmodalnet", "small")))
    old = {**full, "model": {k: v for k, v in full["model"].items() if k != "cross_first_stage"}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old, sort_keys=False))
    assert load_run_config(path).model.cross_first_stage == 0
    assert load_yaml(TrainConfig, path).model.cross_first_stage == 1  # a plain read takes today's default
    assert load_config_file(path, saved=True).model.cross_first_stage == 0
    assert load_config_file(path).model.cross_first_stage == 1  # a hand-written file: the size decides
    # A field that is there is never overridden, and baselines are left alone.
    path.write_text(yaml.safe_dump(full, sort_keys=False))
    assert load_run_config(path).model.cross_first_stage == 1
    unet = to_dict(TrainConfig(model=ModelConfig.from_size("unet", "small")))
    del unet["model"]["cross_first_stage"]
    assert imply_missing_fields(unet)["model"].get("cross_first_stage") is None
    # Same for `fine_skips`, whose default moved from "both" to "reference".
    older = {**full, "model": {k: v for k, v in full["model"].items() if k not in ("cross_first_stage", "fine_skips")}}
    path.write_text(yaml.safe_dump(older, sort_keys=False))
    run = load_run_config(path).model
    assert (run.cross_first_stage, run.fine_skips) == (0, "both")
    assert ModelConfig.from_size("crossmodalnet", "small").fine_skips == "reference"
