import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from pipeline.data.datamodule import SegmentationDataModule
from pipeline.data.reading.dicom import read_dicom_series
from pipeline.data.reading.formats import write_nifti_like
from pipeline.data.reading.layouts import describe
from pipeline.data.synthesis.phantoms_3d import CLASS_NAMES, generate_volumes
from pipeline.errors import DataError
from tests.helpers.dicom import axial_series


def test_layouts_msd_reads_classes_modality_and_4d_channels(tmp_path):
    root = generate_volumes(tmp_path / "msd", num_cases=3, shape=(12, 10, 6), modalities=("FLAIR", "T1w"))
    info = describe(root)
    assert info.layout == "msd" and info.class_names == CLASS_NAMES and info.modalities == ["FLAIR", "T1w"]
    assert [c.case_id for c in info.cases] == ["vol_000", "vol_001", "vol_002"]
    assert all(len(c.images) == 1 and c.mask.parent.name == "labelsTr" for c in info.cases)
    dm = SegmentationDataModule(
        root=str(root), cache_dir=str(tmp_path / "cache"), num_workers=0, val_fraction=0.34
    )
    assert dm.in_channels == 2 and dm.class_names == CLASS_NAMES
    dm.setup("fit")
    sample = dm.datasets["train"][0]
    assert sample["image"].shape == (2, 12, 10) and sample["slice_index"] >= 0


def test_layouts_nnunet_stacks_channel_files_in_order(tmp_path):
    root = generate_volumes(
        tmp_path / "nn", num_cases=2, shape=(12, 10, 6), modalities=("CT", "T2"), layout="nnunet"
    )
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "organ": 1, "lesion": 2}  # nnU-Net v2: name -> index
    info = describe(root)
    assert info.layout == "nnunet" and info.class_names == CLASS_NAMES and info.modalities == ["CT", "T2"]
    case = info.cases[0]
    assert [p.name for p in case.images] == ["vol_000_0000.nii.gz", "vol_000_0001.nii.gz"]
    dm = SegmentationDataModule(
        root=str(root), cache_dir=str(tmp_path / "cache"), num_workers=0, val_fraction=0.5
    )
    dm.setup("fit")
    # channel 0 is CT (HU: air -1000), channel 1 MR-like (air 0): the stacking order is kept
    raw = dm.datasets["train"].cases[0].image[0]
    assert raw.shape == (12, 10, 2) and raw[..., 0].min() < -900 and raw[..., 1].min() > -200
    modes = [n.mode for n in dm.channel_normalization()]
    assert modes == ["ct", "zscore"]


def test_layouts_nnunet_missing_channel_file_names_it(tmp_path):
    root = generate_volumes(
        tmp_path / "nn", num_cases=2, shape=(8, 8, 4), modalities=("T1", "T2"), layout="nnunet"
    )
    (root / "imagesTr" / "vol_001_0001.nii.gz").unlink()
    with pytest.raises(DataError, match=r"vol_001_0000\.nii\.gz: case vol_001 has channel files \[0\]"):
        describe(root)


def test_layouts_dicom_series_with_nifti_masks(tmp_path):
    root = tmp_path / "dicom"
    (root / "images").mkdir(parents=True)
    for i, case in enumerate(["p1", "p2"]):
        axial_series(root / "images" / case, [0, 5, 10])
        volume = read_dicom_series(root / "images" / case)
        labels = np.zeros(volume.array.shape[:3], np.uint8)
        labels[10:40, 20:50, 1:] = 1 + i
        write_nifti_like(labels, volume, root / "masks" / f"{case}.nii.gz")
    (root / "classes.json").write_text(json.dumps(["background", "a", "b"]))
    dm = SegmentationDataModule(
        root=str(root), cache_dir=str(tmp_path / "cache"), num_workers=0, val_fraction=0.5
    )
    assert dm.info.layout == "dicom" and dm.in_channels == 1 and dm.volumetric
    dm.setup("fit")
    assert dm.preprocessing().slice_axis == 2  # 5 mm between slices, 0.66 mm in plane
    train = dm.datasets["train"]
    masks = [train[i]["mask"] for i in range(len(train))]
    assert len(masks) == 3 and masks[0].sum() == 0 and all(m.max() >= 1 for m in masks[1:])


def test_layouts_mask_with_other_geometry_names_the_mask(volume_dir, tmp_path):
    root = tmp_path / "msd"
    shutil.copytree(volume_dir, root)
    mask_path = root / "labelsTr" / "vol_002.nii.gz"
    mask = nib.load(mask_path)
    shifted = mask.affine.copy()
    shifted[:3, 3] += [0.0, 0.0, 3.0]  # one slice off
    nib.save(nib.Nifti1Image(np.asanyarray(mask.dataobj), shifted), mask_path)
    dm = SegmentationDataModule(root=str(root), cache_dir=str(tmp_path / "cache"), num_workers=0)
    with pytest.raises(DataError, match=r"labelsTr/vol_002\.nii\.gz: mask geometry differs from its image"):
        dm.setup("fit")


def test_layouts_unknown_folder_says_what_was_expected(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    with pytest.raises(DataError, match=r"dataset\.json: imagesTr/ found but no dataset\.json"):
        describe(tmp_path)
    with pytest.raises(ValueError, match="valid: auto, folders, dicom, msd, nnunet"):
        describe(tmp_path, layout="decathlon")
