import numpy as np
import pytest
import torch

from pipeline.data.augment.transforms2d import Augmentation, build_eval_transform, build_train_transform
from pipeline.data.loading.datasets import CaseArrays, SliceDataset
from pipeline.data.loading.sampling import EvalBatches, ForegroundSampler
from pipeline.data.normalization import Normalization, fit_intensity


def test_sampling_forces_the_foreground_fraction_deterministically():
    class_items = {1: np.arange(0, 3000, 10)}  # 10 % of the slices show foreground
    sampler = ForegroundSampler(3000, class_items, fraction=1 / 3, seed=4)
    draws = list(sampler)
    assert len(draws) == len(sampler) == 3000
    forced = [i for i, label in draws if label]
    assert abs(len(forced) / 3000 - 1 / 3) < 0.03 and all(i % 10 == 0 for i in forced)
    shown = np.mean([i % 10 == 0 for i, _ in draws])
    assert shown > 0.37  # 1/3 forced + 10 % of the uniform rest
    assert list(sampler) == draws  # same seed and epoch: same draws
    sampler.set_epoch(1)
    assert list(sampler) != draws
    assert list(ForegroundSampler(3000, class_items, 1 / 3, seed=4)) == draws


def test_sampling_forced_draws_pick_the_class_first():
    # an organ in 90 slices, a lesion in 3 of them: a draw among foreground slices would show the
    # lesion 3 times in 90, a class-first draw half the time
    class_items = {1: np.arange(10, 100), 2: np.array([40, 41, 42])}
    draws = list(ForegroundSampler(3000, class_items, fraction=1.0, seed=0))
    labels = np.array([label for _, label in draws])
    assert set(labels.tolist()) == {1, 2} and 0.45 < np.mean(labels == 2) < 0.55
    assert all(i in class_items[label] for i, label in draws)
    assert {i for i, label in draws if label == 2} == {40, 41, 42}


def test_sampling_without_fraction_is_a_permutation():
    draws = list(ForegroundSampler(20, {1: np.arange(0, 20, 2)}, fraction=0.0, seed=0))
    assert sorted(i for i, _ in draws) == list(range(20)) and not any(label for _, label in draws)
    draws = list(ForegroundSampler(5, {}, fraction=1.0, seed=0))  # no foreground: stays uniform
    assert sorted(i for i, _ in draws) == list(range(5))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        ForegroundSampler(1, {1: [0]}, fraction=1.5)


def _case(case_id, slices, size, lesion_at=None):
    image = np.zeros((slices, *size, 1), np.float32)
    mask = np.zeros((slices, *size), np.uint8)
    if lesion_at is not None:
        s, y, x = lesion_at
        mask[s, y : y + 3, x : x + 3] = 1
        image[mask > 0] = 1.0
    return CaseArrays(case_id, image, mask, fit_intensity(image, Normalization("none")), is_volume=True)


def test_sampling_foreground_draws_crop_around_foreground():
    case = _case("a", 2, (96, 96), lesion_at=(1, 80, 5))
    aug = Augmentation(enabled=False)
    dataset = SliceDataset(
        [case],
        build_train_transform(aug, (16, 16)),
        foreground_transform=build_train_transform(aug, (16, 16), foreground_crop=True),
    )
    assert {k: v.tolist() for k, v in dataset.class_items().items()} == {1: [1]}
    assert all(dataset[(1, 1)]["mask"].sum() > 0 for _ in range(20))
    assert dataset[(1, 0)]["mask"].shape == (16, 16)
    random_hits = sum(dataset[(1, 0)]["mask"].sum() > 0 for _ in range(40))
    assert random_hits < 20  # a random 16x16 crop of 96x96 rarely holds the 3x3 lesion


def test_sampling_foreground_crop_draws_the_class_first():
    # a 60x60 organ (3600 px) and a 2x2 lesion (4 px) far from it: a pixel-weighted draw centres
    # the lesion about once in 900 crops, a class-first draw in about half of them
    mask = np.zeros((128, 128), np.uint8)
    mask[4:64, 4:64] = 1
    mask[120:122, 120:122] = 2
    image = np.zeros((128, 128, 1), np.float32)
    crop = build_train_transform(Augmentation(enabled=False), (16, 16), foreground_crop=True)
    crop.set_random_seed(0)
    crops = [crop(image=image, mask=mask)["mask"] for _ in range(400)]
    assert all(c.shape == (16, 16) and c.any() for c in crops)
    lesion = np.mean([(c == 2).any() for c in crops])
    organ = np.mean([(c == 1).any() for c in crops])
    assert 0.4 < lesion < 0.6 and 0.4 < organ < 0.6
    assert all((crop(image=image, mask=mask, crop_class=2)["mask"] == 2).any() for _ in range(50))
    absent = [crop(image=image, mask=mask, crop_class=3)["mask"] for _ in range(50)]  # not shown: drawn
    assert all(c.any() for c in absent)
    empty = crop(image=image, mask=np.zeros_like(mask))["mask"]  # no foreground: a random crop
    assert empty.shape == (16, 16)


def test_sampling_eval_batches_never_mix_slice_sizes():
    cases = [_case("a", 3, (8, 8)), _case("b", 5, (6, 10)), _case("c", 1, (8, 8))]
    batches = EvalBatches(SliceDataset(cases, build_eval_transform()), batch_size=2)
    sizes = [tuple(batches[i]["image"].shape) for i in range(len(batches))]
    assert sizes == [(2, 1, 8, 8), (1, 1, 8, 8), (2, 1, 6, 10), (2, 1, 6, 10), (1, 1, 6, 10), (1, 1, 8, 8)]
    assert batches[2]["case_id"] == ["b", "b"] and batches[2]["slice_index"].tolist() == [0, 1]


def test_sampling_an_epoch_of_fixed_length_repeats_whole_permutations():
    draws = list(ForegroundSampler(7, {}, fraction=0.0, seed=0, draws=20))  # 250 steps x batch on 7 items
    indices = [i for i, _ in draws]
    assert len(draws) == 20 and sorted(indices[:7]) == sorted(indices[7:14]) == list(range(7))
    assert len(list(ForegroundSampler(100, {}, 0.0, seed=0, draws=10))) == 10  # or fewer than a pass


def test_sampling_3d_patches_are_class_first_and_hold_the_drawn_class(mixed_volume_dir, tmp_path):
    from pipeline.data.datamodule import SegmentationDataModule
    from pipeline.data.planning.planner import NetworkRequest

    dm = SegmentationDataModule(root=str(mixed_volume_dir), cache_dir=str(tmp_path), num_workers=0)
    dm.resolve_plan(NetworkRequest(spatial_dims=3))
    dm.setup("fit")
    train = dm.datasets["train"]
    assert len(dm.patch_size) == 3 and set(train.class_items()) == {1, 2}
    sampler = ForegroundSampler(len(train), train.class_items(), fraction=1.0, seed=0, draws=12)
    for index, label in sampler:
        sample = train[(index, label)]
        assert sample["image"].shape == (1, *dm.patch_size) and (sample["mask"] == label).any()


def test_sampling_whole_case_items_are_writable_uint8_without_warnings(mixed_volume_dir, tmp_path):
    # validation reads whole cases from the cache's read-only memory maps: each item is its own
    # array (torch warns on a tensor over a read-only one, once per run, in every volume fit)
    import warnings

    from pipeline.data.datamodule import SegmentationDataModule
    from pipeline.data.planning.planner import NetworkRequest

    dm = SegmentationDataModule(root=str(mixed_volume_dir), cache_dir=str(tmp_path), num_workers=0)
    dm.resolve_plan(NetworkRequest(spatial_dims=3))
    dm.setup("fit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        item = dm.datasets["val"][0]
    assert item["mask"].dtype == torch.uint8 and item["mask"].numpy().flags.writeable
    assert item["mask"].shape == item["image"].shape[1:]
