import json
import logging
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest

from pipeline.cli import main
from pipeline.data.reading.dicom import read_dicom_series
from pipeline.data.reading.formats import write_nifti_like
from pipeline.errors import DataError
from tests.helpers.dicom import write_series

CORNER = (-158.135803, -179.035797)  # CT_small.dcm's in-plane origin, LPS mm; its rows run along +x
INTERCEPT = -1024.0  # CT_small.dcm's RescaleIntercept
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def _axial(z_positions):
    return [(*CORNER, z) for z in z_positions]


def _tilted(count, step=2.5, degrees=15.0):
    """Positions of a gantry-tilted series: each slice shifts along the row direction (+x)."""
    shift = step * np.tan(np.radians(degrees))
    return [(CORNER[0] + n * shift, CORNER[1], n * step) for n in range(count)]


def _marked(count):
    """Slice n holds n, with markers at (row 0, col 0) and (row 5, col 9) to find its voxels."""
    planes = [np.full((128, 128), n, np.int16) for n in range(count)]
    for n, plane in enumerate(planes):
        plane[0, 0], plane[5, 9] = 100 + n, 200 + n
    return planes


def test_read_dicom_series_sorts_by_position_and_derives_the_step(tmp_path):
    z = [7.5, 0.0, 12.5, 2.5, 10.0, 5.0]  # neither file names nor InstanceNumber follow position
    names = ["a.dcm", "f.dcm", "b.dcm", "e.dcm", "c.dcm", "d.dcm"]
    write_series(tmp_path / "s", _axial(z), names)
    volume = read_dicom_series(tmp_path / "s")
    assert volume.array.shape == (128, 128, 6, 1)
    assert (volume.array[0, 0, :, 0] - INTERCEPT).tolist() == [1, 3, 5, 0, 4, 2]  # written order, by z
    assert np.allclose(volume.spacing, (0.661468, 0.661468, 2.5))
    assert np.allclose(volume.affine[:3, 2], [0, 0, 2.5]) and np.isclose(volume.affine[2, 3], 0.0)


def test_read_dicom_series_accepts_spacing_within_tolerance(tmp_path):
    write_series(tmp_path / "s", _axial([0.0, 2.5, 5.01, 7.5, 10.0, 12.52]))  # 1% of 2.5 mm is 0.025
    assert np.isclose(read_dicom_series(tmp_path / "s").spacing[2], 2.5)


def test_read_dicom_series_single_slice_uses_slice_thickness(tmp_path):
    write_series(tmp_path / "s", _axial([3.0]))
    volume = read_dicom_series(tmp_path / "s")
    assert np.allclose(volume.affine[:3, 2], [0, 0, 5.0])  # CT_small's SliceThickness along the normal


@pytest.mark.parametrize(
    ("positions", "problem"),
    [
        (
            _axial([0, 2.5, 5, 10, 12.5, 15]),
            r"about 1 slice\(s\) missing between 5\.00 mm \(slice_002\.dcm\) and 10\.00 mm "
            r"\(slice_003\.dcm\) along the normal: gap 5\.00 mm, step 2\.50 mm",
        ),
        (
            _axial([0, 2.5, 5, 5.004, 7.5, 10]),
            r"slice_002\.dcm and slice_003\.dcm share the slice position 5\.00 mm",
        ),
        (
            _axial([0, 2.5, 5, 7.6, 10.1, 12.6]),
            r"uneven slice spacing: 2\.600 mm between 5\.00 mm \(slice_002\.dcm\) and 7\.60 mm "
            r"\(slice_003\.dcm\), step 2\.500 mm \(tolerance 0\.025 mm\)",
        ),
        (
            [(CORNER[0] + (0.5 if n == 3 else 0.0), CORNER[1], 2.5 * n) for n in range(6)],
            r"slice_003\.dcm lies 0\.500 mm off the grid of steps \[0\.0, 0\.0, 2\.5\] mm",
        ),
    ],
    ids=["missing", "duplicate", "uneven", "off-grid"],
)
def test_read_dicom_series_bad_geometry_stops_naming_the_folder(tmp_path, positions, problem):
    write_series(tmp_path / "s", positions)
    with pytest.raises(DataError) as info:
        read_dicom_series(tmp_path / "s")
    assert "\n" not in str(info.value)
    assert info.value.path == str(tmp_path / "s")
    assert info.match(rf"^{tmp_path / 's'}: {problem}")


def test_read_dicom_series_tilted_keeps_the_true_step_as_a_sheared_affine(tmp_path, caplog):
    write_series(tmp_path / "s", _tilted(6), pixels=_marked(6))
    with caplog.at_level(logging.WARNING, logger="pipeline.data.reading.dicom"):
        volume = read_dicom_series(tmp_path / "s")
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 's'}: gantry tilt of 15.00 degrees; kept as a sheared affine (voxels not resampled)"
    ]
    step = LPS_TO_RAS @ [2.5 * np.tan(np.radians(15.0)), 0.0, 2.5]
    assert np.allclose(volume.source_affine[:3, 2], step, atol=1e-5)
    assert np.allclose(volume.affine[:3, 2], step, atol=1e-5)
    for path in sorted((tmp_path / "s").iterdir()):
        ds = pydicom.dcmread(path)
        n = int(ds.InstanceNumber) - 1
        origin = np.array(ds.ImagePositionPatient, float)
        row_dir, col_dir = np.array(ds.ImageOrientationPatient[:3], float), ds.ImageOrientationPatient[3:]
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
        for marker, (row, col) in ((100, (0, 0)), (200, (5, 9))):
            # PS3.3 C.7.6.2.1.1: pixel (row, col) lies at origin + col * dc * row_dir + row * dr * col_dir
            lps = origin + col * col_spacing * row_dir + row * row_spacing * np.array(col_dir, float)
            (ijk,) = np.argwhere(volume.array[..., 0] == marker + n + INTERCEPT)
            world = volume.affine[:3, :3] @ ijk + volume.affine[:3, 3]
            assert np.allclose(world, LPS_TO_RAS @ lps, atol=1e-4), (path.name, marker)


def test_read_dicom_series_problems_reach_data_check(tmp_path, capsys):
    root = tmp_path / "data"
    write_series(root / "images" / "tilted", _tilted(6))
    write_series(root / "images" / "gappy", _axial([0, 2.5, 5, 10, 12.5, 15]))
    volume = read_dicom_series(root / "images" / "tilted")
    labels = np.zeros(volume.array.shape[:3], np.uint8)
    labels[10:40, 20:50, 2:] = 1
    write_nifti_like(labels, volume, root / "masks" / "tilted.nii.gz")
    shutil.copy(root / "masks" / "tilted.nii.gz", root / "masks" / "gappy.nii.gz")
    (root / "classes.json").write_text(json.dumps(["background", "organ"]))
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "check", str(root)])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and out[1].startswith("FAILED: 1 problem(s)")  # the tilted mask overlays its scan
    assert out[0].startswith(f"{root / 'images' / 'gappy'}: about 1 slice(s) missing between 5.00 mm")


def test_read_dicom_series_tilted_mask_keeps_its_sheared_geometry_in_the_sform_only(tmp_path):
    write_series(tmp_path / "s", _tilted(6), pixels=_marked(6))
    volume = read_dicom_series(tmp_path / "s")
    write_nifti_like(np.zeros(volume.array.shape[:3], np.uint8), volume, tmp_path / "mask.nii.gz")
    header = nib.load(tmp_path / "mask.nii.gz").header
    assert int(header["qform_code"]) == 0 and int(header["sform_code"]) == 1
    assert np.allclose(header.get_sform(), volume.source_affine, atol=1e-4)
