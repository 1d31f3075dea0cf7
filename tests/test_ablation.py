"""`medseg ablation`: the suite's runs, resuming and skipping, and a two-variant micro-ablation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.cli.identity import fit_settings
from pipeline.errors import DataError
from pipeline.experiments.ablation import run_all
from pipeline.experiments.suite import Run, plan
from pipeline.run.directory import run_state
from pipeline.run.naming import dataset_name
from tests.conftest import REPO
from tests.helpers.ablation import RUNS, ablation_args


def test_ablation_plan_names_each_network_of_the_suite_once(monkeypatch):
    monkeypatch.chdir(REPO)
    experiment, runs = plan(profile="cpu", parse=fit_settings)
    names = [run.name for run in runs]
    # 5 models + 2 x 8 grid cells, of which unet and unet_noskip (relu, kaiming, batch) are two
    assert experiment == "ablation" and len(names) == len(set(names)) == 19
    assert {
        "unet-relu-kaiming-s0",
        "unet-noskip-relu-kaiming-s0",
        "unet-residual-relu-kaiming-s0",
        "unet-noskip-residual-relu-kaiming-s0",
        "resnet_unet-resnet18-relu-kaiming-s0",
        "unet-sigmoid-default-nonorm-s0",
        "unet-noskip-sigmoid-default-nonorm-s0",
        "unet-noskip-relu-kaiming-nonorm-s0",
    } <= set(names)
    args = " ".join(runs[names.index("unet-noskip-sigmoid-default-nonorm-s0")].args)
    assert "-c configs/model/unet_noskip.yaml -c configs/experiment/ablation_cpu.yaml" in args
    assert "--model.net.init_args.features [8, 16, 32, 64, 128]" in args
    assert (
        "--model.net.init_args.act sigmoid --model.net.init_args.init default --model.net.init_args.norm none"
        in args
    )
    assert "--run.experiment ablation --run.name unet-noskip-sigmoid-default-nonorm-s0" in args
    # in the folder of the suite's data set (configs/data/synthetic.yaml: data/synthetic), as fit names it
    assert runs[0].directory == Path("runs/ablation/synthetic") / names[0]

    experiment, runs = plan(profile="gpu", only=["unet-relu-kaiming-s?"], parse=fit_settings)
    assert experiment == "ablation-gpu"
    assert [run.name for run in runs] == [f"unet-relu-kaiming-s{seed}" for seed in range(3)]
    assert "--model.net.init_args.features [32, 64, 128, 256, 512]" in " ".join(runs[0].args)


def test_ablation_refuses_extra_flags_that_would_rename_runs(monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ValueError, match="is set by the suite"):
        plan(profile="cpu", extra=["--model.net.init_args.act", "tanh"], parse=fit_settings)
    with pytest.raises(ValueError, match="unknown profile 'tpu'; valid: auto, cpu, gpu"):
        plan(profile="tpu", parse=fit_settings)


def _run_dir(path: Path, summary: dict | None, last: bool) -> Path:
    (path / "checkpoints").mkdir(parents=True)
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    if last:
        (path / "checkpoints" / "last.ckpt").write_bytes(b"")
    return path


def test_ablation_run_all_skips_done_runs_resumes_interrupted_ones_and_survives_a_failure(tmp_path):
    done = _run_dir(tmp_path / "done", {"status": "completed"}, last=True)
    diverged = _run_dir(
        tmp_path / "diverged", {"status": "failed", "DivergenceGuard": {"diverged": True}}, True
    )
    interrupted = _run_dir(tmp_path / "interrupted", {"status": "failed: KeyboardInterrupt: "}, last=True)
    broken = _run_dir(tmp_path / "broken", None, last=False)
    assert [run_state(p) for p in (done, diverged, interrupted, broken)] == [
        "completed",
        "diverged",
        "resume",
        "new",
    ]
    calls = []

    def fit(args):
        calls.append(list(args))
        if args[0] == "broken":
            raise RuntimeError("bad variant")
        (Path(args[1]) / "summary.json").write_text(
            json.dumps({"status": "completed", "best": {"val/dice": 0.5}})
        )

    runs = [Run(p.name, p, (p.name, str(p))) for p in (done, diverged, interrupted, broken)]
    lines: list[str] = []
    counts = run_all(runs, tmp_path / "suite.json", "medseg ablation", fit, lines.append)
    assert counts == {"trained": 1, "skipped": 2, "diverged": 0, "failed": 1}
    assert calls == [["interrupted", str(interrupted), "--ckpt_path", "last"], ["broken", str(broken)]]
    assert any("interrupted: completed in" in line and "best val/dice 0.500" in line for line in lines)
    record = json.loads((tmp_path / "suite.json").read_text())
    assert record["runs"]["broken"]["error"] == "RuntimeError: bad variant"
    assert record["runs"]["interrupted"]["outcome"] == "completed" and "done" not in record["runs"]


def test_ablation_micro_suite_trains_every_run_then_skips_them(micro_ablation, phantom_dir, capsys):
    runs = micro_ablation / dataset_name(phantom_dir)  # the data set's folder of the experiment
    for name in RUNS:
        summary = json.loads((runs / name / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["experiment"] == "micro", name
        assert summary["GradientFlowMonitor"]["logs"] == 2
    record = json.loads((micro_ablation / "suite.json").read_text())
    assert [record["runs"][name]["outcome"] for name in RUNS] == ["completed", "completed"]
    assert record["command"].startswith("medseg ablation --suite ")
    written = {name: (runs / name / "summary.json").stat().st_mtime_ns for name in RUNS}

    folder = micro_ablation.parents[1]
    main(ablation_args(folder / "suite.yaml", folder / "runs", phantom_dir))
    out = capsys.readouterr().out
    assert out.count(": skipped (completed)") == 2 and "2 skipped" in out
    assert written == {name: (runs / name / "summary.json").stat().st_mtime_ns for name in RUNS}


def test_ablation_stops_at_a_data_error_instead_of_failing_every_run(tmp_path):
    runs = [Run(name, tmp_path / name, (name,)) for name in ("first", "second")]
    calls = []

    def fit(args):
        calls.append(args[0])
        raise DataError("data/synthetic", "data folder not found")

    with pytest.raises(DataError, match="data folder not found"):
        run_all(runs, tmp_path / "suite.json", "medseg ablation", fit, lambda line: None)
    assert calls == ["first"]


SUITE_3D = "configs/experiment/ablation3d.yaml"
VANISHING_3D, REFERENCE_3D = "unet3d-noskip-sigmoid-default-nonorm-s0", "unet3d-relu-kaiming-s0"


def test_ablation3d_suite_composes_msd_data_and_the_3d_models(monkeypatch):
    monkeypatch.chdir(REPO)
    experiment, runs = plan(SUITE_3D, profile="cpu", parse=fit_settings)
    names = [run.name for run in runs]
    # 4 models (long x short skips) + 2 x 8 grid cells, of which unet3d and unet3d_noskip are two
    assert experiment == "ablation3d" and len(names) == len(set(names)) == 18
    assert {REFERENCE_3D, "unet3d-noskip-residual-relu-kaiming-s0", VANISHING_3D} <= set(names)
    args = " ".join(runs[names.index(VANISHING_3D)].args)
    assert args.startswith(
        "fit -c configs/default.yaml -c configs/data/msd.yaml -c configs/model/unet3d_noskip.yaml"
    )
    assert (
        "-c configs/experiment/ablation3d_cpu.yaml --model.net.init_args.features [8, 16, 32, 64, 128]"
        in args
    )
    experiment, runs = plan(SUITE_3D, profile="gpu", only=[REFERENCE_3D], parse=fit_settings)
    assert experiment == "ablation3d-gpu" and "[32, 64, 128, 256, 320]" in " ".join(runs[0].args)


@pytest.mark.slow
def test_ablation3d_flags_vanishing_gradients_in_the_noskip_sigmoid_unet3d_only(
    volume_dir, tmp_path, monkeypatch
):
    """The 3D suite's two extreme runs, as it composes them (msd.yaml planning generated volumes,
    the CPU profile's widths), for a few steps: only the no-skip sigmoid UNet is flagged."""
    monkeypatch.chdir(REPO)
    tiny = [
        "--data.root",
        str(volume_dir),
        "--data.cache_dir",
        str(tmp_path / "cache"),
        "--data.num_workers",
        "0",
    ]
    tiny += [
        "--data.iterations_per_epoch",
        "5",
        "--trainer.max_epochs",
        "1",
        "--trainer.log_every_n_steps",
        "1",
    ]
    only = [arg for name in (VANISHING_3D, REFERENCE_3D) for arg in ("--only", name)]
    main(
        [
            "ablation",
            "--suite",
            SUITE_3D,
            "--profile",
            "cpu",
            "--root",
            str(tmp_path),
            *only,
            "--",
            *tiny,
            "--run.wandb",
            "false",
        ]
    )
    for name, vanishes in ((VANISHING_3D, True), (REFERENCE_3D, False)):
        run = tmp_path / "ablation3d" / volume_dir.name / name  # runs/<experiment>/<data set>/<run>
        summary = json.loads((run / "summary.json").read_text())
        grads = summary["GradientFlowMonitor"]
        assert summary["status"] == "completed" and grads["logs"] == 5, name
        assert grads["vanishing"]["detected"] is vanishes, (name, grads["first_last_ratio"])
        assert (grads["first_last_ratio"]["end"] < 1e-3) is vanishes, (name, grads["first_last_ratio"])
    config = (tmp_path / "ablation3d" / volume_dir.name / REFERENCE_3D / "config.yaml").read_text()
    assert "spatial_dims: 3" in config and "strides:" in config  # planned for the volumes
