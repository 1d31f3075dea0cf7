"""Training augmentation: 2D with albumentations, 3D patches on the loader's CPU workers."""
