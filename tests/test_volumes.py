import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.data.augment.transforms2d import Augmentation
from pipeline.data.cache.slicing import to_slices
from pipeline.data.datamodule import SegmentationDataModule
from pipeline.data.normalization import Normalization, fit_intensity
from tests.conftest import fit_args, run_path
from tests.helpers.scores import assert_scores_agree

SHAPE = (6, 8, 5)  # stored voxels; distinct sides, so a wrong axis shows in the sample shape
SPACING = (1.5, 1.0, 3.0)


def _world_volumes(root, stored_order: str, cases: int = 2):
    """MSD volumes whose intensity is the world x coordinate (scaled to [0, 1]) and whose mask is a
    known function of world position: 1 where x > 0, +1 where z > 0. Stored in RAS or LPS order."""
    ras = np.diag([*SPACING, 1.0])
    ras[:3, 3] = -ras[:3, :3] @ ((np.asarray(SHAPE) - 1) / 2) + [0.25, 0.0, 0.5]  # no voxel at x or z = 0
    flip = np.diag([-1.0, -1.0, 1.0, 1.0]) if stored_order == "LPS" else np.eye(4)
    affine = ras @ flip
    affine[:3, 3] = ras[:3, :3] @ (np.asarray(SHAPE) - 1) * (np.diag(flip)[:3] < 0) + ras[:3, 3]
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij"), -1)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    image = ((xyz[..., 0] + 10) / 20).astype(np.float32)
    mask = ((xyz[..., 0] > 0).astype(np.uint8) + (xyz[..., 2] > 0)).astype(np.uint8)
    training = []
    for i in range(cases):
        for folder, array in (("imagesTr", image), ("labelsTr", mask)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, affine), root / folder / f"c{i}.nii.gz")
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    meta = {"labels": {"0": "background", "1": "right", "2": "right_superior"}, "modality": {"0": "MR"}}
    (root / "dataset.json").write_text(json.dumps({**meta, "training": training}))
    return root


def _training_slices(root, cache, axis) -> list[tuple[str, int, np.ndarray, np.ndarray]]:
    dm = SegmentationDataModule(
        root=str(root),
        cache_dir=str(cache),
        slice_axis=axis,
        normalization=Normalization(mode="none"),
        augmentation=Augmentation(enabled=False),
        num_workers=0,
        val_fraction=0.5,
    )
    dm.setup("fit")
    train = dm.datasets["train"]
    items = [train[i] for i in range(len(train))]
    return [(s["case_id"], s["slice_index"], s["image"][0].numpy(), s["mask"].numpy()) for s in items]


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_volumes_slice_along_the_axis_with_the_mask_aligned(tmp_path, axis):
    root = _world_volumes(tmp_path / "lps", "LPS")
    slices = _training_slices(root, tmp_path / "cache", axis)
    # expected, from world coordinates alone: canonical RAS index i grows with x, k with z
    xs = np.sort(-10 + 20 * np.unique(nib.load(root / "imagesTr" / "c0.nii.gz").get_fdata()))
    ras_x = (np.arange(SHAPE[0]) - (SHAPE[0] - 1) / 2) * SPACING[0] + 0.25
    ras_z = (np.arange(SHAPE[2]) - (SHAPE[2] - 1) / 2) * SPACING[2] + 0.5
    assert np.allclose(xs, ras_x, atol=1e-4)
    expected_mask = (ras_x[:, None, None] > 0).astype(int) + (ras_z[None, None, :] > 0) + np.zeros(SHAPE, int)
    expected_image = ((ras_x[:, None, None] + 10) / 20) + np.zeros(SHAPE)
    assert len(slices) == SHAPE[axis]
    for _, s, image, mask in slices:
        assert mask.shape == tuple(n for a, n in enumerate(SHAPE) if a != axis)
        assert np.array_equal(mask, to_slices(expected_mask, axis)[s])
        assert np.allclose(image, to_slices(expected_image, axis)[s], atol=1e-5)


def test_volumes_lps_and_ras_copies_give_identical_training_slices(tmp_path):
    lps = _training_slices(_world_volumes(tmp_path / "lps", "LPS"), tmp_path / "c1", "auto")
    ras = _training_slices(_world_volumes(tmp_path / "ras", "RAS"), tmp_path / "c2", "auto")
    assert len(lps) == len(ras) == SHAPE[2]  # auto: the 3 mm axis
    for (ca, sa, ia, ma), (cb, sb, ib, mb) in zip(lps, ras, strict=True):
        assert (ca, sa) == (cb, sb) and np.array_equal(ia, ib) and np.array_equal(ma, mb)


def test_volumes_ct_uses_foreground_percentiles_of_the_training_cases(volume_dir, tmp_path):
    dm = SegmentationDataModule(root=str(volume_dir), cache_dir=str(tmp_path / "cache"), num_workers=0)
    dm.setup("fit")
    pre = dm.preprocessing()
    json.dumps(pre.to_checkpoint())  # plain types only
    foreground = []
    for case in dm.split["train"]:
        image = nib.load(volume_dir / "imagesTr" / f"{case}.nii.gz").get_fdata()
        foreground.append(image[nib.load(volume_dir / "labelsTr" / f"{case}.nii.gz").get_fdata() > 0])
    foreground = np.concatenate(foreground)
    (norm,) = pre.normalization
    assert norm.mode == "ct" and pre.modalities == ("CT",) and pre.slice_axis == 2
    assert np.allclose(norm.window, np.percentile(foreground, [0.5, 99.5]))
    assert np.isclose(norm.mean, foreground.mean()) and np.isclose(norm.std, foreground.std())
    # a validation slice is clipped to the window and z-scored with the foreground moments
    case = dm.datasets["val"].cases[0]
    raw = np.asarray(case.image[6], dtype=float)[..., 0]
    expected = (np.clip(raw, *norm.window) - norm.mean) / norm.std
    assert np.allclose(dm.datasets["val"][0]["image"][0, 6].numpy(), expected, atol=1e-4)


def test_volumes_statistics_and_plan_ignore_the_validation_and_test_cases(volume_dir, tmp_path):
    # 2 training, 2 validation and 2 test cases: the 4 held out, changed below, are a majority of
    # what a planner that leaked them would see, so its medians (spacing, patch) would move
    def learned(root):
        dm = SegmentationDataModule(
            root=str(root),
            val_fraction=0.34,
            test_fraction=0.34,
            cache_dir=str(root / "cache"),
            num_workers=0,
        )
        plan = dm.resolve_plan()
        return dm.split, dm.preprocessing().normalization, plan.target_spacing, plan.net_2d

    root = tmp_path / "msd"
    shutil.copytree(volume_dir, root)
    split, norms, spacing, net = learned(root)
    assert [len(split[k]) for k in ("train", "val", "test")] == [2, 2, 2]
    for case in (*split["val"], *split["test"]):  # brighter, and at another spacing
        path = root / "imagesTr" / f"{case}.nii.gz"
        image = nib.load(path)
        affine = image.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
        data = np.asanyarray(image.dataobj).astype(np.int16) + 300
        nib.save(nib.Nifti1Image(data, affine), path)
        mask = nib.load(root / "labelsTr" / f"{case}.nii.gz")
        nib.save(nib.Nifti1Image(np.asanyarray(mask.dataobj), affine), root / "labelsTr" / f"{case}.nii.gz")
    assert learned(root) == (split, norms, spacing, net)


def test_volumes_per_channel_stats_match_fitting_each_channel_alone():
    rng = np.random.default_rng(0)
    image = np.stack([rng.normal(40, 30, (5, 6, 7)), rng.normal(300, 50, (5, 6, 7))], -1)
    ct = Normalization("ct", window=(-100.0, 200.0), mean=50.0, std=40.0)
    stats = fit_intensity(image, [ct, Normalization("zscore")])
    alone = fit_intensity(image[..., 1:], Normalization("zscore"))
    assert stats.lo.tolist() == [-100.0, alone.lo[0]] and np.isclose(stats.std[1], alone.std[0])
    with pytest.raises(ValueError, match="resolve it with resolve_channels"):
        fit_intensity(image, Normalization("auto"))


def test_volumes_one_epoch_fit_through_the_cli(volume_dir, tmp_path):
    args = fit_args(volume_dir, tmp_path / "runs", "--run.experiment", "vol", "--run.wandb", "false")
    args += ["--data.normalization.mode", "auto", "--data.cache_dir", str(tmp_path / "cache")]
    args += ["--data.patch_size", "[32, 32]", "--model.net.init_args.features", "[8, 16]"]
    args += ["--trainer.limit_val_batches", "1.0", "--data.iterations_per_epoch", "2"]
    main(args)
    run = run_path(tmp_path / "runs", "vol", volume_dir, "unet-relu-kaiming-d2-s0")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert_scores_agree(summary["final"], ("organ", "lesion"))  # per case in 3D
    assert summary["final"]["val/dice"] > 0.01  # seed 0, 2 steps: 0.037 (all background scores 0)
    pre = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["medseg"]["preprocessing"]
    assert pre["layout"] == "msd" and pre["slice_axis"] == 2 and pre["volumetric"]
    assert pre["channel_normalization"][0]["mode"] == "ct" and pre["patch_size"] == [32, 32]


def test_volumes_a_two_channel_task_trains_and_infers_with_per_channel_normalisation(tmp_path):
    # MSD 4D files of two channels (prostate-like T2 + ADC): a fit and medseg infer through them,
    # each channel normalised on its own (MR: z-score of the case's own channel statistics)
    from pipeline.data.synthesis.phantoms_3d import generate_volumes
    from tests.conftest import volume_fit_args

    root = generate_volumes(tmp_path / "msd", num_cases=4, modalities=("T2", "ADC"))
    extra = ("--run.name", "two", "--data.cache_dir", str(tmp_path / "cache"), "--trainer.max_epochs", "1",
             "--data.iterations_per_epoch", "2", "--model.net.init_args.features", "[4, 8, 16, 32]")  # fmt: skip
    main(volume_fit_args(root, tmp_path / "runs", "unet", *extra))
    last = run_path(tmp_path / "runs", "default", root, "two") / "checkpoints" / "last.ckpt"
    stored = torch.load(last, map_location="cpu", weights_only=True)["medseg"]
    assert stored["net"]["init_args"]["in_channels"] == 2
    prep = stored["preprocessing"]
    assert prep["modalities"] == ["T2", "ADC"] and prep["in_channels"] == 2
    assert [n["mode"] for n in prep["channel_normalization"]] == ["zscore", "zscore"]  # per case, per channel
    main(["infer", "--checkpoint", str(last), "--input", str(root / "imagesTr" / "vol_000.nii.gz"),
          "--output", str(tmp_path / "out"), "--num-workers", "0"])  # fmt: skip
    source, written = (
        nib.load(root / "imagesTr" / "vol_000.nii.gz"),
        nib.load(tmp_path / "out" / "vol_000.nii.gz"),
    )
    assert written.shape == source.shape[:3] and np.allclose(written.affine, source.affine)
    assert set(np.unique(np.asanyarray(written.dataobj))) <= {0, 1, 2}
