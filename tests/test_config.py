"""Typed TOML configs: both shipped files load, unknown keys and bad types are named errors."""

import dataclasses
from pathlib import Path

import pytest

from pipeline.config import TRAINER_SECTIONS, ConfigError, load_pipeline_config, read_toml
from trainer.config import Config, load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["demo", "coco_r50", "photos"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / f"{name}.toml")
    assert cfg.name == name
    pcfg, _ = load_pipeline_config(ROOT / "configs" / f"{name}.toml")
    assert pcfg.proposals == cfg.proposals and pcfg.backbone == cfg.backbone


def test_paper_config_keeps_paper_values():
    cfg = load_config(ROOT / "configs" / "coco_r50.toml")
    p = cfg.proposals
    assert (p.short_side, p.max_side, p.top_k, p.score_threshold, p.nms_sigma) == (
        800,
        1333,
        20,
        0.7,
        2.0,
    )
    assert (p.min_center_y, p.max_box_width, p.mask_threshold) == (0.2, 0.95, 0.5)
    assert cfg.backbone.kind == "resnet50"
    assert (cfg.model.num_kernels, cfg.model.channels, cfg.model.ffn_dim) == (100, 256, 2048)
    assert cfg.pretrain.lr == 1e-4 and cfg.pretrain.weight_decay == 0.05
    assert cfg.finetune.backbone_lr_mult == 0.25 and cfg.finetune.frozen_stages == 1


def test_trainer_sections_match_pipeline_list():
    own = {f.name for f in dataclasses.fields(Config)} - {"name", "data", "backbone", "proposals"}
    assert own == set(TRAINER_SECTIONS)


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text("[proposals]\ntop_kk = 3\n")
    with pytest.raises(ConfigError, match="proposals.top_kk"):
        load_config(path)


def test_unknown_section_is_named(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text("[pretrian]\niters = 3\n")
    with pytest.raises(ConfigError, match="pretrian"):
        load_config(path)


def test_set_overrides_with_type_checking():
    path = ROOT / "configs" / "demo.toml"
    cfg = load_config(
        path, ["pretrain.iters=7", "proposals.scales=[1.0, 0.5]", "backbone.kind=resnet50"]
    )
    assert cfg.pretrain.iters == 7 and cfg.proposals.scales == [1.0, 0.5]
    assert cfg.backbone.kind == "resnet50"
    assert load_config(path, ["pretrain.lr=1"]).pretrain.lr == 1.0  # int widens to float
    with pytest.raises(ConfigError, match="pretrain.iters"):
        load_config(path, ["pretrain.iters=many"])
    with pytest.raises(ConfigError, match="pretrain.prompts"):
        load_config(path, ["pretrain.prompts=1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(path, ["pretrain.iters"])


def test_resolved_config_round_trips(tmp_path):
    from pipeline.cli import record_run

    raw = read_toml(ROOT / "configs" / "demo.toml", ["finetune.frac=0.1"])
    record_run(
        tmp_path,
        dataclasses.asdict(load_config(ROOT / "configs" / "demo.toml", ["finetune.frac=0.1"])),
    )
    again = load_config(tmp_path / "config.toml")
    assert again.finetune.frac == 0.1 and again.name == raw["name"]
    assert (tmp_path / "version.json").is_file()


# Every out-of-range setting the hostile-input review (issue 15) fed the commands: each used to
# give a traceback or a silently useless run; now the load stops with the key named.
OUT_OF_RANGE = [
    ("pretrain.lr=-1", "pretrain.lr must be > 0"),
    ("pretrain.lr=nan", "pretrain.lr must be a finite number"),
    ("finetune.lr=inf", "finetune.lr must be a finite number"),
    ("pretrain.batch_size=0", "pretrain.batch_size must be >= 1"),
    ("model.num_heads=3", "model.num_heads must divide channels"),
    ("model.num_stages=0", "model.num_stages must be >= 1"),
    ("model.pyramid_scales=[2, 1, 0.5]", "model.pyramid_scales must be four decreasing factors"),
    ("model.pyramid_scales=[1, 2, 0.5, 0.25]", "model.pyramid_scales must be four decreasing"),
    ("model.pyramid_scales=[4, 2, 1, 0.3]", "model.pyramid_scales must be four decreasing"),
    ("pretrain.short_side=0", "pretrain.short_side must be >= 32"),
    ("pretrain.prompt_keep=1.5", "pretrain.prompt_keep must be in [0, 1]"),
    ("proposals.top_k=0", "proposals.top_k must be >= 1"),
    ("proposals.top_k=-3", "proposals.top_k must be >= 1"),
    ("proposals.short_side=0", "proposals.short_side must be >= 32"),
    ("proposals.mask_threshold=2", "proposals.mask_threshold must be in [0, 1]"),
    ("proposals.max_side=-1", "proposals.max_side must be >= 32"),
    ("proposals.scales=[]", "proposals.scales must list at least one scale"),
    ("proposals.scales=[1.0, 0]", "proposals.scales[1] must be in (0, 1]"),
    ("proposals.executor=dask", "proposals.executor must be one of 'ray', 'local'"),
    ("model.num_kernels=0", "model.num_kernels must be >= 1"),
    ("finetune.rotate_prob=3", "finetune.rotate_prob must be in [0, 1]"),
    ("finetune.test_mask_threshold=5", "finetune.test_mask_threshold must be in [0, 1]"),
    ("finetune.lr_steps=[100, 0]", "finetune.lr_steps[1] must be >= 1"),
    ("finetune.frac=0", "finetune.frac must be in (0, 1]"),
    ("finetune.multiscale=[192, 0]", "finetune.multiscale[1] must be >= 1"),
    ("data.max_image_pixels=0", "data.max_image_pixels must be >= 1"),
    # issue 26: each of these ran (or crashed deep inside) instead of stopping at the key
    ("pretrain.short_side=1", "pretrain.short_side must be >= 32"),
    ("proposals.short_side=1", "proposals.short_side must be >= 32"),
    ("pretrain.seed=-1", "pretrain.seed must be in [0, 4294967295]"),
    ("finetune.seed=99999999999", "finetune.seed must be in [0, 4294967295]"),
    ("finetune.split_seed=-7", "finetune.split_seed must be in [0, 4294967295]"),
    ("compare.seeds=[0, -2]", "compare.seeds[1] must be in [0, 4294967295]"),
    ("data.seed=-5", "data.seed must be in [0, 4294967295]"),
    ('name="../../x"', "name must be one folder name"),
    ('name=""', "name must be one folder name"),
]


@pytest.mark.parametrize("override, message", OUT_OF_RANGE)
def test_out_of_range_settings_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "demo.toml", [override])
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override", ["proposals.top_k=0", "proposals.mask_threshold=2"])
def test_stage_one_view_checks_ranges_too(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_pipeline_config(ROOT / "configs" / "demo.toml", [override])


def test_boundary_values_are_accepted():
    cfg = load_config(
        ROOT / "configs" / "demo.toml",
        ["finetune.frozen_stages=-1", "pretrain.prompt_keep=1.0", "finetune.num_workers=0"],
    )
    assert cfg.pretrain.prompt_keep == 1.0 and cfg.finetune.frozen_stages == -1


def test_binary_config_file_is_one_line(tmp_path):
    path = tmp_path / "model.toml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    with pytest.raises(ConfigError, match=r"model.toml: not a text config file \(byte 0x89"):
        read_toml(path)
