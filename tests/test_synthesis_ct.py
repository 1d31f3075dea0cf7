"""The real-size CT generator (pipeline.data.synthesis.ct), checked on scaled replicas (128 voxels in
plane) and, marked slow, on one real 512 x 512 case."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from pipeline.cli.data import data_command
from pipeline.data.cache.facts import SAMPLE, sample_foreground
from pipeline.data.reading.check import check_dataset
from pipeline.data.reading.layouts import describe
from pipeline.data.synthesis.ct import IN_PLANE_MM, SLICE_MM, ct_volume, draw_case, generate_ct

IN_PLANE, SLICES = 128, (30, 40)  # large enough for an organ of more than facts.SAMPLE voxels


@pytest.fixture(scope="module")
def ct_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two compressed scaled-replica cases, read-only."""
    return generate_ct(tmp_path_factory.mktemp("ct") / "msd", 2, seed=0, in_plane=IN_PLANE, slices=SLICES)


def _read(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    image = nib.load(path)
    return np.asanyarray(image.dataobj), image


def test_ct_dataset_reads_as_msd(ct_dir):
    info = describe(ct_dir)
    assert info.layout == "msd" and info.modalities == ["CT"]
    assert info.class_names == ["background", "organ", "lesion"]
    assert [c.case_id for c in info.cases] == ["ct_000", "ct_001"]
    assert all(c.images[0].name.endswith(".nii.gz") and c.mask.exists() for c in info.cases)
    assert check_dataset(ct_dir, workers=1, progress=False).ok


def test_ct_cases_have_their_own_geometry_within_the_ranges(ct_dir):
    for case in describe(ct_dir).cases:
        image, header = _read(case.images[0])
        mask, _ = _read(case.mask)
        assert image.dtype == np.int16 and mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1, 2}
        assert image.shape == mask.shape and image.shape[:2] == (IN_PLANE, IN_PLANE)
        assert SLICES[0] <= image.shape[2] <= SLICES[1]
        sx, sy, sz = np.linalg.norm(header.affine[:3, :3], axis=0)
        assert sx == pytest.approx(sy) and IN_PLANE_MM[0] <= sx <= IN_PLANE_MM[1]
        assert SLICE_MM[0] <= sz <= SLICE_MM[1]
        assert int(header.header["qform_code"]) == int(header.header["sform_code"]) == 1
        assert nib.aff2axcodes(header.affine)[:2] == ("L", "P")  # stored in LPS-like order, as CT
    shapes = {_read(c.mask)[0].shape for c in describe(ct_dir).cases}
    assert len(shapes) == 2


def test_ct_hounsfield_levels():
    image, mask, _ = ct_volume(0, 0, IN_PLANE, SLICES)
    case = draw_case(0, 0, IN_PLANE, SLICES)
    organ_hu, lesion_hu, _ = case.levels
    air = image[(mask == 0) & (image < -500)]
    assert air.mean() == pytest.approx(-1000, abs=5) and 10 < air.std() < 25
    assert 50 < image[mask == 1].mean() < 110 and image[mask == 1].mean() == pytest.approx(organ_hu, abs=12)
    assert abs(image[mask == 2].mean() - image[mask == 1].mean()) > 12  # a learnable contrast
    assert np.sign(image[mask == 2].mean() - image[mask == 1].mean()) == np.sign(lesion_hu - organ_hu)
    body = (mask == 0) & (image > -500)
    assert 10 < np.median(image[body]) < 70  # mostly soft tissue, some fat


def test_ct_organ_is_large_and_spans_some_slices():
    for index in range(2):
        image, mask, _ = ct_volume(0, index, IN_PLANE, SLICES)
        assert (mask > 0).sum() > SAMPLE  # the cache samples its foreground, as for a real organ
        assert sample_foreground(image[..., None], mask, "ct").shape == (SAMPLE, 1)
        assert ndimage.label(mask > 0)[1] == 1
        covered = (mask > 0).any(axis=(0, 1)).mean()
        assert 0.4 < covered < 0.9


def test_ct_lesion_lies_inside_the_organ():
    for index in range(4):
        _, mask, _ = ct_volume(1, index, IN_PLANE, SLICES)
        lesion = mask == 2
        assert 0 < lesion.sum() < (mask == 1).sum() / 20
        assert ndimage.label(lesion)[1] == 1
        ring = ndimage.binary_dilation(lesion) & ~lesion
        assert (mask[ring] == 1).mean() > 0.9  # surrounded by organ, not background


def test_ct_case_depends_only_on_seed_and_index(ct_dir):
    image, mask, affine = ct_volume(0, 1, IN_PLANE, SLICES)
    stored, header = _read(ct_dir / "imagesTr" / "ct_001.nii.gz")
    np.testing.assert_array_equal(stored, image)
    np.testing.assert_array_equal(_read(ct_dir / "labelsTr" / "ct_001.nii.gz")[0], mask)
    np.testing.assert_allclose(header.affine, affine, atol=1e-4)
    again, _, _ = ct_volume(0, 1, IN_PLANE, SLICES)
    np.testing.assert_array_equal(again, image)
    assert not np.array_equal(ct_volume(1, 1, IN_PLANE, SLICES)[1], mask)
    # the slice range picks the count only: the anatomy's other draws stay
    assert draw_case(0, 1, IN_PLANE, (10, 10)).levels == draw_case(0, 1, IN_PLANE, SLICES).levels


def test_ct_uncompressed_writes_nii_named_in_dataset_json(tmp_path):
    root = generate_ct(tmp_path / "ct", 1, in_plane=48, slices=(6, 8), compress=False)
    training = json.loads((root / "dataset.json").read_text())["training"]
    assert training == [{"image": "./imagesTr/ct_000.nii", "label": "./labelsTr/ct_000.nii"}]
    assert [c.images[0].name for c in describe(root).cases] == ["ct_000.nii"]
    assert _read(root / "imagesTr" / "ct_000.nii")[0].dtype == np.int16


@pytest.mark.parametrize(
    ("in_plane", "slices"), [(16, (8, 10)), (64, (0, 4)), (64, (10, 5))], ids=["small", "zero", "reversed"]
)
def test_ct_rejects_bad_geometry(in_plane, slices):
    with pytest.raises(ValueError, match="in_plane >= 32"):
        ct_volume(0, 0, in_plane, slices)


def test_ct_cli_real_size_writes_msd_ct(tmp_path, capsys):
    small = ["synth", "--real-size", "--in-plane", "40", "--slices", "5", "7"]
    data_command([*small, "--num-images", "2", "--output", str(tmp_path / "implied")])  # no --volumes
    assert len(describe(tmp_path / "implied").cases) == 2
    out = tmp_path / "ct"
    data_command([*small, "--volumes", "--num-images", "1", "--output", str(out), "--uncompressed"])
    assert "1 CT volumes (40x40, 5-7 slices" in capsys.readouterr().out
    assert (out / "imagesTr" / "ct_000.nii").exists() and len(describe(out).cases) == 1
    with pytest.raises(SystemExit, match="MSD layout"):
        data_command([*small, "--layout", "nnunet", "--output", str(out)])


def test_ct_cli_default_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data_command(["synth", "--real-size", "--num-images", "1", "--in-plane", "32", "--slices", "4", "4"])
    assert len(describe(tmp_path / "data" / "synthetic_ct").cases) == 1


PEAK_SCRIPT = textwrap.dedent(
    """
    import json
    import numpy as np
    from pipeline.data.synthesis.ct import ct_volume

    def megabytes(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    before = megabytes("VmRSS:")
    image, mask, _ = ct_volume(0, 0, 512, (80, 80))
    print(json.dumps({
        "shape": image.shape, "dtype": str(image.dtype), "organ": int((mask > 0).sum()),
        "lesion": int((mask == 2).sum()), "extra_mb": megabytes("VmHWM:") - before,
        "case_mb": (image.nbytes + mask.nbytes) / 2**20,
    }))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak memory read from /proc")
def test_ct_real_size_case_in_bounded_memory():
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True, check=True, cwd=repo
    )
    facts = json.loads(done.stdout.splitlines()[-1])
    assert facts["shape"] == [512, 512, 80] and facts["dtype"] == "int16"
    assert 1e5 < facts["organ"] < 1e7 and facts["lesion"] > 0
    # the case itself (60 MB) plus slab work space; a whole-volume float64 grid would be 1.5 GB
    assert facts["extra_mb"] < facts["case_mb"] + 250
