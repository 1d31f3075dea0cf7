"""The plan's rules on fingerprints with known answers, and planning inside ``medseg fit``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from pipeline.cli import main
from pipeline.data.planning.fingerprint import CaseFacts, Fingerprint
from pipeline.data.planning.network_rules import PlanSettings, activation_bytes, pooling
from pipeline.data.planning.rules import make_plan, target_spacing
from tests.conftest import volume_fit_args

GPU, CPU = PlanSettings(device="gpu"), PlanSettings(device="cpu")


def fingerprint(spacings, shapes, classes=3) -> Fingerprint:
    facts = [
        CaseFacts(str(i), tuple(s), tuple(n), {0: 1})
        for i, (s, n) in enumerate(zip(spacings, shapes, strict=True))
    ]
    return Fingerprint.of(facts, classes, None)


def test_plan_target_spacing_is_the_median_and_a_low_percentile_along_thick_slices():
    iso = fingerprint([(1.0, 1.0, 1.0)] * 4 + [(1.2, 1.2, 1.4)], [(50, 50, 50)] * 5)
    assert target_spacing(iso) == (1.0, 1.0, 1.0)
    # 5 mm slices for most cases, 1.5 mm for a third: the thin cases keep their resolution
    thick = fingerprint([(0.8, 0.8, 5.0)] * 6 + [(0.8, 0.8, 1.5)] * 3, [(512, 512, 60)] * 9)
    assert target_spacing(thick) == pytest.approx((0.8, 0.8, np.percentile([5.0] * 6 + [1.5] * 3, 10)))
    # thick slices but as many voxels across them as in plane: not the anisotropic rule
    many = fingerprint([(0.8, 0.8, 5.0)] * 6 + [(0.8, 0.8, 1.5)] * 3, [(100, 100, 200)] * 9)
    assert target_spacing(many)[2] == 5.0


def test_plan_pools_thick_slices_in_plane_first_with_flat_kernels():
    strides, kernels = pooling((20, 160, 160), (5.0, 0.8, 0.8), levels=6, min_size=4, anisotropic=True)
    assert strides[:2] == ((1, 2, 2), (1, 2, 2)) and strides[2] == (2, 2, 2)  # in-plane until ~isotropic
    assert kernels[0] == (1, 3, 3) and kernels[3] == (3, 3, 3)
    iso, _ = pooling((40, 56, 40), (1.0, 1.0, 1.0), levels=6, min_size=4, anisotropic=True)
    assert [sum(s[a] == 2 for s in iso) for a in range(3)] == [3, 3, 3]  # each axis stops at 4-8 voxels


def test_plan_small_slices_get_small_patches_and_the_five_percent_batch_cap():
    rng = np.random.default_rng(0)
    shapes = [tuple(rng.normal([40, 50, 36], 3).round().astype(int)) for _ in range(200)]
    plan = make_plan(fingerprint([(1.0, 1.0, 1.0)] * 200, shapes), GPU, (16, 32, 64, 128, 256))
    patch = plan.net_2d.patch
    assert max(patch) <= 64 and all(p % 8 == 0 for p in patch)  # about 40 x 50 voxels: no 256 template
    voxels = float(np.prod([np.median(np.array(shapes)[:, a]) for a in range(3)])) * 200
    assert plan.net_2d.batch <= 0.05 * voxels / np.prod(patch) + 1
    few = shapes[:5]
    small = make_plan(fingerprint([(1.0, 1.0, 1.0)] * 5, few), GPU, (16, 32, 64, 128, 256))
    cap = 0.05 * sum(np.prod(n) for n in few) // np.prod(small.net_2d.patch)
    assert small.net_2d.batch == max(2, cap) < 10  # five cases: a step sees at most 5% of their voxels


def test_plan_patches_fit_the_memory_and_cpu_budgets():
    big = fingerprint([(0.8, 0.8, 0.8)] * 10, [(512, 512, 400)] * 10)
    for settings in (GPU, CPU, PlanSettings(device="gpu", memory_gb=1.0)):
        net = make_plan(big, settings, (32, 64, 128, 256, 320, 320)).net_3d
        assert (
            2 * activation_bytes(net.patch, net.strides, (32, 64, 128, 256, 320, 320))
            <= settings.memory_gb * 2**30
        )
    cpu = make_plan(big, CPU, (32, 64, 128, 256, 320, 320)).net_3d
    assert 3 * np.prod(cpu.patch) * cpu.batch <= CPU.cpu_step_voxels  # a 3D voxel counts 3x


def test_plan_fit_fills_unset_values_and_config_yaml_records_them(mixed_volume_dir, tmp_path, capsys):
    main(["plan", str(mixed_volume_dir), "--data.cache_dir", str(tmp_path / "cache")])
    table = capsys.readouterr().out
    assert "target spacing" in table and "2D network" in table and "3D network" in table
    planned = json.loads((tmp_path / "cache" / "plan.json").read_text())
    args = volume_fit_args(
        mixed_volume_dir, tmp_path / "runs", "unet", "--data.cache_dir", str(tmp_path / "cache")
    )
    args += ["--trainer.max_epochs", "1", "--data.iterations_per_epoch", "1", "--data.batch_size", "3"]
    args += ["--model.net.init_args.features", "[4, 8, 16, 32, 64]"]
    main(args)
    (run,) = (tmp_path / "runs" / "default" / mixed_volume_dir.name).iterdir()  # experiment, data set, run
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["patch_size"] == planned["net_2d"]["patch"] and config["data"]["batch_size"] == 3
    assert config["data"]["target_spacing"] == pytest.approx(planned["target_spacing"])
    assert config["data"]["slice_axis"] == planned["slice_axis"] == 2
    assert config["model"]["net"]["init_args"]["strides"] == [list(s) for s in planned["net_2d"]["strides"]]
    assert json.loads((run / "plan.json").read_text())["target_spacing"] == planned["target_spacing"]


def test_plan_json_records_the_network_that_trained(mixed_volume_dir, tmp_path, capsys):
    # a 3D network with its own widths and strides and an explicit batch: the plan is made once, for
    # it, and plan.json (cache and run) holds what trained, not a plan for the default 2D network
    cache = tmp_path / "cache"
    own = ["--model.net.init_args.features", "[4, 8, 16, 32]"]
    own += ["--model.net.init_args.strides", "[[1, 2, 2], [2, 2, 2], [1, 2, 2]]"]
    own += ["--data.batch_size", "3", "--data.cache_dir", str(cache)]
    args = volume_fit_args(mixed_volume_dir, tmp_path / "runs", "unet3d", *own)
    main(["plan", *args[1:]])  # medseg plan takes fit's arguments: the same configs, parsed the same way
    table = capsys.readouterr().out
    planned = json.loads((cache / "plan.json").read_text())
    main([*args, "--trainer.max_epochs", "1", "--data.iterations_per_epoch", "1"])
    (run,) = (tmp_path / "runs" / "default" / mixed_volume_dir.name).iterdir()
    recorded = json.loads((run / "plan.json").read_text())
    assert recorded == planned == json.loads((cache / "plan.json").read_text())
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    trained = checkpoint["medseg"]["net"]["init_args"]
    assert recorded["spatial_dims"] == 3 and "3D network (trains)" in table
    assert recorded["net_3d"]["strides"] == [[1, 2, 2], [2, 2, 2], [1, 2, 2]] == trained["strides"]
    assert recorded["net_3d"]["patch"] == list(checkpoint["hyper_parameters"]["patch_size"])
    assert (
        recorded["net_3d"]["batch"]
        == 3
        == yaml.safe_load((run / "config.yaml").read_text())["data"]["batch_size"]
    )
    assert checkpoint["medseg"]["preprocessing"]["patch_size"] == recorded["net_3d"]["patch"]
    assert "preprocessing" not in checkpoint["SegmentationDataModule"]  # stored once, by the module
    patch = " x ".join(str(n) for n in recorded["net_3d"]["patch"])
    assert f"patch                {recorded['net_2d']['patch'][0]}" in table and patch in table


def test_plan_flags_a_3d_keyhole_and_plans_a_low_resolution_3d_network():
    # CT at real size planned for a CPU: the 3D patch holds a sliver of the case (rule 6), so a
    # coarser spacing is searched where the patch holds a quarter of the median case
    ct = fingerprint([(0.8, 0.8, 2.5)] * 10, [(512, 512, 120)] * 10)
    plan = make_plan(ct, CPU, (16, 32, 64, 128, 256))
    assert plan.keyhole and plan.coverage_3d == pytest.approx(np.prod(plan.net_3d.patch) / (512 * 512 * 120))
    low = plan.lowres_3d
    assert low is not None and low.coverage >= 0.25
    assert np.prod(low.net.patch) / np.prod(low.median_shape) == pytest.approx(low.coverage)
    coarser = np.asarray(low.target_spacing) / np.asarray(plan.target_spacing)
    assert (coarser > 1).all() and coarser[0] == pytest.approx(coarser[1])  # in plane alike
    assert low.target_spacing[2] / low.target_spacing[0] <= 2.5 / 0.8  # the thick axis not made thicker first
    # small cases, or a large budget: the patch sees the case, no keyhole and no low-resolution plan
    small = fingerprint([(1.0, 1.0, 1.0)] * 5, [(40, 48, 32)] * 5)
    cpu, gpu = (make_plan(small, settings, (16, 32, 64, 128, 256)) for settings in (CPU, GPU))
    assert not cpu.keyhole and cpu.lowres_3d is None and 0.25 <= cpu.coverage_3d < 1
    assert not gpu.keyhole and gpu.lowres_3d is None and gpu.coverage_3d == 1.0
