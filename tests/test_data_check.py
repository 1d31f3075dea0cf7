import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.data.reading.check import check_dataset


def _rewrite(path, change):
    image = nib.load(path)
    data, affine = change(np.asanyarray(image.dataobj).copy(), image.affine.copy())
    nib.save(nib.Nifti1Image(data, affine), path)


def _broken_msd(volume_dir, tmp_path):
    """One fault of each kind, one case each."""
    root = tmp_path / "broken"
    shutil.copytree(volume_dir, root)
    images, labels = root / "imagesTr", root / "labelsTr"
    raw = (images / "vol_000.nii.gz").read_bytes()
    (images / "vol_000.nii.gz").write_bytes(raw[: len(raw) // 2])  # truncated
    _rewrite(labels / "vol_001.nii.gz", lambda d, a: (d[:, :, :6], a))  # shape mismatch

    def shifted(d, a):
        a[:3, 3] += 2.0
        return d, a

    _rewrite(labels / "vol_002.nii.gz", shifted)  # affine mismatch
    _rewrite(
        labels / "vol_003.nii.gz", lambda d, a: (np.where(d == 2, 7, d).astype(np.uint8), a)
    )  # bad label

    def with_nan(d, a):
        d = d.astype(np.float32)
        d[3, 4, 5] = np.nan
        return d, a

    _rewrite(images / "vol_004.nii.gz", with_nan)  # NaN intensity
    (labels / "vol_005.nii.gz").unlink()  # image without mask
    return root


def test_data_check_reports_every_fault_naming_the_file(volume_dir, tmp_path):
    report = check_dataset(_broken_msd(volume_dir, tmp_path))
    lines = [str(p) for p in report.problems]
    expected = {
        "imagesTr/vol_000.nii.gz: cannot read as NIfTI, truncated or corrupt?": 1,
        "labelsTr/vol_001.nii.gz: mask size (40, 40, 6) differs from image size (40, 40, 12)": 1,
        "labelsTr/vol_002.nii.gz: mask geometry differs from its image": 1,
        "labelsTr/vol_003.nii.gz: label value(s) [7] not in the classes 0..2": 1,
        "imagesTr/vol_004.nii.gz: image holds NaN or infinite intensities": 1,
        "imagesTr/vol_005.nii.gz: no mask named vol_005.*": 1,
    }
    for text, count in expected.items():
        assert sum(text in line for line in lines) == count, (text, lines)
    assert len(lines) == len(expected) and not report.ok
    assert report.summary().startswith("FAILED: 6 problem(s)")


def test_data_check_two_workers_report_what_one_reports(volume_dir, tmp_path, monkeypatch):
    root = _broken_msd(volume_dir, tmp_path)
    monkeypatch.setattr("pipeline.parallel.MIN_ITEMS_PER_WORKER", 1)  # a pool even for six cases
    one, two = check_dataset(root, workers=1), check_dataset(root, workers=2)
    assert [str(p) for p in two.problems] == [str(p) for p in one.problems] and len(one.problems) == 6


def test_data_check_cli_exit_codes(volume_dir, tmp_path, capsys):
    main(["data", "check", str(volume_dir)])
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["OK: 6 cases, msd layout, 1 channel(s), classes: background, organ, lesion"]
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "check", str(_broken_msd(volume_dir, tmp_path))])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 7 and all("vol_00" in line for line in out[:-1]) and out[-1].startswith("FAILED")


def test_data_check_empty_data_set(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "bg", "1": "fg"}, "training": []}))
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    report = check_dataset(tmp_path)
    assert [str(p) for p in report.problems] == [f"{tmp_path}: empty data set: no cases found"]


def test_data_check_2d_folders(phantom_dir, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(phantom_dir, root)
    (root / "masks" / "phantom_03.png").unlink()
    Image.fromarray(np.full((64, 64), 9, np.uint8)).save(root / "masks" / "phantom_07.png")
    (root / "masks" / "extra.png").write_bytes((root / "masks" / "phantom_01.png").read_bytes())
    (root / "images" / "phantom_09.png").write_bytes(b"not a png")
    lines = sorted(str(p) for p in check_dataset(root).problems)
    assert len(lines) == 4
    assert "images/phantom_03.png: no mask named phantom_03.*" in lines[0]
    assert "images/phantom_09.png: cannot read as an image" in lines[1]
    assert "masks/extra.png: mask has no image named extra.*" in lines[2]
    assert "masks/phantom_07.png: label value(s) [9] not in the classes 0..3" in lines[3]
