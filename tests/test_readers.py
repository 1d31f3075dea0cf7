"""The reader registry: .mha/.mhd/.nrrd/.nhdr through SimpleITK read and written like NIfTI, header
probes, refused inputs, and fit/infer on such files. SimpleITK itself is the reference for the
geometry: every file here is written or converted by it, and every mask is read back by it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from pipeline.cli import main
from pipeline.data.reading.check import check_dataset
from pipeline.data.reading.dicom import read_dicom_series
from pipeline.data.reading.formats import read_image_2d, read_nifti
from pipeline.data.reading.layouts import Case, describe
from pipeline.data.reading.registry import mask_ending, read_header, read_volume, write_mask
from pipeline.data.reading.volumes import probe, read_image
from pipeline.data.synthesis.phantoms_3d import generate_volumes
from pipeline.errors import DataError
from pipeline.inference.cases import InputCase, find_inputs
from pipeline.inference.slice_progress import input_slices
from tests.conftest import run_path, volume_fit_args
from tests.helpers.dicom import axial_series
from tests.test_inference import checkpoint, infer, table, trained_run  # noqa: F401 (fixtures)
from tests.test_io import oblique_affine

ALL_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".png", ".tif")


def oblique_image(components: int = 1) -> sitk.Image:
    """A (X, Y, Z) = (9, 8, 5) int16 image (or float32 vector pixels), anisotropic (0.7 x 0.9 x 2.5
    mm), its axes rotated off every world axis and the first one flipped (det -1, LPS-like)."""
    rng = np.random.default_rng(0)
    if components == 1:
        image = sitk.GetImageFromArray(rng.integers(-100, 100, (5, 8, 9)).astype(np.int16))
    else:
        image = sitk.GetImageFromArray(rng.random((5, 8, 9, components)).astype(np.float32), isVector=True)
    a, b = 0.4, 0.25
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    image.SetDirection((rz @ rx @ np.diag([-1.0, 1.0, 1.0])).ravel().tolist())
    image.SetSpacing((0.7, 0.9, 2.5))
    image.SetOrigin((12.5, -30.25, 8.0))
    return image


def assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    for get in (sitk.Image.GetSpacing, sitk.Image.GetOrigin, sitk.Image.GetDirection):
        assert np.allclose(get(a), get(b), atol=1e-5), get.__name__


def convert(root: Path, ending: str) -> Path:
    """Rewrite a generated NIfTI data set (MSD or nnU-Net raw, 3D files) as ``ending`` files, SimpleITK
    converting each file, and ``dataset.json`` naming them."""
    for path in sorted(root.glob("*Tr/*.nii.gz")):
        image = sitk.ReadImage(str(path))
        for key in image.GetMetaDataKeys():  # NIfTI header fields, which MetaImage warns it drops
            image.EraseMetaData(key)
        sitk.WriteImage(
            image, str(path.with_name(path.name[: -len(".nii.gz")] + ending)), useCompression=True
        )
        path.unlink()
    meta = root / "dataset.json"
    meta.write_text(meta.read_text().replace(".nii.gz", ending))
    return root


@pytest.mark.parametrize("ending", [".mha", ".mhd", ".nrrd", ".nhdr", ".nii.gz"])
def test_readers_volume_in_ras_order_matches_the_nifti_path(tmp_path, ending):
    image = oblique_image()
    sitk.WriteImage(image, str(tmp_path / "ref.nii.gz"))  # SimpleITK's own LPS -> NIfTI conversion
    sitk.WriteImage(image, str(tmp_path / f"scan{ending}"))
    reference = read_nifti([tmp_path / "ref.nii.gz"])
    volume = read_volume([tmp_path / f"scan{ending}"])
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    assert volume.array.shape == (9, 8, 5, 1) and np.array_equal(volume.array, reference.array)
    assert np.allclose(volume.affine, reference.affine, atol=1e-5)
    assert np.allclose(volume.source_affine, reference.source_affine, atol=1e-5)
    assert volume.format == ("nifti" if ending == ".nii.gz" else "itk")


@pytest.mark.parametrize(
    ("ending", "written"),
    [(".mha", ".mha"), (".nrrd", ".nrrd"), (".mhd", ".mha"), (".nhdr", ".nrrd"), (".nii.gz", ".nii.gz")],
)
def test_readers_mask_keeps_the_input_format_and_geometry(tmp_path, ending, written):
    image = oblique_image()
    path = tmp_path / f"scan{ending}"
    sitk.WriteImage(image, str(path))
    volume = read_volume([path])
    out = tmp_path / f"mask{mask_ending(path)}"
    assert out.name == f"mask{written}"  # a detached header pair is written as its single-file form
    write_mask((volume.array[..., 0] > 20).astype(np.uint8), volume, out)
    mask = sitk.ReadImage(str(out))
    assert_same_geometry(mask, image)
    assert mask.GetPixelID() == sitk.sitkUInt8
    assert np.array_equal(sitk.GetArrayFromImage(mask), sitk.GetArrayFromImage(image) > 20)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("mask")) == [out.name]


def test_readers_vector_pixels_are_channels(tmp_path):
    image = oblique_image(components=2)
    sitk.WriteImage(image, str(tmp_path / "two.nrrd"))
    volume = read_volume([tmp_path / "two.nrrd"])
    assert volume.array.shape == (9, 8, 5, 2) and read_header([tmp_path / "two.nrrd"]).channels == 2
    for c in range(2):
        sitk.WriteImage(sitk.VectorIndexSelectionCast(image, c), str(tmp_path / f"c{c}.nrrd"))
        assert np.array_equal(volume.array[..., c], read_volume([tmp_path / f"c{c}.nrrd"]).array[..., 0])


def _cut_voxels(path: Path) -> None:
    """Leave only the header of ``path``: the data files of a detached header go, a single file is
    cut a few bytes after its header."""
    raw = path.read_bytes()
    if path.suffix in (".mhd", ".nhdr"):
        for data in path.parent.glob(f"{path.stem}.*"):
            if data != path:  # NRRD's reader opens a detached data file for the header too: emptied
                data.unlink() if path.suffix == ".mhd" else data.write_bytes(b"")
        return
    ends = {".mha": b"ElementDataFile = LOCAL\n", ".nrrd": b"\n\n"}
    header = 352 if path.suffix == ".nii" else raw.index(ends[path.suffix]) + len(ends[path.suffix])
    path.write_bytes(raw[: header + 8])


@pytest.mark.parametrize("ending", [".mha", ".mhd", ".nrrd", ".nhdr", ".nii"])
def test_readers_probe_reads_the_header_only(tmp_path, ending):
    image = oblique_image()
    path = tmp_path / f"scan{ending}"
    sitk.WriteImage(image, str(path), useCompression=True)
    full = read_volume([path])
    _cut_voxels(path)
    header = read_header([path])
    assert header.shape == image.GetSize() and header.channels == 1
    assert np.allclose(header.spacing, full.spacing, atol=1e-6)
    assert [header.slices(axis) for axis in range(3)] == list(full.array.shape[:3])
    assert probe(Case("scan", (path,), None)) == (header.spacing, 1)
    kind = "nifti" if ending == ".nii" else "itk"
    assert input_slices(InputCase("scan", (path,), kind), 1) == full.array.shape[1]
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: "):
        read_volume([path])


def test_readers_dicom_header_probe_matches_the_read_series(tmp_path):
    axial_series(tmp_path / "series", [10.0, 0.0, 5.0, 15.0])
    series = read_dicom_series(tmp_path / "series")
    header = read_header([tmp_path / "series"])
    assert np.allclose(header.spacing, series.spacing) and header.channels == 1
    assert [header.slices(axis) for axis in range(3)] == list(series.array.shape[:3])
    assert input_slices(InputCase("series", (tmp_path / "series",), "dicom"), 2) == 4


def test_readers_multipage_tiff_is_refused_by_name(tmp_path):
    pages = [Image.fromarray(np.full((8, 6), 40 * i, np.uint8)) for i in range(3)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    pages[1].save(tmp_path / "one.tif")
    assert read_image_2d(tmp_path / "one.tif").shape == (8, 6)
    with pytest.raises(DataError, match=r"stack\.tif: multi-page TIFF \(3 pages\)"):
        read_image_2d(tmp_path / "stack.tif")


def test_readers_unknown_ending_is_refused_listing_the_supported_ones(tmp_path):
    (tmp_path / "scan.mnc").write_bytes(b"MINC")
    with pytest.raises(DataError, match=r"scan\.mnc: unknown file type") as refused:
        read_volume([tmp_path / "scan.mnc"])
    assert all(e in refused.value.problem for e in ALL_ENDINGS)
    (case,) = find_inputs([tmp_path / "scan.mnc"])
    assert case.kind == "unsupported"
    root = generate_volumes(tmp_path / "nn", num_cases=2, shape=(6, 6, 4), layout="nnunet")
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "file_ending": ".mnc"}))
    with pytest.raises(
        DataError, match=r"file_ending '\.mnc' is not supported.*\.mha, \.mhd, \.nrrd, \.nhdr"
    ):
        describe(root)


def test_readers_nnunet_raw_with_mha_file_ending_is_discovered(tmp_path):
    nifti = generate_volumes(
        tmp_path / "nii", num_cases=2, shape=(12, 10, 6), modalities=("CT", "T2"), layout="nnunet"
    )
    root = convert(shutil.copytree(nifti, tmp_path / "mha"), ".mha")
    info = describe(root)
    assert info.layout == "nnunet" and info.modalities == ["CT", "T2"]
    case = info.cases[0]
    assert [p.name for p in case.images] == ["vol_000_0000.mha", "vol_000_0001.mha"]
    assert case.mask.name == "vol_000.mha"
    expected = read_image(describe(nifti).cases[0])
    assert np.array_equal(read_image(case).array, expected.array)
    assert check_dataset(root).ok
    found = find_inputs([root / "imagesTr"], in_channels=2)
    assert [(c.name, c.kind, len(c.paths)) for c in found] == [("vol_000", "itk", 2), ("vol_001", "itk", 2)]


def test_readers_infer_on_nrrd_writes_nrrd_with_the_input_geometry(checkpoint, phantom_dir, tmp_path):  # noqa: F811 (the fixture)
    # the oblique, LPS-ordered phantom stack of test_inference, as NIfTI and converted to NRRD by
    # SimpleITK: both must get the same labels, the NRRD one as NRRD in its own geometry
    phantom = read_image_2d(phantom_dir / "images" / "phantom_00.png").astype(np.float32)
    stored = np.repeat(phantom[::-1, ::-1, None], 3, axis=2)
    inputs = tmp_path / "in"
    inputs.mkdir()
    nib.save(nib.Nifti1Image(stored, oblique_affine()), inputs / "as_nifti.nii.gz")
    sitk.WriteImage(sitk.ReadImage(str(inputs / "as_nifti.nii.gz")), str(inputs / "as_nrrd.nrrd"))
    out = tmp_path / "out"
    assert infer(checkpoint, [inputs], out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["as_nifti.nii.gz", "as_nrrd.nrrd", "predictions.csv"]
    mask = sitk.ReadImage(str(out / "as_nrrd.nrrd"))
    assert_same_geometry(mask, sitk.ReadImage(str(inputs / "as_nrrd.nrrd")))
    labels = sitk.GetArrayFromImage(mask)
    assert labels.max() > 0 and np.array_equal(
        labels, sitk.GetArrayFromImage(sitk.ReadImage(str(out / "as_nifti.nii.gz")))
    )
    assert table(out)["as_nrrd"]["shape"] == "64x64x3"


def _plan(root: Path, cache: Path) -> dict:
    main(["plan", str(root), "--data.cache_dir", str(cache)])
    return json.loads((cache / "plan.json").read_text())


def test_readers_fit_and_infer_on_mha_volumes(volume_dir, tmp_path):
    root = convert(shutil.copytree(volume_dir, tmp_path / "msd", ignore=shutil.ignore_patterns(".*")), ".mha")
    assert check_dataset(root).ok
    # what the plan learns from the cases is the same as from the NIfTI originals (the batch is left
    # out: at this data set's size it sits on a floor division's edge, which float32 spacings tip)
    mha, nifti = _plan(root, tmp_path / "c1"), _plan(volume_dir, tmp_path / "c2")
    assert mha["fingerprint"] == nifti["fingerprint"] and mha["normalization"] == nifti["normalization"]
    assert mha["target_spacing"] == pytest.approx(nifti["target_spacing"], abs=1e-6)
    extra = ("--run.name", "mha", "--data.cache_dir", str(tmp_path / "cache"), "--trainer.max_epochs", "1",
             "--data.iterations_per_epoch", "2", "--model.net.init_args.features", "[4, 8, 16, 32]")  # fmt: skip
    main(volume_fit_args(root, tmp_path / "runs", "unet", *extra))
    last = run_path(tmp_path / "runs", "default", root, "mha") / "checkpoints" / "last.ckpt"
    out = tmp_path / "out"
    assert infer(last, [root / "imagesTr" / "vol_000.mha"], out) == 0
    mask = sitk.ReadImage(str(out / "vol_000.mha"))
    assert_same_geometry(mask, sitk.ReadImage(str(root / "imagesTr" / "vol_000.mha")))
    assert mask.GetPixelID() == sitk.sitkUInt8
