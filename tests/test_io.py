import gzip

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from pipeline.data.reading.dicom import read_dicom_series
from pipeline.data.reading.formats import read_nifti, write_nifti_like
from pipeline.errors import DataError
from tests.helpers.dicom import axial_series


def oblique_affine() -> np.ndarray:
    theta = 0.3
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-0.8, -0.8, 3.0])  # LPS-like voxel order, anisotropic
    affine[:3, 3] = [10.0, -20.0, 5.0]
    return affine


def test_nifti_is_canonical_on_read_and_written_back_with_input_geometry(tmp_path):
    affine = oblique_affine()
    data = np.random.default_rng(0).random((20, 24, 7)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "scan.nii.gz")
    volume = read_nifti([tmp_path / "scan.nii.gz"])
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    assert volume.array.shape == (20, 24, 7, 1)
    assert np.allclose(volume.spacing, (0.8, 0.8, 3.0), atol=1e-6)
    labels = (volume.array[..., 0] > 0.5).astype(np.uint8)
    write_nifti_like(labels, volume, tmp_path / "mask.nii.gz")
    out = nib.load(tmp_path / "mask.nii.gz")
    assert np.allclose(out.affine, affine, atol=1e-6) and out.shape == data.shape
    assert np.array_equal(np.asanyarray(out.dataobj), (data > 0.5).astype(np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz", "scan.nii.gz"]


def test_lps_and_ras_copies_read_identically(tmp_path):
    data = np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)
    ras = np.diag([0.5, 0.7, 2.0, 1.0])
    nib.save(nib.Nifti1Image(data, ras), tmp_path / "ras.nii")
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps_affine = ras @ flip
    lps_affine[:3, 3] = ras[:3, :3] @ [3, 4, 0]  # same world position for every voxel
    nib.save(nib.Nifti1Image(data[::-1, ::-1].copy(), lps_affine), tmp_path / "lps.nii")
    a, b = read_nifti([tmp_path / "ras.nii"]), read_nifti([tmp_path / "lps.nii"])
    assert np.array_equal(a.array, b.array) and np.allclose(a.affine, b.affine)


def test_truncated_nifti_names_the_file(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), tmp_path / "ok.nii.gz")
    raw = (tmp_path / "ok.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"cut\.nii\.gz: cannot read as NIfTI"):
        read_nifti([tmp_path / "cut.nii.gz"])
    (tmp_path / "notgz.nii.gz").write_bytes(gzip.compress(b"not a nifti header"))
    with pytest.raises(DataError, match=r"notgz\.nii\.gz"):
        read_nifti([tmp_path / "notgz.nii.gz"])


def test_dicom_series_is_sorted_by_position_not_file_name(tmp_path):
    axial_series(tmp_path / "series", [10, -5, 0, 5])  # files out of spatial order
    volume = read_dicom_series(tmp_path / "series")
    assert volume.array.shape == (128, 128, 4, 1)
    intercept = float(pydicom.dcmread(get_testdata_file("CT_small.dcm")).RescaleIntercept)
    assert (volume.array[0, 0, :, 0] - intercept).tolist() == [-5.0, 0.0, 5.0, 10.0]  # superior last
    assert np.allclose(volume.spacing, (0.661468, 0.661468, 5.0), atol=1e-5)
    assert np.allclose(volume.affine[2, 3], -5.0)


def test_dicom_folder_with_a_stray_file_names_it(tmp_path):
    axial_series(tmp_path / "series", [0, 5])
    (tmp_path / "series" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt: not a DICOM file"):
        read_dicom_series(tmp_path / "series")


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slicing_round_trips_along_every_axis(axis):
    from pipeline.data.cache.slicing import from_slices, to_slices

    volume = np.random.default_rng(1).random((4, 5, 6, 2))
    slices = to_slices(volume, axis)
    assert slices.shape[0] == volume.shape[axis] and slices.shape[-1] == 2
    assert np.array_equal(from_slices(slices, axis), volume)


def test_auto_slice_axis_is_the_coarsest_median_spacing():
    from pipeline.data.cache.slicing import resolve_slice_axis

    assert resolve_slice_axis("auto", [(0.7, 0.7, 3.0), (0.8, 0.8, 2.5)]) == 2
    assert resolve_slice_axis("auto", [(4.0, 1.0, 1.0)]) == 0
    assert resolve_slice_axis("auto", [(1.0, 1.0, 1.0)]) == 2
    with pytest.raises(ValueError, match="slice_axis must be 0, 1, 2 or 'auto'"):
        resolve_slice_axis(3, [(1.0, 1.0, 1.0)])
