"""3D patch augmentation: geometry follows the mask, seeding, bounded reads, foreground crops."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pipeline.data.augment.transforms2d import Augmentation
from pipeline.data.augment.transforms3d import PatchAugmenter3D, class_locations
from pipeline.data.augment.voxel_grid import (
    elastic_displacement,
    nearest_gather,
    resize_linear,
    sample_linear,
)
from pipeline.data.normalization import IntensityStats, Normalization, fit_intensity, standardize, to_unit

# to_unit and standardize are the identity for an image already in [0, 1]
UNIT = IntensityStats(*(np.array([v], float) for v in (0.0, 1.0, 0.0, 1.0)))
NO_INTENSITY = dict(brightness_contrast_p=0.0, gamma_p=0.0, noise_p=0.0, lowres_p=0.0)
GEOMETRIC = Augmentation(flip_p=0.5, affine_p=1.0, rotate_limit=30.0, scale_range=(0.8, 1.25), **NO_INTENSITY)


def _phantom(shape: tuple[int, int, int] = (40, 64, 64)) -> tuple[np.ndarray, np.ndarray]:
    """An (S, H, W, 1) image whose intensity encodes the (S, H, W) mask: 0.25, 0.5, 0.75 for 0, 1, 2."""
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    mask = np.zeros(shape, np.uint8)
    for label, centre, radius in ((1, (0.5, 0.5, 0.5), 0.35), (2, (0.45, 0.4, 0.6), 0.15)):
        inside = (
            sum(((g - c * n) / (radius * n)) ** 2 for g, c, n in zip(grid, centre, shape, strict=True)) <= 1
        )
        mask[inside] = label
    return (mask * 0.25 + 0.25).astype(np.float32)[..., None], mask


def _labels_from_image(image: np.ndarray) -> np.ndarray:
    return np.digitize(image[0], [0.375, 0.625])  # outside the volume (0) reads as background


class Recording:
    """An array that records the index of every read."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.shape, self.reads = array, array.shape, []

    def __getitem__(self, index):
        self.reads.append(index)
        return self.array[index]


@pytest.mark.parametrize(
    "aug, patch",
    [
        (GEOMETRIC, (21, 33, 31)),
        (Augmentation(**{**vars(GEOMETRIC), "elastic_3d_p": 1.0, "elastic_alpha": 400.0}), (20, 32, 32)),
        (GEOMETRIC, (5, 40, 40)),  # anisotropic: in-plane only
    ],
)
def test_patch_augmenter_mask_moves_with_image(aug: Augmentation, patch: tuple[int, int, int]) -> None:
    image, mask = _phantom()
    augment = PatchAugmenter3D(aug)
    for seed in range(4):
        augment.set_random_seed(seed)
        out, labels = augment(image, mask, UNIT, patch, center=(20, 30, 34))
        agree = _labels_from_image(out) == labels
        border = ndimage.grey_dilation(labels, 3) != ndimage.grey_erosion(labels, 3)
        assert set(np.unique(labels).tolist()) == {0, 1, 2}
        assert agree[~border].mean() > 0.99 and agree.mean() > 0.97


def test_patch_augmenter_same_seed_same_patch() -> None:
    image, mask = _phantom()
    augment = PatchAugmenter3D(Augmentation(elastic_3d_p=0.5, lowres_p=0.5))
    patches = []
    for seed in (3, 3, 4):
        augment.set_random_seed(seed)
        patches.append(augment(image, mask, UNIT, (16, 24, 24)))
    (a, ma), (b, mb), (c, _) = patches
    assert np.array_equal(a, b) and np.array_equal(ma, mb)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("patch", [(7, 9, 11), (5, 17, 13), (45, 71, 67)])  # the last exceeds the volume
def test_patch_augmenter_shapes_and_dtypes(enabled: bool, patch: tuple[int, int, int]) -> None:
    image, mask = _phantom()
    image = np.concatenate([image, 1 - image], axis=-1)  # two channels
    stats = IntensityStats(*(np.array([v, v], float) for v in (0.0, 1.0, 0.0, 1.0)))
    out, labels = PatchAugmenter3D(Augmentation(enabled=enabled, elastic_3d_p=0.5))(image, mask, stats, patch)
    assert out.shape == (2, *patch) and out.dtype == np.float32 and out.flags.c_contiguous
    assert labels.shape == patch and labels.dtype == np.int64 and labels.flags.c_contiguous


def test_patch_augmenter_pads_outside_the_volume() -> None:
    image, mask = np.full((10, 20, 20, 1), 0.75, np.float32), np.ones((10, 20, 20), np.uint8)
    out, labels = PatchAugmenter3D(Augmentation(enabled=False))(
        image, mask, UNIT, (8, 12, 12), center=(1, 2, 19)
    )
    assert np.array_equal(labels[3:, 4:, :7], np.ones((5, 8, 7))) and labels.sum() == 5 * 8 * 7
    assert np.array_equal(out[0] == 0.75, labels == 1) and (out[0][labels == 0] == 0).all()
    augment = PatchAugmenter3D(GEOMETRIC)
    for seed in range(3):  # resampled: outside is background too, the image's lower bound
        augment.set_random_seed(seed)
        out, labels = augment(image, mask, UNIT, (8, 12, 12), center=(0, 0, 0))
        outside = labels == 0
        assert 0.2 < outside.mean() < 0.95
        assert (out[0][outside] < 0.375).mean() > 0.95 and (out[0][~outside] > 0.375).mean() > 0.95


def test_patch_augmenter_reads_only_the_box(tmp_path) -> None:
    volume, mask = _phantom((60, 200, 200))
    np.save(tmp_path / "image.npy", volume)
    image = Recording(np.load(tmp_path / "image.npy", mmap_mode="r"))
    labels = Recording(mask)
    patch = (16, 32, 32)
    plain = PatchAugmenter3D(Augmentation(enabled=False))
    plain(image, labels, UNIT, patch, center=(30, 100, 100))
    assert [tuple(s.stop - s.start for s in read) for read in image.reads + labels.reads] == [patch, patch]
    augment = PatchAugmenter3D(Augmentation(affine_p=1.0, rotate_limit=30.0, scale_range=(0.8, 0.8)))
    for seed in range(5):
        image.reads.clear()
        augment.set_random_seed(seed)
        augment(image, labels, UNIT, patch, center=(30, 100, 100))
        (read,) = image.reads
        sides = np.array([s.stop - s.start for s in read])
        # the bounding box of the rotated, zoomed-out patch: at most its diagonal / 0.8 a side
        assert (sides <= np.linalg.norm(patch) / 0.8 + 2).all() and np.prod(sides) < 20 * np.prod(patch)
        assert labels.reads[-1] == read


def test_patch_augmenter_anisotropic_patches_rotate_in_plane_only() -> None:
    mask = np.repeat(np.arange(1, 4, dtype=np.uint8), 4)[:, None, None] * np.ones((1, 128, 128), np.uint8)
    image = (mask * 0.25).astype(np.float32)[..., None]  # a label per slab of 4 slices along axis 0
    aug = Augmentation(
        flip_p=0.5, affine_p=1.0, rotate_limit=45.0, elastic_3d_p=1.0, elastic_alpha=400.0, **NO_INTENSITY
    )
    augment = PatchAugmenter3D(aug)
    for seed in range(5):
        augment.set_random_seed(seed)
        out, labels = augment(image, mask, UNIT, (6, 32, 32), center=(6, 64, 64))
        for s in range(6):  # each output slice is one source slice, rotated and deformed in-plane
            assert len(np.unique(labels[s])) == 1 and labels[s, 0, 0] > 0
            assert np.ptp(out[0, s]) < 1e-6
    augment.set_random_seed(0)  # a near-isotropic patch of the same volume mixes slabs in a slice
    _, labels = augment(image, mask, UNIT, (6, 12, 12), center=(6, 64, 64))
    assert max(len(np.unique(labels[s])) for s in range(6)) > 1


def test_patch_augmenter_foreground_crop_contains_the_class() -> None:
    _, mask = _phantom((40, 80, 80))
    mask[1:4, 2:5, 75:78] = 3  # a small lesion in a corner of the volume
    mask[20, 20, 60] = 4  # one voxel inside
    image = (mask / 4).astype(np.float32)[..., None]
    locations = class_locations(mask)
    augment = PatchAugmenter3D(Augmentation(affine_p=0.5, elastic_3d_p=1.0, elastic_alpha=400.0))
    places = set()
    for seed in range(90):
        augment.set_random_seed(seed)
        label = (2, 3, 4)[seed % 3]
        centre = augment.draw_center(locations[label])
        _, labels = augment(image, mask, UNIT, (16, 24, 24), centre, crop_class=label)
        assert (labels == label).any()
        if label == 4:
            places.add(tuple(np.argwhere(labels == 4)[0]))
    assert len(places) > 10  # not always in the middle of the patch


def test_patch_augmenter_random_crops_lie_inside_the_volume() -> None:
    image, mask = _phantom()
    augment = PatchAugmenter3D(Augmentation(flip_p=0.0, affine_p=0.0, **NO_INTENSITY))
    starts = set()
    for seed in range(20):
        augment.set_random_seed(seed)
        out, _ = augment(image, mask, UNIT, (9, 50, 17))
        assert out.min() == 0.25  # the volume's background: nothing padded
        starts.add(out.tobytes())
    assert len(starts) > 15


def test_patch_augmenter_standardizes_a_raw_memory_map(tmp_path) -> None:
    rng = np.random.default_rng(0)
    np.save(tmp_path / "image.npy", rng.integers(-1000, 2000, (12, 30, 30, 1)).astype(np.int16))
    image = np.load(tmp_path / "image.npy", mmap_mode="r")
    mask = np.zeros((12, 30, 30), np.uint8)
    stats = fit_intensity(np.asarray(image), Normalization("ct", window=(-500, 500)))
    out, _ = PatchAugmenter3D(Augmentation(enabled=False), seed=1)(image, mask, stats, (8, 10, 10))
    expected = standardize(to_unit(np.asarray(image[2:10, 10:20, 10:20]), stats), stats)  # the centre
    assert np.allclose(out, np.moveaxis(expected, -1, 0), atol=1e-6)
    augment = PatchAugmenter3D(Augmentation(affine_p=1.0, noise_p=1.0, brightness_contrast_p=1.0))
    out, _ = augment(image, mask, stats, (8, 10, 10), center=(0, 0, 0))  # a corner: partly outside
    low, high = standardize(np.array([[0.0], [1.0]], np.float32), stats)[:, 0]
    assert out.min() >= low - 1e-5 and out.max() <= high + 1e-5 and np.isclose(out.min(), low)


def test_patch_augmenter_intensity_changes_the_image_only() -> None:
    image, mask = _phantom()
    plain = PatchAugmenter3D(Augmentation(enabled=False))(image, mask, UNIT, (9, 16, 16), center=(20, 32, 32))
    aug = Augmentation(
        flip_p=0.0, affine_p=0.0, brightness_contrast_p=1.0, gamma_p=1.0, noise_p=1.0, lowres_p=1.0
    )
    augment = PatchAugmenter3D(aug)
    augment.set_random_seed(0)
    out, labels = augment(image, mask, UNIT, (9, 16, 16), center=(20, 32, 32))
    assert np.array_equal(labels, plain[1]) and not np.allclose(out, plain[0])
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_class_locations_sample_each_class() -> None:
    _, mask = _phantom()
    found = class_locations(mask, max_per_class=500, seed=0)
    assert sorted(found) == [1, 2]
    for label, where in found.items():
        assert where.shape == (min(500, (mask == label).sum()), 3) and where.dtype == np.int32
        assert (mask[tuple(where.T)] == label).all()
        assert len(np.unique(where, axis=0)) == len(where)
    assert np.array_equal(class_locations(mask, 500, seed=0)[1], found[1])


def test_resize_linear_matches_scipy_zoom() -> None:
    array = np.random.default_rng(0).random((2, 7, 12, 9)).astype(np.float32)
    for shape in [(14, 5, 9), (3, 24, 10)]:
        expected = np.stack(
            [
                ndimage.zoom(a, np.divide(shape, a.shape), order=1, mode="nearest", grid_mode=True)
                for a in array
            ]
        )
        assert np.allclose(resize_linear(array, shape), expected, atol=1e-5)


def test_sample_linear_and_nearest_gather_match_map_coordinates() -> None:
    rng = np.random.default_rng(0)
    volume = rng.random((2, 5, 7, 6)).astype(np.float32)
    coords = (rng.random((3, 4, 9, 8)) * 10 - 2).astype(np.float32)  # inside and outside the volume
    expected = [
        ndimage.map_coordinates(v, coords, order=1, mode="grid-constant", cval=0.0, prefilter=False)
        for v in volume
    ]
    assert np.allclose(sample_linear(volume, coords), expected, atol=1e-5)
    labels = rng.integers(1, 4, (5, 7, 6)).astype(np.uint8)
    off_tie = np.floor(coords) + 0.25 + 0.5 * (rng.random(coords.shape) > 0.5)  # no .5: rounding agrees
    nearest = ndimage.map_coordinates(labels, off_tie, order=0, mode="grid-constant", cval=0)
    assert np.array_equal(nearest_gather(labels, off_tie.astype(np.float32)), nearest)


def test_elastic_displacement_has_the_size_of_smoothed_noise() -> None:
    rng = np.random.default_rng(0)
    field = elastic_displacement((32, 32, 32), alpha=100.0, sigma=4.0, rng=rng, axes=(1, 2))
    full = [100.0 * ndimage.gaussian_filter(rng.uniform(-1, 1, (32, 32, 32)), 4.0).std() for _ in range(4)]
    assert (field[0] == 0).all() and field.dtype == np.float32
    assert 0.75 < field[1:].std() / np.mean(full) < 1.33


@pytest.mark.parametrize(
    "setting, message",
    [
        (dict(lowres_range=(0.5, 1.5)), "lowres_range"),
        (dict(lowres_range=(0.0, 0.5)), "lowres_range"),
        (dict(scale_range=(1.2, 0.8)), "scale_range"),
        (dict(anisotropy_threshold=0.5), "anisotropy_threshold"),
        (dict(elastic_3d_p=2.0), "elastic_3d_p"),
    ],
)
def test_augmentation_rejects_bad_3d_settings(setting: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Augmentation(**setting)
