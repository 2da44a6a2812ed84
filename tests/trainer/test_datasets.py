"""Transforms, shard/COCO datasets, collate padding, the resumable sampler and loader."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from pipeline.cli import UserError
from pipeline.shards.schema import (
    STATUS_EMPTY,
    STATUS_OK,
    STATUS_UNREADABLE,
    ImageRecord,
    shard_name,
    write_shard,
)
from tests.trainer.helpers import coco_rle, shard_rles
from trainer.data.coco_dataset import CocoDataset
from trainer.data.datasets import Batch, collate
from trainer.data.loader import InfiniteSampler, build_loader
from trainer.data.shard_dataset import ShardDataset, proposals_image_root
from trainer.data.transforms import Augment, masks_to_boxes, resize, rotate, target_size

SEED_DIM = 8


# --------------------------------------------------------------------------------------------
# Transforms


def _scene(h: int = 40, w: int = 56) -> tuple[np.ndarray, np.ndarray]:
    """An image with a red and a green rectangle, and their two masks (2, h, w)."""
    image = np.full((h, w, 3), 90, np.uint8)
    masks = np.zeros((2, h, w), np.uint8)
    image[5:20, 8:30] = (255, 0, 0)
    masks[0, 5:20, 8:30] = 1
    image[22:36, 30:50] = (0, 255, 0)
    masks[1, 22:36, 30:50] = 1
    return image, masks


def _colour_agreement(image: np.ndarray, masks: np.ndarray) -> list[float]:
    """Fraction of each mask's pixels whose image colour is that object's colour."""
    red = (image[..., 0] > 200) & (image[..., 1] < 60)
    green = (image[..., 1] > 200) & (image[..., 0] < 60)
    return [float(red[masks[0] > 0].mean()), float(green[masks[1] > 0].mean())]


def test_target_size_keeps_ratio_and_caps_long_side():
    assert target_size(400, 600, 200, 1000) == (200, 300)
    assert target_size(100, 1000, 200, 500) == (50, 500)  # long side caps the scale
    assert target_size(30, 30, 60, 100) == (60, 60)


def test_masks_to_boxes_exclusive_corners():
    masks = np.zeros((2, 10, 12), np.uint8)
    masks[0, 2:5, 3:9] = 1
    boxes = masks_to_boxes(masks)
    np.testing.assert_array_equal(boxes, [[3, 2, 9, 5], [0, 0, 0, 0]])


def test_resize_moves_masks_with_image():
    image, masks = _scene()
    out_img, out_masks, scale = resize(image, masks, 80, 200)
    assert out_img.shape == (80, 112, 3) and out_masks.shape == (2, 80, 112)
    assert scale == pytest.approx(2.0)
    assert min(_colour_agreement(out_img, out_masks)) > 0.95


def test_resize_many_masks_both_ways():
    masks = np.zeros((9, 40, 50), np.uint8)
    for i in range(9):
        masks[i, 2 * i : 2 * i + 12, 3 * i : 3 * i + 15] = 1
    for short in (16, 90):  # area resampling (at most 4 channels per OpenCV call), bilinear
        _, out, scale = resize(np.zeros((40, 50, 3), np.uint8), masks, short, 500)
        assert out.shape == (9, short, round(50 * short / 40))
        areas = out.reshape(9, -1).sum(1) / scale**2
        np.testing.assert_allclose(areas, 12 * 15, rtol=0.2)


def test_flip_keeps_masks_and_boxes_consistent():
    image, masks = _scene()
    aug = Augment(40, 100, flip=1.0)
    out_img, out_masks, info = aug(image, masks, np.random.default_rng(0))
    assert info["flipped"] and info["angle"] == 0.0
    np.testing.assert_array_equal(out_masks, masks[:, :, ::-1])
    assert min(_colour_agreement(out_img, out_masks)) == 1.0
    w = image.shape[1]
    before, after = masks_to_boxes(masks), masks_to_boxes(out_masks)
    np.testing.assert_array_equal(after[:, [0, 2]], w - before[:, [2, 0]])
    np.testing.assert_array_equal(after[:, [1, 3]], before[:, [1, 3]])


def test_rotation_by_90_is_exact_and_boxes_follow():
    image = np.zeros((32, 32, 3), np.uint8)
    masks = np.zeros((1, 32, 32), np.uint8)
    masks[0, 3:10, 5:25] = 1
    image[masks[0] > 0] = 255
    out_img, out_masks = rotate(image, masks, 90.0)  # counter-clockwise
    np.testing.assert_array_equal(out_masks, np.rot90(masks, k=1, axes=(1, 2)))
    np.testing.assert_array_equal(out_img[..., 0], np.rot90(image[..., 0]))
    np.testing.assert_array_equal(masks_to_boxes(out_masks), [[3, 7, 10, 27]])


def test_small_rotation_keeps_masks_on_their_objects():
    image, masks = _scene(60, 80)
    aug = Augment(60, 200, rotate_deg=9.0, rotate_prob=1.0)
    out_img, out_masks, info = aug(image, masks, np.random.default_rng(3))
    assert 0 < abs(info["angle"]) <= 9.0
    assert not np.array_equal(out_masks, masks)
    assert min(_colour_agreement(out_img, out_masks)) > 0.9
    # Mask areas are kept up to boundary resampling.
    ratio = out_masks.reshape(2, -1).sum(1) / masks.reshape(2, -1).sum(1)
    assert np.all(np.abs(ratio - 1) < 0.1)


def test_augment_depends_only_on_the_generator():
    image, masks = _scene()
    aug = Augment(48, 100, flip=0.5, rotate_deg=9.0, rotate_prob=0.5)
    runs = [aug(image, masks, np.random.default_rng(7)) for _ in range(2)]
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    infos = {str(aug(image, masks, np.random.default_rng(s))[2]) for s in range(12)}
    assert len(infos) > 1


def test_multiscale_draws_each_listed_short_side_and_scales_the_cap():
    image, masks = _scene()  # 40 x 56
    aug = Augment(40, 70, flip=0.5, multiscale=(20, 40, 60))
    shapes = set()
    for s in range(40):
        out_image, out_masks, info = aug(image, masks, np.random.default_rng(s))
        assert out_image.shape[:2] == out_masks.shape[1:]
        shapes.add(out_image.shape[:2])
        # masks move with the image at every scale (up to boundary resampling at half size)
        assert min(_colour_agreement(out_image, out_masks)) > 0.8
    # short side 20, 40, 60 with caps 35, 70, 105 (56 * 60 / 40 = 84 <= 105)
    assert shapes == {(20, 28), (40, 56), (60, 84)}


def test_fixed_size_augment_draws_what_it_drew_before_multiscale():
    # A run without multiscale must see the same samples as before the option existed: the
    # generator is left exactly where three draws leave it.
    image, masks = _scene()
    rng, ref = np.random.default_rng(3), np.random.default_rng(3)
    Augment(48, 100, flip=0.5, rotate_deg=9.0, rotate_prob=0.5)(image, masks, rng)
    ref.random(3)
    assert rng.random() == ref.random()


# --------------------------------------------------------------------------------------------
# Shards


def _record(folder, name: str, image_id: int, status: int, boxes: list, seed: int = 0):
    """Write an image with a white rectangle per box, and its ImageRecord."""
    h, w = 36, 48
    image = np.full((h, w, 3), 60, np.uint8)
    masks = np.zeros((len(boxes), h, w), np.uint8)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        image[y0:y1, x0:x1] = 250
        masks[i, y0:y1, x0:x1] = 1
    if status == STATUS_UNREADABLE:
        (folder / name).write_bytes(b"")
    else:
        cv2.imwrite(str(folder / name), image[..., ::-1])
    seeds = np.random.default_rng(seed).standard_normal((len(boxes), SEED_DIM))
    return ImageRecord(
        file_name=name,
        image_id=image_id,
        height=h,
        width=w,
        status=status,
        error="zero-byte file" if status == STATUS_UNREADABLE else "",
        rles=shard_rles(masks),
        boxes=np.array(boxes, np.float32).reshape(-1, 4),
        scores=np.linspace(0.9, 0.8, len(boxes)).astype(np.float32),
        seeds=seeds.astype(np.float16),
        seed_pos=np.zeros((len(boxes), 3), np.int16),
    )


META = {
    "fingerprint": "f" * 64,
    "backbone": "resnet50",
    "feature_stride": 32,
    "embed_dim": SEED_DIM,
    "settings": {"top_k": 20},
}


@pytest.fixture
def shard_dir(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    props = tmp_path / "proposals"
    write_shard(
        props / shard_name(0),
        [
            _record(images, "a.png", 10, STATUS_OK, [(4, 6, 20, 18), (22, 10, 40, 30)], seed=1),
            _record(images, "b.png", 11, STATUS_EMPTY, []),
            _record(images, "c.png", 12, STATUS_UNREADABLE, []),
        ],
        META,
    )
    write_shard(
        props / shard_name(1),
        [
            _record(images, "d.png", 13, STATUS_OK, [(0, 0, 48, 12)], seed=2),
        ],
        META,
    )
    (props / "config.toml").write_text(f'[proposals]\nimages = "{images}"\n')
    return props, images


def test_shard_dataset_skips_empty_and_unreadable(shard_dir):
    props, images = shard_dir
    ds = ShardDataset(props, Augment(36, 48))
    assert proposals_image_root(props) == images and ds.image_root == images
    assert len(ds) == 2
    assert ds.skipped == {STATUS_EMPTY: 1, STATUS_UNREADABLE: 1}
    ids = [ds[i]["info"]["image_id"] for i in range(len(ds))]
    assert ids == [10, 13]


def test_shard_sample_targets(shard_dir):
    props, images = shard_dir
    ds = ShardDataset(props, Augment(72, 200), image_root=images)  # 2x upscale
    sample = ds[0]
    t = sample["target"]
    assert sample["image"].shape == (3, 72, 96) and sample["image"].dtype == torch.float32
    assert t["masks"].shape == (2, 72, 96) and t["masks"].dtype == torch.uint8
    np.testing.assert_array_equal(t["boxes"].numpy(), [[8, 12, 40, 36], [44, 20, 80, 60]])
    assert t["labels"].tolist() == [0, 0]
    expected = np.random.default_rng(1).standard_normal((2, SEED_DIM)).astype(np.float16)
    assert t["seeds"].dtype == torch.float32
    np.testing.assert_array_equal(t["seeds"].numpy(), expected.astype(np.float32))
    # The masks sit on the bright rectangles of the image.
    bright = sample["image"].mean(0) > 1.0
    for m in t["masks"]:
        assert bright[m.bool()].float().mean() > 0.97
    assert sample["info"]["orig_size"] == (36, 48) and sample["info"]["image_size"] == (72, 96)


def test_shard_dataset_errors(tmp_path, shard_dir):
    props, images = shard_dir
    with pytest.raises(UserError, match="no proposal shards"):
        ShardDataset(tmp_path / "nothing", Augment(36, 48))
    only_empty = tmp_path / "empty_props"
    write_shard(only_empty / shard_name(0), [_record(images, "e.png", 1, STATUS_EMPTY, [])], META)
    with pytest.raises(UserError, match="no image has a proposal mask"):
        ShardDataset(only_empty, Augment(36, 48), image_root=images)
    # An image that changed size since the proposals were made is refused by name.
    cv2.imwrite(str(images / "d.png"), np.zeros((10, 10, 3), np.uint8))
    ds = ShardDataset(props, Augment(36, 48))
    with pytest.raises(UserError, match="d.png"):
        ds[1]


# --------------------------------------------------------------------------------------------
# Collate


def test_collate_pads_to_multiple_and_moves_to_float():
    samples = []
    for h, w in [(30, 41), (17, 60)]:
        masks = torch.ones(2, h, w, dtype=torch.uint8)
        samples.append(
            {
                "image": torch.ones(3, h, w),
                "target": {
                    "masks": masks,
                    "boxes": torch.zeros(2, 4),
                    "labels": torch.zeros(2, dtype=torch.int64),
                },
                "info": {"image_id": 0, "image_size": (h, w)},
            }
        )
    batch = collate(samples, size_divisor=14)
    assert isinstance(batch, Batch) and len(batch) == 2
    assert batch.images.shape == (2, 3, 42, 70)
    assert batch.images[1, :, 17:].abs().sum() == 0 and batch.images[0, :, :, 41:].sum() == 0
    assert batch.targets[1]["masks"].shape == (2, 42, 70)
    assert batch.targets[1]["masks"].sum() == 2 * 17 * 60
    assert batch.infos[0]["input_size"] == (42, 70)
    moved = batch.to("cpu")
    assert moved.targets[0]["masks"].dtype == torch.float32
    assert collate(samples, size_divisor=32).images.shape == (2, 3, 32, 64)


# --------------------------------------------------------------------------------------------
# Sampler and loader


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_sampler_epochs_are_seeded_permutations():
    s = InfiniteSampler(7, seed=3)
    keys = _take(iter(s), 21)
    epochs = [sorted(k[0] for k in keys[i : i + 7]) for i in (0, 7, 14)]
    assert all(e == list(range(7)) for e in epochs)
    assert [k[0] for k in keys[:7]] != [k[0] for k in keys[7:14]]
    assert keys == _take(iter(InfiniteSampler(7, seed=3)), 21)
    assert keys != _take(iter(InfiniteSampler(7, seed=4)), 21)
    assert len({k[1] for k in keys}) == 21  # a fresh augmentation seed per draw


def test_sampler_resumes_at_position():
    full = _take(iter(InfiniteSampler(5, seed=0)), 17)
    s = InfiniteSampler(5, seed=0)
    assert s.state_at(12) == {"epoch": 2, "position": 2}
    s.start = 12
    assert _take(iter(s), 5) == full[12:]


def test_sampler_shards_over_ranks():
    ranks = [InfiniteSampler(7, seed=1, rank=r, world_size=2) for r in range(2)]
    firsts = [_take(iter(s), 4) for s in ranks]
    assert all(s.per_rank == 4 for s in ranks)
    union = {k[0] for keys in firsts for k in keys}
    assert union == set(range(7))  # 8 slots, one index repeated as padding
    # The augmentation seed of a slot does not depend on how many ranks there are.
    single = _take(iter(InfiniteSampler(7, seed=1)), 7)
    assert firsts[0][0] == single[0] and firsts[1][0] == single[1]


class _Synthetic(torch.utils.data.Dataset):
    """Samples whose content records (index, augmentation draw)."""

    def __len__(self):
        return 5

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, key)
        value = float(index) + np.random.default_rng(seed).random()
        return {
            "image": torch.full((3, 8, 8), value),
            "target": {
                "masks": torch.ones(1, 8, 8, dtype=torch.uint8),
                "boxes": torch.tensor([[0.0, 0, 8, 8]]),
                "labels": torch.zeros(1, dtype=torch.int64),
            },
            "info": {"image_id": index},
        }


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_state_resumes_exactly(workers):
    def values(batches):
        return [b.images[:, 0, 0, 0].tolist() for b in batches]

    loader = build_loader(
        _Synthetic(), 2, size_divisor=4, device="cpu", num_workers=workers, seed=5
    )
    it = iter(loader)
    first = _take(it, 4)  # 8 samples: crosses an epoch boundary of 5
    state = loader.state_dict()
    assert (state["epoch"], state["position"]) == (1, 3)
    rest = _take(it, 3)
    fresh = build_loader(_Synthetic(), 2, size_divisor=4, device="cpu", num_workers=workers, seed=5)
    fresh.load_state_dict(state)
    assert values(_take(iter(fresh), 3)) == values(rest)
    again = build_loader(_Synthetic(), 2, size_divisor=4, device="cpu", num_workers=workers, seed=5)
    assert values(_take(iter(again), 4)) == values(first)
    assert first[0].images.shape == (2, 3, 8, 8)


def test_eval_loader_is_one_ordered_pass():
    loader = build_loader(
        _Synthetic(), 2, size_divisor=4, device="cpu", num_workers=0, infinite=False
    )
    batches = list(loader)
    assert [len(b) for b in batches] == [2, 2, 1]
    assert [i["image_id"] for b in batches for i in b.infos] == [0, 1, 2, 3, 4]


def test_loader_with_shard_dataset_and_worker(shard_dir):
    props, _ = shard_dir
    ds = ShardDataset(props, Augment(36, 48, flip=0.5))
    loader = build_loader(ds, 2, size_divisor=32, device="cpu", num_workers=1, seed=0)
    batch = next(iter(loader))
    assert batch.images.shape == (2, 3, 64, 64)
    assert {t["seeds"].shape[1] for t in batch.targets} == {SEED_DIM}


# --------------------------------------------------------------------------------------------
# COCO


def test_coco_dataset_maps_categories_and_ignores_crowd(tmp_path):
    root = tmp_path / "img"
    root.mkdir()
    for name in ("x.png", "y.png", "z.png"):
        cv2.imwrite(str(root / name), np.zeros((20, 30, 3), np.uint8))
    rle = coco_rle(np.pad(np.ones((4, 5), np.uint8), ((1, 15), (2, 23))))
    coco = {
        "images": [
            {"id": 5, "file_name": "y.png", "height": 20, "width": 30},
            {"id": 2, "file_name": "x.png", "height": 20, "width": 30},
            {"id": 9, "file_name": "z.png", "height": 20, "width": 30},
        ],
        "categories": [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 2,
                "category_id": 7,
                "iscrowd": 0,
                "segmentation": [[2, 2, 12, 2, 12, 10, 2, 10]],
            },
            {"id": 2, "image_id": 2, "category_id": 3, "iscrowd": 0, "segmentation": rle},
            {"id": 3, "image_id": 2, "category_id": 3, "iscrowd": 1, "segmentation": rle},
            {"id": 4, "image_id": 9, "category_id": 3, "iscrowd": 1, "segmentation": rle},
        ],
    }
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(coco))
    train = CocoDataset(ann, root, Augment(20, 30))
    assert train.cat_ids == [3, 7] and train.num_classes == 2
    assert len(train) == 1  # y: no annotation; z: crowd only
    t = train[0]["target"]
    assert t["labels"].tolist() == [1, 0]
    np.testing.assert_array_equal(t["boxes"][1].numpy(), [2, 1, 7, 5])
    assert t["masks"][1].sum() == 20 and "seeds" not in t
    evaluation = CocoDataset(ann, root, Augment(20, 30), train=False, with_masks=False)
    assert [evaluation[i]["info"]["image_id"] for i in range(3)] == [2, 5, 9]
    assert evaluation[0]["target"]["masks"].shape[0] == 0
    subset = CocoDataset(ann, root, Augment(20, 30), train=False, image_ids=[9])
    assert len(subset) == 1 and subset[0]["target"]["masks"].shape[0] == 0
