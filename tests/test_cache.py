import json
import pickle
import shutil

import nibabel as nib
import numpy as np

from pipeline.cli import main
from pipeline.data.cache.facts import prepare_facts
from pipeline.data.cache.grids import open_case, prepare_grid
from pipeline.data.cache.resample import resample_image
from pipeline.data.cache.slicing import in_slice_order, to_slices
from pipeline.data.cache.store import MappedArray, read_manifest
from pipeline.data.normalization import Normalization, fit_intensity
from pipeline.data.reading.layouts import describe
from pipeline.data.reading.volumes import load_volume_case
from pipeline.data.synthesis.phantoms_3d import CLASS_NAMES

GRID = ((0.9, 0.9, 3.0), 2)  # the fixture's own spacing: resampling keeps every voxel


def _mtimes(folder):
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cache_prepare_twice_is_a_no_op(volume_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    main(["data", "prepare", str(volume_dir), "--data.cache_dir", str(cache)])
    out = capsys.readouterr().out
    assert "6 cases; resampled to" in out and "target spacing   0.9 x 0.9 x 3 mm" in out
    before = _mtimes(cache)
    # facts manifest, plan, label + foreground sample per case; a grid: manifest, image, mask, voxels per case
    assert len(before) == 2 + 6 * 2 + 1 + 6 * 3
    main(["data", "prepare", str(volume_dir), "--data.cache_dir", str(cache)])
    assert _mtimes(cache) == before  # nothing rewritten: not a manifest, not the plan


def test_cache_redecodes_only_what_changed(volume_dir, tmp_path):
    root, cache = tmp_path / "msd", tmp_path / "cache"
    shutil.copytree(volume_dir, root)
    cases = describe(root).cases
    prepare_facts(cases, cache, CLASS_NAMES)
    key, _ = prepare_grid(cases, cache, *GRID, CLASS_NAMES)
    before = _mtimes(cache)
    image = nib.load(root / "imagesTr" / "vol_001.nii.gz")
    data = np.asanyarray(image.dataobj).copy()
    data[0, 0, 0] += 5
    nib.save(nib.Nifti1Image(data, image.affine, image.header), root / "imagesTr" / "vol_001.nii.gz")
    prepare_facts(cases, cache, CLASS_NAMES)
    prepare_grid(cases, cache, *GRID, CLASS_NAMES)
    changed = {str(p) for p, t in _mtimes(cache).items() if before.get(p) != t}
    assert {c for c in changed if "vol_" in c} == {
        "cases/vol_001.label.npy", "cases/vol_001.fg.npy",
        f"grids/{key}/vol_001.image.npy", f"grids/{key}/vol_001.mask.npy", f"grids/{key}/vol_001.where.npy",
    }  # fmt: skip
    # stored voxel (0, 0, 0) of the x- and y-flipped file is canonical (-1, -1, 0): slice 0, row -1, column -1
    assert np.load(cache / "grids" / key / "vol_001.image.npy")[0, -1, -1, 0] == data[0, 0, 0]
    prepare_facts(cases[:4], cache, CLASS_NAMES)  # two cases gone: their files too
    assert not (cache / "cases" / "vol_005.label.npy").exists()
    key0, entries = prepare_grid(
        cases[:4], cache, (0.9, 0.9, 3.0), 0, CLASS_NAMES
    )  # another axis: a new grid
    assert key0 != key and entries["vol_000"]["shape"] == [40, 40, 12, 1]


def test_cache_grid_holds_resampled_slices_stats_and_class_slices(mixed_volume_dir, tmp_path):
    cases = describe(mixed_volume_dir).cases
    facts = prepare_facts(cases, tmp_path, CLASS_NAMES)
    target = (0.8, 0.8, 2.5)
    key, grid = prepare_grid(cases, tmp_path, target, 2, CLASS_NAMES)
    volume, mask = load_volume_case(cases[0], CLASS_NAMES)
    entry = grid[cases[0].case_id]
    image = np.load(tmp_path / "grids" / key / entry["image"], mmap_mode="r")
    expected = resample_image(to_slices(volume.array, 2), in_slice_order(volume.spacing, 2), (2.5, 0.8, 0.8))
    assert isinstance(image, np.memmap) and image.dtype == np.float32 and np.array_equal(image, expected)
    assert np.allclose(facts[cases[0].case_id]["spacing"], volume.spacing) and volume.spacing != target
    labels = np.load(tmp_path / "grids" / key / entry["mask"])
    assert labels.shape == image.shape[:3] and set(entry["class_slices"]) == {"1", "2"}
    for label, slices in entry["class_slices"].items():
        assert slices == [s for s in range(len(labels)) if (labels[s] == int(label)).any()]
    arrays = open_case(
        tmp_path, key, cases[0].case_id, facts[cases[0].case_id], entry, [Normalization("zscore")], 2
    )
    measured = fit_intensity(np.asarray(image), Normalization("zscore"))  # the moments give the same
    for field in ("lo", "hi", "mean", "std"):
        assert np.allclose(getattr(arrays.stats, field), getattr(measured, field))
    assert np.array_equal(arrays.original.labels_in_slice_order(), to_slices(mask, 2))
    assert json.loads((tmp_path / "manifest.json").read_text()) == read_manifest(tmp_path)


def test_cache_mapped_arrays_pickle_as_their_path(volume_dir, tmp_path):
    cases = describe(volume_dir).cases[:1]
    key, grid = prepare_grid(cases, tmp_path, *GRID, CLASS_NAMES)
    entry = grid["vol_000"]
    array = MappedArray(tmp_path / "grids" / key / entry["image"], entry["shape"])
    first = np.array(array[3])
    copy = pickle.loads(pickle.dumps(array))  # what a loader worker receives
    assert len(pickle.dumps(array)) < 1000 and np.array_equal(copy[3], first)


def test_cache_samples_a_large_organ_reproducibly(tmp_path):
    # 128 x 128 x 40 at 0.8 mm in plane: the organ alone has far more than SAMPLE voxels, the branch
    # every real CT organ takes (it crashed on a misspelt numpy name that no phantom reached)
    from pipeline.data.cache.facts import SAMPLE
    from pipeline.data.synthesis.phantoms_3d import generate_volumes

    root = generate_volumes(tmp_path / "big", num_cases=2, shape=(128, 128, 40), spacing=(0.8, 0.8, 2.0))
    cases = describe(root).cases
    first = prepare_facts(cases, tmp_path / "a", CLASS_NAMES)
    second = prepare_facts(cases[::-1], tmp_path / "b", CLASS_NAMES)
    for case in cases:
        entry = first[case.case_id]
        assert entry["class_voxels"]["1"] + entry["class_voxels"]["2"] > SAMPLE
        sample = np.load(tmp_path / "a" / entry["foreground_sample"])
        assert sample.shape == (SAMPLE, 1) and sample.dtype == np.float32
        # drawn from the case's own foreground (organ ~90 HU, lesion ~125), seeded by its id alone
        volume, mask = load_volume_case(case, CLASS_NAMES)
        assert np.isin(sample[:, 0], volume.array[mask > 0][:, 0]).all()
        assert np.array_equal(sample, np.load(tmp_path / "b" / second[case.case_id]["foreground_sample"]))
    # the grid's class voxels for foreground patches: capped at SAMPLE for the organ (the cap's branch),
    # every row a voxel of its class, the small lesion kept whole
    key, grid = prepare_grid(cases, tmp_path / "a", (0.8, 0.8, 2.0), 2, CLASS_NAMES)
    for case in cases:
        rows = np.load(tmp_path / "a" / "grids" / key / grid[case.case_id]["where"])
        labels = np.load(tmp_path / "a" / "grids" / key / grid[case.case_id]["mask"])
        counts = np.bincount(labels.ravel(), minlength=3)
        assert counts[1] > SAMPLE and (rows[:, 0] == 1).sum() == SAMPLE
        assert (rows[:, 0] == 2).sum() == min(counts[2], SAMPLE)
        assert (labels[rows[:, 1], rows[:, 2], rows[:, 3]] == rows[:, 0]).all()
