"""Albumentations pipelines built from the data config (the project's only albumentations import).

Geometric transforms (flips, rotation, scaling, elastic, cropping) go through one ``A.Compose``
called as ``t(image=..., mask=...)``, so the mask moves with the image (nearest-neighbour for the
mask). Intensity transforms touch the image only and expect the [0, 1] range that
``pipeline.data.normalization.to_unit`` produces.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check at import

import albumentations as A
import cv2
import numpy as np


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation settings; each ``*_p`` is the probability of that transform.

    Args:
        enabled: False turns all training augmentation off (cropping to ``patch_size`` stays).
        flip_p: probability of each of the horizontal and the vertical flip.
        affine_p: probability of a random rotation + isotropic scaling.
        rotate_limit: rotation range +-degrees.
        scale_range: scaling factor range (zoom out < 1 < zoom in).
        elastic_p, elastic_alpha, elastic_sigma: elastic deformation (displacement scale in px,
            smoothing sigma in px).
        brightness_contrast_p, brightness_limit, contrast_limit: additive brightness and
            multiplicative contrast change, as fractions of the [0, 1] range.
        gamma_p, gamma_range: gamma correction x**g, g drawn from ``gamma_range``.
        noise_p, noise_std: additive Gaussian noise, std drawn from ``noise_std`` (unit range).
        elastic_3d_p: probability of the elastic deformation of a 3D patch (``elastic_p`` is the 2D
            one), with ``elastic_alpha`` and ``elastic_sigma`` in voxels. Off by default, as in
            nnU-Net's 3D training: the same settings move voxels less in 3D (displacement std 1 px
            in 2D, 0.28 voxel in 3D at the values above; ``pipeline.data.augment.voxel_grid.elastic_displacement``),
            and it costs about as much as the rest of the patch's augmentation.
        lowres_p, lowres_range: simulated low resolution (nnU-Net's values, in 2D and 3D): the
            image is resampled linearly to a factor drawn from ``lowres_range`` (in (0, 1]) of its
            size and back, so a scan acquired at a coarser resolution is not new to the network
            (in-plane only for anisotropic 3D patches).
        anisotropy_threshold: a 3D patch whose in-plane size exceeds this many times its size
            along the slice axis is treated as anisotropic (nnU-Net's rule and value): rotation,
            scaling and elastic displacement act in-plane only, never across thick slices.

    One class configures both paths (``data.augmentation``). In 3D
    (``pipeline.data.augment.transforms3d``) flips apply to each of the three axes, ``affine_p``,
    ``rotate_limit`` (about every axis) and ``scale_range`` to the patch, and the intensity
    settings as in 2D.
    """

    enabled: bool = True
    flip_p: float = 0.5
    affine_p: float = 0.5
    rotate_limit: float = 20.0
    scale_range: tuple[float, float] = (0.85, 1.2)
    elastic_p: float = 0.2
    elastic_alpha: float = 30.0
    elastic_sigma: float = 5.0
    brightness_contrast_p: float = 0.3
    brightness_limit: float = 0.15
    contrast_limit: float = 0.15
    gamma_p: float = 0.3
    gamma_range: tuple[float, float] = (0.75, 1.33)
    noise_p: float = 0.2
    noise_std: tuple[float, float] = (0.01, 0.04)
    elastic_3d_p: float = 0.0
    lowres_p: float = 0.25
    lowres_range: tuple[float, float] = (0.5, 1.0)
    anisotropy_threshold: float = 3.0

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if name.endswith("_p") and not 0.0 <= value <= 1.0:
                raise ValueError(f"augmentation.{name} is a probability in [0, 1], got {value}")
        for name, ceiling in (("scale_range", math.inf), ("gamma_range", math.inf), ("lowres_range", 1.0)):
            low, high = getattr(self, name)
            if not 0.0 < low <= high <= ceiling:
                bound = "" if ceiling == math.inf else f" <= {ceiling:g}"
                raise ValueError(
                    f"augmentation.{name} is [low, high] with 0 < low <= high{bound}, got {[low, high]}"
                )
        if self.anisotropy_threshold < 1.0:
            raise ValueError(
                f"augmentation.anisotropy_threshold is a size ratio >= 1 (e.g. nnU-Net's 3.0), "
                f"got {self.anisotropy_threshold}"
            )


class ClassBalancedCrop(A.CropNonEmptyMaskIfExists):
    """A ``height`` x ``width`` crop that holds a pixel of a foreground class drawn uniformly.

    The class is the call's ``crop_class`` when the mask shows it (the class a
    ``ForegroundSampler`` drew), else drawn uniformly among the mask's non-zero labels; then a
    pixel of it, as nnU-Net does for its foreground patches: drawing a pixel of any class (the
    parent's rule) picks classes in proportion to their area, so a 2 px vessel tree or a small
    lesion beside a large organ rarely lands in the patch. A mask without foreground gives a
    random crop. Input: mask (H, W) class indices.
    """

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        mask = self._preprocess_mask(data["mask"])
        labels = np.flatnonzero(np.bincount(mask.ravel()))
        labels = labels[labels != 0].tolist()
        if not labels:
            return super().get_params_dependent_on_data(params, data)
        wanted = data.get("crop_class")
        label = wanted if wanted in labels else self.py_random.choice(labels)
        # the parent's crop around a random non-zero pixel, of a mask holding only that class
        only_label = {**data, "mask": (mask == label).astype(np.uint8)}
        return super().get_params_dependent_on_data(params, only_label)


class SimulateLowResolution(A.ImageOnlyTransform):
    """Linear resize to a factor drawn from ``scale_range`` of the image size, and back.

    Albumentations' ``Downscale`` rounds float images to 8 bits on the way; this keeps float32.
    Input/output: image (H, W, C) float32.
    """

    def __init__(self, scale_range: tuple[float, float] = (0.5, 1.0), p: float = 0.25) -> None:
        super().__init__(p=p)
        self.scale_range = scale_range

    def get_params(self) -> dict:
        return {"scale": self.py_random.uniform(*self.scale_range)}

    def apply(self, img: np.ndarray, scale: float, **params: object) -> np.ndarray:
        h, w = img.shape[:2]
        small = cv2.resize(
            img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_LINEAR
        )
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR).reshape(img.shape)


def _crop(patch_size: tuple[int, int] | None, foreground: bool = False) -> list[A.BasicTransform]:
    if patch_size is None:
        return []
    h, w = patch_size
    crop = ClassBalancedCrop(height=h, width=w) if foreground else A.RandomCrop(height=h, width=w)
    return [
        A.PadIfNeeded(min_height=h, min_width=w, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0),
        crop,
    ]


def build_train_transform(
    aug: Augmentation, patch_size: tuple[int, int] | None = None, foreground_crop: bool = False
) -> A.Compose:
    """Random geometric and intensity transforms, then a random ``patch_size`` crop if given.

    ``foreground_crop`` places the crop around a pixel of a randomly drawn foreground class (for
    samples drawn to show foreground; ``ClassBalancedCrop``). Input/output: image (H, W, C)
    float32 in [0, 1], mask (H, W) uint8.
    """
    if not aug.enabled:
        return A.Compose(_crop(patch_size, foreground_crop))
    geometric = [
        A.HorizontalFlip(p=aug.flip_p),
        A.VerticalFlip(p=aug.flip_p),
        A.Affine(
            rotate=(-aug.rotate_limit, aug.rotate_limit),
            scale=aug.scale_range,
            border_mode=cv2.BORDER_REFLECT_101,
            p=aug.affine_p,
        ),
        A.ElasticTransform(
            alpha=aug.elastic_alpha,
            sigma=aug.elastic_sigma,
            border_mode=cv2.BORDER_REFLECT_101,
            p=aug.elastic_p,
        ),
    ]
    intensity = [
        SimulateLowResolution(aug.lowres_range, p=aug.lowres_p),
        # gamma before brightness and noise: it needs non-negative input, which they do not keep
        A.RandomGamma(gamma_limit=(aug.gamma_range[0] * 100, aug.gamma_range[1] * 100), p=aug.gamma_p),
        A.RandomBrightnessContrast(
            brightness_limit=aug.brightness_limit,
            contrast_limit=aug.contrast_limit,
            p=aug.brightness_contrast_p,
        ),
        A.GaussNoise(std_range=aug.noise_std, p=aug.noise_p),
    ]
    return A.Compose([*geometric, *_crop(patch_size, foreground_crop), *intensity])


def build_eval_transform() -> A.Compose:
    """Evaluation sees whole images, unchanged."""
    return A.Compose([])
