import json
import pickle
import shutil

import nibabel as nib
import numpy as np

from pipeline.cli import main
from pipeline.data.cache import MappedArray, open_case, prepare_cache, read_manifest
from pipeline.data.layouts import describe
from pipeline.data.normalization import Normalization, fit_intensity
from pipeline.data.synthetic_volumes import CLASS_NAMES


def _mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cache_prepare_twice_is_a_no_op(volume_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    main(["data", "prepare", str(volume_dir), "--cache", str(cache)])
    assert "6 cases, 6 decoded, 0 unchanged; slice axis 2 (axial)" in capsys.readouterr().out
    before = _mtimes(cache)
    assert len(before) == 1 + 6 * 3  # manifest + image, mask, foreground sample per case
    main(["data", "prepare", str(volume_dir), "--cache", str(cache)])
    assert "6 cases, 0 decoded, 6 unchanged" in capsys.readouterr().out
    assert _mtimes(cache) == before  # nothing rewritten, not even the manifest


def test_cache_redecodes_only_what_changed(volume_dir, tmp_path):
    root, cache = tmp_path / "msd", tmp_path / "cache"
    shutil.copytree(volume_dir, root)
    cases = describe(root).cases
    prepare_cache(cases, cache, CLASS_NAMES)
    image = nib.load(root / "imagesTr" / "vol_001.nii.gz")
    data = np.asanyarray(image.dataobj).copy()
    data[0, 0, 0] += 5
    nib.save(nib.Nifti1Image(data, image.affine, image.header), root / "imagesTr" / "vol_001.nii.gz")
    manifest, written = prepare_cache(cases, cache, CLASS_NAMES)
    # stored voxel (0, 0, 0) of the x- and y-flipped file is canonical (-1, -1, 0): slice 0, row -1, column -1
    assert written == 1 and np.load(cache / "cases" / "vol_001.image.npy")[0, -1, -1, 0] == data[0, 0, 0]
    _, written = prepare_cache(cases[:4], cache, CLASS_NAMES)  # two cases gone: their files too
    assert written == 0 and not (cache / "cases" / "vol_005.image.npy").exists()
    manifest, written = prepare_cache(cases[:4], cache, CLASS_NAMES, slice_axis=0)  # new axis: all again
    assert written == 4 and manifest["slice_axis"] == 0
    assert np.load(cache / "cases" / "vol_000.mask.npy", mmap_mode="r").shape == (40, 40, 12)


def test_cache_holds_canonical_slices_stats_and_foreground_indices(volume_dir, tmp_path):
    cases = describe(volume_dir).cases
    manifest, _ = prepare_cache(cases, tmp_path, CLASS_NAMES)
    entry = manifest["cases"]["vol_000"]
    from pipeline.data.volumes import load_volume_case

    volume, mask = load_volume_case(cases[0], CLASS_NAMES)
    image = np.load(tmp_path / entry["image"], mmap_mode="r")
    assert isinstance(image, np.memmap) and image.dtype == np.int16 and entry["shape"] == [12, 40, 40, 1]
    assert np.array_equal(image, np.moveaxis(volume.array, 2, 0))
    assert entry["labels"] == [0, 1, 2] and set(entry["class_slices"]) == {"1", "2"}
    for label, slices in entry["class_slices"].items():
        assert slices == [s for s in range(12) if (mask[:, :, s] == int(label)).any()]
        assert 0 < len(slices) < 12
    assert np.allclose(entry["spacing"], (0.9, 0.9, 3.0), atol=1e-5)
    # statistics from the manifest's moments equal measuring the voxels
    arrays = open_case(tmp_path, "vol_000", entry, [Normalization("zscore")])
    measured = fit_intensity(np.asarray(image), Normalization("zscore"))
    for field in ("lo", "hi", "mean", "std"):
        assert np.allclose(getattr(arrays.stats, field), getattr(measured, field))
    assert json.loads((tmp_path / "manifest.json").read_text()) == read_manifest(tmp_path)


def test_cache_mapped_arrays_pickle_as_their_path(volume_dir, tmp_path):
    manifest, _ = prepare_cache(describe(volume_dir).cases[:1], tmp_path, CLASS_NAMES)
    entry = manifest["cases"]["vol_000"]
    array = MappedArray(tmp_path / entry["image"], entry["shape"])
    first = np.array(array[3])
    copy = pickle.loads(pickle.dumps(array))  # what a loader worker receives
    assert len(pickle.dumps(array)) < 1000 and np.array_equal(copy[3], first)
