"""ResNet-50 checkpoints: DenseCL / MoCo-v2 / SwAV / DINO / torchvision layouts load exactly,
missing tensors are reported, files without a ResNet-50 fail clearly."""

import logging

import pytest
import torch
import torchvision

from pipeline.backbones.backbone import ResNet50
from pipeline.backbones.build import build_backbone
from pipeline.backbones.resnet_weights import load_resnet50_checkpoint
from pipeline.backbones.vit import DinoV2ViTS14
from pipeline.backbones.weight_files import LoadReport
from pipeline.cli import UserError
from pipeline.config import BackboneConfig

torch.set_num_threads(1)


def _randomised(state: dict) -> dict:
    """Every float tensor filled with distinct random values, so any mix-up shows."""
    g = torch.Generator().manual_seed(0)
    return {
        k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone() + 7)
        for k, v in state.items()
    }


@pytest.fixture(scope="module")
def resnet_state():
    """A torchvision resnet50 state dict (with fc) holding random values."""
    return _randomised(torchvision.models.resnet50(weights=None).state_dict())


def _prefixed(state: dict, prefix: str, drop_fc: bool = True) -> dict:
    return {prefix + k: v for k, v in state.items() if not (drop_fc and k.startswith("fc."))}


def _resnet_layouts(ref: dict) -> dict:
    """name -> (checkpoint object, names that must be reported as ignored)."""
    other = {k: v + 1 if v.is_floating_point() else v for k, v in ref.items()}
    head = torch.randn(128, 2048)
    return {
        # OpenSelfSup / mmselfsup training checkpoint: backbone, neck and a momentum encoder.
        "densecl": (
            {
                "meta": {"epoch": 200},
                "state_dict": {
                    **_prefixed(ref, "backbone."),
                    "neck.mlp.0.weight": head,
                    **_prefixed(other, "encoder_k.0."),
                },
            },
            "neck.mlp.0.weight",
        ),
        # MoCo-v2 main_moco.py: DDP-wrapped query and key encoders with MLP fc heads and a queue.
        "mocov2": (
            {
                "epoch": 200,
                "arch": "resnet50",
                "state_dict": {
                    **_prefixed(ref, "module.encoder_q."),
                    "module.encoder_q.fc.0.weight": torch.randn(2048, 2048),
                    "module.encoder_q.fc.2.weight": head,
                    **_prefixed(other, "module.encoder_k."),
                    "module.queue": torch.randn(128, 16),
                    "module.queue_ptr": torch.zeros(1, dtype=torch.long),
                },
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.03}]},
            },
            "module.encoder_q.fc.2.weight",
        ),
        # SwAV: DDP prefix, projection head and prototypes.
        "swav": (
            {
                **_prefixed(ref, "module."),
                "module.projection_head.0.weight": torch.randn(2048, 2048),
                "module.projection_head.3.weight": head,
                "module.prototypes.weight": torch.randn(3000, 128),
            },
            "module.prototypes.weight",
        ),
        # DINO's released ResNet-50 backbone: plain torchvision keys, no fc.
        "dino_plain": (_prefixed(ref, ""), None),
        # DINO's training checkpoint: the teacher (wanted) and a DDP-wrapped student.
        "dino_teacher": (
            {
                "student": {
                    **_prefixed(other, "module.backbone."),
                    "module.head.mlp.0.weight": head,
                },
                "teacher": {**_prefixed(ref, "backbone."), "head.mlp.0.weight": head},
                "epoch": 100,
            },
            "head.mlp.0.weight",
        ),
        # torchvision: plain, classifier included.
        "torchvision": (dict(ref), "fc.weight"),
    }


@pytest.mark.parametrize(
    "layout", ["densecl", "mocov2", "swav", "dino_plain", "dino_teacher", "torchvision"]
)
def test_resnet_checkpoint_layouts_load_exactly(layout, resnet_state, tmp_path):
    ckpt, ignored_head = _resnet_layouts(resnet_state)[layout]
    path = tmp_path / f"{layout}.pth"
    torch.save(ckpt, path)
    backbone = build_backbone(BackboneConfig(kind="resnet50", weights=str(path)))
    got = backbone.state_dict()
    expected = {k: v for k, v in resnet_state.items() if not k.startswith("fc.")}
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), f"{layout}: {name} differs"
    report = backbone.load_report
    assert report.loaded == len(expected) and report.missing == []
    if ignored_head:
        assert ignored_head in report.ignored


def test_resnet_reports_missing_tensors(resnet_state, tmp_path, caplog):
    partial = {k: v for k, v in resnet_state.items() if not k.startswith("layer4.2.")}
    torch.save({"state_dict": partial}, tmp_path / "partial.pth")
    with caplog.at_level(logging.WARNING, logger="pipeline.backbones.resnet_weights"):
        backbone = build_backbone(
            BackboneConfig(kind="resnet50", weights=str(tmp_path / "partial.pth"))
        )
    assert "layer4.2.conv1.weight" in backbone.load_report.missing
    assert not any("num_batches_tracked" in k for k in backbone.load_report.missing)
    assert "missing" in caplog.text


@pytest.mark.parametrize("content", ["vit", "other", "resnet18", "garbage"])
def test_files_without_resnet50_weights_fail_clearly(content, tmp_path):
    path = tmp_path / "bad.pth"
    if content == "garbage":
        path.write_bytes(b"not a checkpoint")
    else:
        obj = {
            "vit": lambda: DinoV2ViTS14().vit.state_dict(),
            "other": lambda: {"state_dict": {"encoder.weight": torch.randn(4, 4)}},
            "resnet18": lambda: torchvision.models.resnet18(weights=None).state_dict(),
        }[content]()
        torch.save(obj, path)
    with pytest.raises(UserError, match="ResNet-50|cannot read"):
        build_backbone(BackboneConfig(kind="resnet50", weights=str(path)))


def test_loader_fills_a_given_model_and_reports_the_location(resnet_state, tmp_path):
    path = tmp_path / "mocov2.pth"
    ckpt, _ = _resnet_layouts(resnet_state)["mocov2"]
    torch.save(ckpt, path)
    model = ResNet50()
    report = load_resnet50_checkpoint(model, path)
    assert isinstance(report, LoadReport)
    assert report.location == "['state_dict'] module.encoder_q."
    assert torch.equal(model.layer3[2].conv3.weight, resnet_state["layer3.2.conv3.weight"])
    # The key encoder and the queue are left over, not loaded.
    assert "module.queue" in report.ignored
    assert any(k.startswith("module.encoder_k.") for k in report.ignored)
    assert f"loaded {report.loaded} tensors from {path}" in report.summary()
