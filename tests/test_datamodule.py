import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.augment.transforms2d import Augmentation
from pipeline.data.datamodule import SegmentationDataModule, make_split
from pipeline.errors import DataError
from pipeline.files import write_json

NO_INTENSITY = dict(brightness_contrast_p=0.0, gamma_p=0.0, noise_p=0.0, lowres_p=0.0, elastic_p=0.0)


def test_datamodule_samples_follow_the_data_contract(phantom_dir):
    dm = SegmentationDataModule(root=str(phantom_dir), batch_size=4, num_workers=0)
    dm.setup("fit")
    assert dm.class_names == ["background", "organ", "lesion", "vessel"] and dm.in_channels == 1
    sample = dm.datasets["train"][0]
    assert set(sample) == {"image", "mask", "case_id", "slice_index", "index"} and sample["index"] == 0
    assert sample["image"].dtype == torch.float32 and sample["image"].shape == (1, 64, 64)
    assert sample["mask"].dtype == torch.int64 and sample["mask"].shape == (64, 64)
    assert sample["slice_index"] == -1 and sample["case_id"].startswith("phantom_")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 64, 64) and batch["mask"].shape == (4, 64, 64)
    assert len(batch["case_id"]) == 4


def test_eval_images_are_zscored_per_case(phantom_dir):
    dm = SegmentationDataModule(root=str(phantom_dir), num_workers=0)
    dm.setup("fit")
    image = dm.datasets["val"][0]["image"]
    assert abs(image.mean().item()) < 1e-4 and abs(image.std(unbiased=False).item() - 1) < 1e-3


def test_split_is_by_case_seeded_and_written(phantom_dir, tmp_path):
    dm = SegmentationDataModule(root=str(phantom_dir), val_fraction=0.25, seed=7, num_workers=0)
    dm.setup("fit")
    assert not set(dm.split["train"]) & set(dm.split["val"])
    assert len(dm.split["val"]) == 3 and len(dm.split["train"]) == 9
    write_json(tmp_path / "split.json", dm.split)  # as RunSummary writes the run's split.json
    again = SegmentationDataModule(
        root=str(phantom_dir), split_file=str(tmp_path / "split.json"), num_workers=0
    )
    again.setup("fit")
    assert again.split["val"] == dm.split["val"]
    other = make_split(dm.split["train"] + dm.split["val"], 0.25, 0.0, seed=8)
    assert other["val"] != dm.split["val"]


def test_training_draws_follow_the_run_seed_and_the_split_does_not(phantom_dir, monkeypatch):
    def first_epoch(run_seed: int) -> tuple[dict, list[str], torch.Tensor]:
        monkeypatch.setenv("PL_GLOBAL_SEED", str(run_seed))  # what seed_everything sets
        dm = SegmentationDataModule(root=str(phantom_dir), batch_size=4, num_workers=0, seed=3)
        dm.setup("fit")
        batches = list(dm.train_dataloader())
        return dm.split, [c for b in batches for c in b["case_id"]], batches[0]["image"]

    split0, order0, image0 = first_epoch(0)
    split1, order1, image1 = first_epoch(1)
    again = first_epoch(0)
    assert split0 == split1  # the same cases for every seed of a variant
    assert order0 != order1 or not torch.equal(image0, image1)
    assert again[1] == order0 and torch.equal(again[2], image0)


def test_kfold_validation_sets_partition_the_cases():
    ids = [f"c{i}" for i in range(10)]
    folds = [make_split(ids, 0.2, 0.0, seed=0, num_folds=5, fold=k)["val"] for k in range(5)]
    assert sorted(cid for fold in folds for cid in fold) == sorted(ids)


@pytest.mark.parametrize("transform", [dict(flip_p=1.0, affine_p=0.0), dict(flip_p=0.0, affine_p=1.0)])
def test_mask_stays_aligned_with_image_under_geometric_augmentation(tmp_path, transform):
    # image intensity is a function of the mask, so after any geometric transform they must agree
    rng = np.random.default_rng(0)
    mask = np.zeros((64, 64), np.uint8)
    mask[10:30, 5:25] = 1
    mask[40:60, 30:62] = 2
    mask[5:55, 45:48] = 1
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(4):
        m = np.roll(mask, 3 * i, axis=int(rng.integers(2)))
        Image.fromarray((m * 100 + 20).astype(np.uint8)).save(tmp_path / "images" / f"c{i}.png")
        Image.fromarray(m).save(tmp_path / "masks" / f"c{i}.png")
    aug = Augmentation(**NO_INTENSITY, **transform)
    dm = SegmentationDataModule(
        root=str(tmp_path), class_names=["bg", "a", "b"], augmentation=aug, num_workers=0, val_fraction=0.25
    )
    dm.setup("fit")
    torch.manual_seed(0)
    np.random.seed(0)
    for i in range(len(dm.datasets["train"])):
        sample = dm.datasets["train"][i]
        image, target = sample["image"][0].numpy(), sample["mask"].numpy()
        levels = np.array([image[target == k].mean() for k in range(3)])
        predicted = np.abs(image[..., None] - levels).argmin(-1)
        assert (predicted == target).mean() > 0.97
        assert len(np.unique(target)) == 3


def _copy(phantom_dir, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(phantom_dir, root)
    return root


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataError, match=r"images: no images found"):
        SegmentationDataModule(root=str(tmp_path), class_names=["bg", "fg"])


def test_image_without_mask_names_the_image(phantom_dir, tmp_path):
    root = _copy(phantom_dir, tmp_path)
    (root / "masks" / "phantom_03.png").unlink()
    with pytest.raises(DataError, match=r"phantom_03\.png: no mask named phantom_03"):
        SegmentationDataModule(root=str(root))


def test_mask_of_another_size_names_the_mask(phantom_dir, tmp_path):
    root = _copy(phantom_dir, tmp_path)
    Image.fromarray(np.zeros((32, 64), np.uint8)).save(root / "masks" / "phantom_05.png")
    dm = SegmentationDataModule(root=str(root), num_workers=0, val_fraction=0.5)
    with pytest.raises(
        DataError, match=r"masks/phantom_05\.png: mask size \(32, 64\) differs from image size"
    ):
        dm.setup("fit")


def test_label_outside_the_classes_names_the_mask(phantom_dir, tmp_path):
    root = _copy(phantom_dir, tmp_path)
    bad = np.zeros((64, 64), np.uint8)
    bad[0, 0] = 9
    Image.fromarray(bad).save(root / "masks" / "phantom_07.png")
    dm = SegmentationDataModule(root=str(root), num_workers=0, val_fraction=0.5)
    with pytest.raises(DataError, match=r"phantom_07\.png: label value\(s\) \[9\] not in the classes 0\.\.3"):
        dm.setup("fit")


def test_missing_class_names_say_how_to_fix(phantom_dir, tmp_path):
    root = _copy(phantom_dir, tmp_path)
    (root / "classes.json").unlink()
    with pytest.raises(DataError, match="classes.json.*data.class_names"):
        SegmentationDataModule(root=str(root))


def test_class_names_file_must_list_indices(tmp_path):
    from pipeline.data.reading.layouts import read_class_names

    (tmp_path / "c.json").write_text(json.dumps({"0": "bg", "2": "x"}))
    with pytest.raises(DataError, match="class indices must be 0..1"):
        read_class_names(tmp_path / "c.json")


def test_datamodule_auto_workers_share_the_cores_among_devices(monkeypatch):
    from pipeline import parallel
    from pipeline.data import datamodule

    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert datamodule.auto_workers(1) == 16  # capped
    assert datamodule.auto_workers(4) == 8
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert datamodule.auto_workers(1) == 2 and datamodule.auto_workers(8) == 1


@pytest.mark.parametrize("spacing", [[1.0], [1.0, 1.0], [1.0, 1.0, 0.0]])
def test_datamodule_refuses_a_target_spacing_that_is_not_three_positive_values(phantom_dir, spacing):
    # one value used to be applied to every axis by numpy and failed only when a checkpoint was written
    with pytest.raises(ValueError, match=r"target_spacing must be 3 positive mm values"):
        SegmentationDataModule(root=str(phantom_dir), target_spacing=spacing)
