"""The 2D albumentations pipeline's own transforms."""

from __future__ import annotations

import numpy as np

from pipeline.data.augment.transforms2d import Augmentation, build_train_transform

ONLY_LOWRES = dict(
    flip_p=0.0, affine_p=0.0, elastic_p=0.0, brightness_contrast_p=0.0, gamma_p=0.0, noise_p=0.0, lowres_p=1.0
)


def test_simulated_low_resolution_blurs_the_image_in_float_and_leaves_the_mask() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((40, 40, 2)).astype(np.float32)  # pixel noise: any resampling changes it
    mask = (rng.random((40, 40)) > 0.5).astype(np.uint8)
    transform = build_train_transform(Augmentation(**ONLY_LOWRES, lowres_range=(0.5, 0.6)))
    out = transform(image=image, mask=mask)
    assert out["image"].dtype == np.float32 and out["image"].shape == image.shape
    assert np.array_equal(out["mask"], mask)
    assert out["image"].std() < 0.8 * image.std()  # a linear resize to half and back averages pixels
    assert len(np.unique(out["image"])) > 256  # not rounded to 8 bits (albumentations' Downscale does)
    assert out["image"].min() >= 0.0 and out["image"].max() <= 1.0
    untouched = build_train_transform(Augmentation(**{**ONLY_LOWRES, "lowres_p": 0.0}))
    assert np.array_equal(untouched(image=image, mask=mask)["image"], image)
