"""Configs: one validated schema; YAML round trip; every bad key or value refused in one line naming
the file and the key; sizes from the one table."""

import pytest
import yaml

from crossmodalnet.config import (
    CROSSMODALNET_FIELDS,
    MODEL_NAMES,
    MODEL_SIZES,
    AdaptConfig,
    ModelConfig,
    TrainConfig,
    config_differences,
    from_dict,
    imply_missing_fields,
    load_config_file,
    load_run_config,
    load_yaml,
    replace,
    to_dict,
    to_yaml,
)
from crossmodalnet.errors import CrossModalNetError


def _write(path, text):
    path.write_text(text)
    return path


def test_yaml_round_trip(tmp_path):
    cfg = TrainConfig(
        model=ModelConfig.from_size("crossmodalnet", "tiny", cross_attention="paper", modality_dropout=0.25),
        seed=7, epochs=3, patch_size=(32, 48, 64), max_minutes=1.5, lr=1e-5, balancing_alpha=-0.5,
    )
    text = to_yaml(cfg)
    assert "patch_size:\n- 32\n- 48\n- 64" in text  # plain YAML lists, no Python tags
    back = load_yaml(TrainConfig, _write(tmp_path / "config.yaml", text))
    assert back == cfg
    assert back.patch_size == (32, 48, 64) and back.model.depths == (1, 1, 1)  # lists back to tuples
    assert load_yaml(TrainConfig, _write(tmp_path / "empty.yaml", "")) == TrainConfig()


def test_unknown_keys_name_the_key_and_the_file(tmp_path):
    top = _write(tmp_path / "top.yaml", "epochs: 2\nlearning_rate: 0.1\n")
    with pytest.raises(CrossModalNetError, match=r"top.yaml: learning_rate: unknown key; known: .*\blr\b"):
        load_yaml(TrainConfig, top)
    nested = _write(tmp_path / "nested.yaml", "model:\n  name: crossmodalnet\n  heads: 4\n")
    with pytest.raises(CrossModalNetError, match=r"nested.yaml: model.heads: unknown key; known: .*num_heads"):
        load_yaml(TrainConfig, nested)


@pytest.mark.parametrize("text, message", [
    ("patch_size: [0, 48, 48]", r"patch_size.0: Input should be greater than or equal to 1, got 0"),
    ("patch_size: 16", r"patch_size: Input should be a valid tuple, got 16"),
    ("seed: abc", r"seed: Input should be a valid integer.*got 'abc'"),
    ("target_spacing: [-1, 1, 1]", r"target_spacing.0: Input should be greater than 0, got -1"),
    ("lr: .nan", r"lr: Input should be a finite number"),
    ("model: {modality_dropout: 5.0}", r"model.modality_dropout: Input should be less than or equal to 1, got 5.0"),
    ("model: {feature_size: -4}", r"model.feature_size: Input should be greater than or equal to 1, got -4"),
    ("model: {window_size: 0}", r"model.window_size: Input should be greater than or equal to 1, got 0"),
    ("model: {cross_attention: bogus}", r"model.cross_attention: Input should be 'standard' or 'paper', got 'bogus'"),
    ("model: {name: foo}", r"model: unknown model 'foo'; registered: crossmodalnet, "),
    ("model: {size: huge}", r"model: unknown size 'huge' for crossmodalnet; choose from tiny, small, base"),
    ("model: {feature_size: 9}", r"model: stage 0 has 9 channels, not divisible by its 2 heads"),
    ("model: {depths: [2, 2]}", r"model: depths \[2, 2\] and num_heads \[2, 4, 8\] need one entry per stage"),
    ("model: {patch_size: 3}", r"model: patch_size must be a power of two"),
    ("model: {cross_first_stage: 3}", r"model: cross_first_stage must be below the 3 stages, got 3"),
    ("device: tpu", r"device: unknown device 'tpu'; use auto, cpu, cuda or cuda:N"),
    ("flip_axes: [3]", r"flip_axes.0: Input should be 0, 1 or 2, got 3"),
    ("optimizer: sgd", r"optimizer: Input should be 'adam' or 'adamw', got 'sgd'"),
    ("epochs: 0", r"epochs: Input should be greater than or equal to 1, got 0"),
    ("sw_overlap: 1.0", r"sw_overlap: Input should be less than 1, got 1.0"),
])
def test_bad_values_name_the_file_and_the_key_in_one_line(tmp_path, text, message):
    path = _write(tmp_path / "bad.yaml", text + "\n")
    with pytest.raises(CrossModalNetError, match="bad.yaml: " + message) as exc:
        load_config_file(path)
    assert "\n" not in str(exc.value)


def test_yaml_1_1_exponent_without_dot_is_read_as_the_number(tmp_path):
    # PyYAML reads `1e-5` as a string (YAML 1.1); the schema turns it into the float it means.
    assert load_config_file(_write(tmp_path / "c.yaml", "lr: 1e-5\n")).lr == 1e-5


def test_bad_files(tmp_path):
    with pytest.raises(CrossModalNetError, match="missing.yaml: config file not found"):
        load_yaml(TrainConfig, tmp_path / "missing.yaml")
    broken = _write(tmp_path / "broken.yaml", "epochs: [1, 2\n")
    with pytest.raises(CrossModalNetError, match="broken.yaml: invalid YAML") as exc:
        load_yaml(TrainConfig, broken)
    assert "\n" not in str(exc.value)
    listing = _write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(CrossModalNetError, match="list.yaml: expected a mapping of TrainConfig keys"):
        load_yaml(TrainConfig, listing)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("seed: 1 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(CrossModalNetError, match="latin.yaml: not a UTF-8 text file"):
        load_yaml(TrainConfig, latin)
    with pytest.raises(CrossModalNetError, match="config.yaml: empty run config"):
        load_run_config(_write(tmp_path / "config.yaml", ""))


def test_sizes_come_from_the_one_table():
    tiny = ModelConfig.from_size("crossmodalnet", "tiny")
    for key, value in MODEL_SIZES["crossmodalnet"]["tiny"].items():
        assert getattr(tiny, key) == value
    assert ModelConfig() == ModelConfig.from_size("crossmodalnet", "small")  # the CPU default
    assert ModelConfig(size="base").feature_size == MODEL_SIZES["crossmodalnet"]["base"]["feature_size"]
    # A field given explicitly wins over the size's.
    assert ModelConfig(size="tiny", feature_size=24).feature_size == 24
    # Baselines read their own table entry: the CrossModalNet fields are unset.
    unet = ModelConfig.from_size("unet", "tiny")
    assert all(getattr(unet, k) is None for k in CROSSMODALNET_FIELDS)
    assert set(MODEL_NAMES) == set(MODEL_SIZES) and all(set(v) == {"tiny", "small", "base"}
                                                          for v in MODEL_SIZES.values())
    # small leaves it to the data (for_data); read without data as 1.
    assert [MODEL_SIZES["crossmodalnet"][k]["cross_first_stage"] for k in ("tiny", "small", "base")] == [0, None, 0]
    assert ModelConfig().first_cross_stage == 1 and ModelConfig(size="tiny").first_cross_stage == 0
    with pytest.raises(CrossModalNetError, match="unknown size 'huge'"):
        ModelConfig.from_size("crossmodalnet", "huge")
    with pytest.raises(CrossModalNetError, match=r"depth: unknown key"):
        ModelConfig.from_size("crossmodalnet", "tiny", depth=3)


def test_assignment_and_replace_are_validated():
    cfg = TrainConfig()
    with pytest.raises(CrossModalNetError, match=r"batch_size: Input should be greater than or equal to 1"):
        replace(cfg, batch_size=0)
    assert replace(cfg, seed=3).seed == 3 and cfg.seed == 0
    with pytest.raises(ValueError):
        cfg.lr = -1.0  # validate_assignment


def test_to_dict_from_dict_inverse():
    cfg = TrainConfig()
    data = to_dict(cfg)
    assert data["patch_size"] is None and isinstance(data["model"]["depths"], list)  # None: from the plan
    assert isinstance(to_dict(replace(cfg, patch_size=(32, 48, 8)))["patch_size"], list)
    assert from_dict(TrainConfig, data) == cfg
    assert set(data) == set(TrainConfig.model_fields)


def test_config_differences_ignore_runtime_keys():
    a = TrainConfig()
    b = replace(a, max_minutes=3.0, device="cpu", num_workers=2, lr=1e-3)
    assert config_differences(a, b) == ["lr: 0.003 -> 0.001"]


def test_adapt_config_terms_and_ranges():
    assert AdaptConfig(terms="topology,marginal").terms == ("marginal", "topology")  # canonical order
    assert AdaptConfig(terms="none").terms == ()
    with pytest.raises(CrossModalNetError, match=r"terms: .*unknown term 'bogus'"):
        from_dict(AdaptConfig, {"terms": "bogus"}, "adapt.yaml")
    with pytest.raises(CrossModalNetError, match=r"adapt.yaml: feature_stage: Input should be less than or equal"):
        from_dict(AdaptConfig, {"feature_stage": 0}, "adapt.yaml")
    with pytest.raises(CrossModalNetError, match=r"adapt.yaml: topology_pool: Input should be 'split', 'avg' or"):
        from_dict(AdaptConfig, {"topology_pool": "median"}, "adapt.yaml")


def test_legacy_amp_key_reads_as_precision(tmp_path):
    full = to_dict(TrainConfig())
    del full["precision"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**full, "amp": True}, sort_keys=False))
    assert load_run_config(path).precision == "fp16"
    path.write_text(yaml.safe_dump({**full, "amp": False}, sort_keys=False))
    assert load_run_config(path).precision == "fp32"


def test_run_configs_written_before_a_field_keep_what_they_meant(tmp_path):
    # A run's config.yaml is a full dump; one from before `cross_first_stage` existed was trained with
    # a Cross Transformer block after every stage, though `small` now starts them at stage 1 on
    # unregistered data. A run saves its model as `for_data` decided it (None never reaches a run).
    full = to_dict(TrainConfig(model=ModelConfig.from_size("crossmodalnet", "small").for_data(None)))
    old = {**full, "model": {k: v for k, v in full["model"].items() if k != "cross_first_stage"}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old, sort_keys=False))
    assert load_run_config(path).model.cross_first_stage == 0
    assert load_yaml(TrainConfig, path).model.cross_first_stage is None  # a plain read takes today's size
    assert load_config_file(path, saved=True).model.cross_first_stage == 0
    assert load_config_file(path).model.cross_first_stage is None  # a hand-written file: the size (and data) decide
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
    today = ModelConfig.from_size("crossmodalnet", "small")  # left to the data; without data: "reference"
    assert today.fine_skips is None and today.skip_source == "reference" and today.uses_deformable
    registered, unregistered = today.for_data(True), today.for_data(None)
    assert (registered.fine_skips, registered.deformable, registered.cross_first_stage) == ("both", False, 0)
    assert (unregistered.fine_skips, unregistered.deformable, unregistered.cross_first_stage) == ("reference", True, 1)
    assert today.cross_first_stage is None and today.first_cross_stage == 1
    assert ModelConfig.from_size("crossmodalnet", "small", deformable=True).for_data(True).deformable  # given: kept
    given = ModelConfig.from_size("crossmodalnet", "small", cross_first_stage=1).for_data(True)
    assert given.cross_first_stage == 1  # given: kept
    assert ModelConfig.from_size("crossmodalnet", "tiny").for_data(True).cross_first_stage == 0  # the size's 0
