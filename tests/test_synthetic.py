import json

import numpy as np
from scipy import ndimage

from pipeline.data.synthesis.phantoms_2d import CLASS_NAMES, generate_dataset, phantom


def test_phantom_is_deterministic_for_a_seed():
    a_img, a_mask = phantom(seed=3, index=5, size=64)
    b_img, b_mask = phantom(seed=3, index=5, size=64)
    c_img, _ = phantom(seed=4, index=5, size=64)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask)
    assert not np.array_equal(a_img, c_img)


def test_phantom_has_every_class_across_a_small_set():
    masks = [phantom(0, i, 96)[1] for i in range(6)]
    present = set(np.unique(np.stack(masks)).tolist())
    assert present == set(range(len(CLASS_NAMES)))
    assert all(m.dtype == np.uint8 and m.shape == (96, 96) for m in masks)


def test_phantom_vessels_are_thin_tubes():
    for i in range(4):
        _, mask = phantom(0, i, 128)
        vessel = mask == 3
        assert vessel.sum() > 50
        # distance to the nearest non-vessel pixel: <= 2 px means at most ~3 px wide (crossings aside)
        depth = ndimage.distance_transform_edt(vessel)[vessel]
        assert np.mean(depth <= 2.0) > 0.98
        assert np.mean(depth <= 1.0) > 0.5  # most of the tube is 1-2 px from its edge
        # and they are long: the largest connected piece spans far more than its width
        labels, _ = ndimage.label(vessel, structure=np.ones((3, 3)))
        sizes = np.bincount(labels.ravel())[1:]
        assert sizes.max() > 40


def test_generate_dataset_writes_folder_layout(tmp_path):
    out = generate_dataset(tmp_path / "syn", num_images=3, size=48, seed=1)
    images = sorted(p.name for p in (out / "images").iterdir())
    masks = sorted(p.name for p in (out / "masks").iterdir())
    assert images == masks == ["phantom_0.png", "phantom_1.png", "phantom_2.png"]
    assert json.loads((out / "classes.json").read_text()) == {str(i): n for i, n in enumerate(CLASS_NAMES)}
