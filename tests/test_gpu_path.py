"""The CUDA path on the CPU: channels-last weights set before any wrapper, bf16, the per-step checks
at a GPU's cadence (flags read every N steps), DDP with channels-last, and torch.compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from benchmarks import gpu_check as gpu_check_module
from benchmarks import user_runs
from benchmarks.gpu_check import SECTIONS
from benchmarks.gpu_check import main as gpu_check
from benchmarks.gpu_throughput import ARMS
from benchmarks.host_syncs import count_fit
from pipeline.cli import main
from pipeline.models import UNet
from pipeline.training.checkpoint import load_checkpoint
from pipeline.training.module import SegmentationModule
from tests.conftest import fit_args, run_path
from tests.helpers.resume import BEST, finish, kill_at, last_every, run_args, start_fit
from tests.helpers.scores import assert_scores_agree

RUN = "unet-relu-kaiming-d3-s0"  # of experiment "resume"
STRIDE_WARNING = "Grad strides do not match bucket view strides"


def channels_last(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()


def conv_weights(state: dict) -> dict[str, torch.Tensor]:
    """The 4-d tensors whose two layouts differ (more than one input channel, kernels beyond 1x1)."""
    return {k: v for k, v in state.items() if v.ndim == 4 and v.shape[1] > 1 and v.shape[-1] > 1}


class LayoutAtStrategySetup(pl.Callback):
    """Records whether every convolution weight is channels-last when the strategy's ``setup``
    begins: after ``configure_model``, before the strategy moves the module, wraps it in DDP and
    builds the optimiser (``on_fit_start`` runs after all of that)."""

    weights: bool | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy_setup = trainer.strategy.setup  # Lightning calls it after this hook

        def record_then_setup(trainer: pl.Trainer) -> None:
            self.weights = all(map(channels_last, conv_weights(pl_module.net.state_dict()).values()))
            strategy_setup(trainer)

        trainer.strategy.setup = record_then_setup  # type: ignore[method-assign]


def tiny_fit(
    module: SegmentationModule, tmp_path: Path, ckpt_path: str | None = None, *callbacks
) -> pl.Trainer:
    """Two steps on random 16x16 images, on the CPU."""
    torch.manual_seed(0)
    data = [{"image": torch.randn(2, 1, 16, 16), "mask": torch.randint(3, (2, 16, 16))} for _ in range(2)]
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1 if ckpt_path is None else 2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=list(callbacks),
    )
    trainer.fit(module, DataLoader(data, batch_size=None), ckpt_path=ckpt_path)
    return trainer


def test_module_channels_last_weights_are_set_before_training_starts(tmp_path):
    module = SegmentationModule(UNet(1, 3, features=(4, 8)), hd95=False, channels_last_on_cpu=True)
    seen = LayoutAtStrategySetup()
    trainer = tiny_fit(module, tmp_path, None, seen)
    assert seen.weights is True  # before DDP or the optimiser could see them, not at the first batch
    assert module.memory_format == torch.channels_last
    state = trainer.optimizers[0].state
    moments = [state[p]["exp_avg"] for p in module.net.parameters() if p.ndim == 4 and min(p.shape[1:]) > 1]
    assert moments and all(map(channels_last, moments))


def test_module_resumed_optimizer_state_takes_the_weights_layout(tmp_path):
    # a run started without channels-last (contiguous Adam moments) resumed with it
    first = tiny_fit(
        SegmentationModule(UNet(1, 3, features=(4, 8)), hd95=False, channels_last=False), tmp_path
    )
    first.save_checkpoint(tmp_path / "contiguous.ckpt")
    module = SegmentationModule(UNet(1, 3, features=(4, 8)), hd95=False, channels_last_on_cpu=True)
    trainer = tiny_fit(module, tmp_path, str(tmp_path / "contiguous.ckpt"))
    state = trainer.optimizers[0].state
    for param in module.net.parameters():
        assert state[param]["exp_avg"].stride() == param.stride()
        assert state[param]["exp_avg_sq"].stride() == param.stride()


def test_fit_bf16_mixed_with_channels_last_and_checks_every_2_steps(phantom_dir, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    dtypes: list[torch.dtype] = []  # of the network's output in each training step
    training_step = SegmentationModule.training_step

    def recording_step(self, batch, batch_idx):
        hook = self.net.register_forward_hook(lambda net, args, out: dtypes.append(out.dtype))
        try:
            return training_step(self, batch, batch_idx)
        finally:
            hook.remove()

    monkeypatch.setattr(SegmentationModule, "training_step", recording_step)
    cuda_path = ("--trainer.precision", "bf16-mixed", "--model.channels_last_on_cpu", "true")
    cuda_path += (
        "--run.sync_every_n_steps",
        "2",
        "--data.batch_size",
        "2",
        "--trainer.limit_train_batches",
        "3",
    )
    main(fit_args(phantom_dir, runs, "--run.experiment", "bf16", "--run.wandb", "false", *cuda_path))
    run = run_path(runs, "bf16", phantom_dir, "unet-relu-kaiming-d3-s0")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 3
    assert dtypes == [torch.bfloat16] * 3  # the forward ran under bf16 autocast
    assert not summary["DivergenceGuard"]["diverged"]
    assert_scores_agree(summary["final"], ("organ", "lesion", "vessel"))
    assert summary["final"]["val/dice"] > 0.05  # seed 0, 3 steps in bf16: 0.10 (all background scores 0)
    weights = conv_weights(load_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"])
    assert weights and all(map(channels_last, weights.values()))  # the layout trained in
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_guards_at_a_gpu_cadence_the_host_reads_nothing_between_checks():
    # default callbacks, progress bar on; on a CPU the count is of the reads that would sync on a GPU
    quiet = ["--run.sync_every_n_steps", "50", "--trainer.log_every_n_steps", "50"]
    syncs = count_fit(steps=6, backend="reads", extra=quiet, size=32, batch_size=2)
    assert syncs["per_step"][1:] == [0, 0, 0, 0, 0], syncs["sites"]  # step 0: first logs of monitor and bar
    exact = count_fit(
        steps=3, backend="reads", extra=["--trainer.log_every_n_steps", "50"], size=32, batch_size=2
    )
    assert exact["per_step"][1:] == [2, 2]  # on a CPU by default: the guard's read and the bar's loss


def diverging(data: Path, runs: Path, callbacks: list[dict], every: int, batches: int = 3) -> tuple[int, str]:
    """A fit with lr 1e30 (step 1 is the first non-finite one) whose flags are read every ``every`` steps."""
    args = run_args(data, runs, callbacks, "--run.wandb", "false", "--model.lr", "1e30")
    args += ["--run.sync_every_n_steps", str(every), "--trainer.limit_train_batches", str(batches)]
    code, err = finish(start_fit(args))
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(lines) == 1, err[-3000:]
    return code, lines[0]


def test_guards_read_every_3_steps_stop_within_3_steps_naming_the_first_bad_one(phantom_dir, tmp_path):
    _, error = diverging(phantom_dir, tmp_path / "runs", [BEST, last_every(0)], every=3, batches=5)
    assert "training diverged at step 1 (epoch 0, batch 1)" in error
    assert "Found at step 3 (checked every 3 steps)" in error and "no checkpoint was written yet" in error
    run = run_path(tmp_path / "runs", "resume", phantom_dir, RUN)
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    assert json.loads((run / "summary.json").read_text())["DivergenceGuard"]["found_at_step"] == 3


def test_guards_read_before_every_checkpoint_so_none_holds_nan_weights(phantom_dir, tmp_path):
    # last.ckpt every step, flags read every 50: the save after step 1 reads them first and stops
    _, error = diverging(phantom_dir, tmp_path / "runs", [BEST, last_every(1)], every=50)
    assert "training diverged at step 1 (epoch 0, batch 1)" in error and "Found at step 2" in error
    checkpoint = load_checkpoint(
        run_path(tmp_path / "runs", "resume", phantom_dir, RUN) / "checkpoints" / "last.ckpt"
    )
    assert checkpoint["global_step"] == 1  # written after step 0; step 1's save never happened
    weights = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    assert weights and all(torch.isfinite(v).all() for v in weights.values())


@pytest.mark.slow
def test_ddp_channels_last_two_processes_keep_the_fast_path_and_stop_on_sigterm_within_2_steps(
    phantom_dir, tmp_path
):
    # Both ranks get SIGTERM during step 1; with the flags read every 2 steps the ranks agree on it
    # at step 1's end (one all-reduce with the divergence flag) and save there.
    runs = tmp_path / "runs"
    ddp = ("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    ddp += ("--model.channels_last_on_cpu", "true", "--run.sync_every_n_steps", "2", "--run.wandb", "false")
    code, err = finish(
        start_fit(run_args(phantom_dir, runs, [BEST, last_every(0), kill_at(1, "SIGTERM")], *ddp)), 240
    )
    assert code == 143, err[-3000:]
    assert STRIDE_WARNING not in err  # DDP built its buckets after the weights became channels-last
    checkpoint = load_checkpoint(run_path(runs, "resume", phantom_dir, RUN) / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 2
    weights = conv_weights(checkpoint["state_dict"])
    assert weights and all(map(channels_last, weights.values()))


@pytest.mark.slow
def test_fit_compiled_network_with_the_monitors_on(phantom_dir, tmp_path):
    # torch.compile (inductor) of a tiny UNet: forward, training step and the monitors' hooks
    runs = tmp_path / "runs"
    main(
        fit_args(
            phantom_dir,
            runs,
            "--run.experiment",
            "compiled",
            "--model.compile",
            "true",
            "--run.wandb",
            "false",
        )
    )
    run = run_path(runs, "compiled", phantom_dir, "unet-relu-kaiming-d3-s0")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["GradientFlowMonitor"]["logs"] == 2
    dead = summary["ActivationMonitor"]
    assert dead and all(key.startswith("dead_relu/") and 0.0 <= v <= 1.0 for key, v in dead.items())
    assert set(summary["WeightUpdateMonitor"]["last"])  # every layer's update measured


@pytest.mark.slow
def test_gpu_check_dry_run_on_the_cpu_writes_its_report(tmp_path):
    # every section and every arm, torch.compile's too (it runs on CPUs), within a small budget
    assert gpu_check(["--cpu", "--budget", "300", "--output", str(tmp_path)]) == 0
    (json_file,) = tmp_path.glob("gpu_check-*.json")
    report = json.loads(json_file.read_text())
    sections = report["sections"]
    assert report["dry_run"] and set(sections) == set(SECTIONS) == {
        "environment", "throughput", "data_wait", "train", "infer", "train3d", "infer3d", "overhead"
    }  # fmt: skip
    assert not [name for name, result in sections.items() if "error" in result]
    assert set(report["budget_s"]) == set(report["seconds"]) == set(sections)
    assert not any(report["stopped_at_budget"].values()), report["seconds"]
    table = json_file.with_suffix(".md").read_text()
    for case in ("unet2d", "unet3d"):
        result = sections["throughput"][case]
        assert set(result["images_per_s"]) | set(result["errors"]) == set(ARMS), case
        assert set(result["errors"]) <= {"bf16_cl_compile"} and not result["not_run"], result["errors"]
        if result["errors"]:  # a compiler that fails on this CPU: its row says so
            assert f"| {case} | bf16_cl_compile failed |" in table
        else:
            assert f"| {case} | bf16_cl_compile vs fp32 (img/s) |" in table
    assert len(sections["throughput"]["unet3d"]["input"]["spatial"]) == 3  # a planned 3D patch
    wait = sections["data_wait"]["runs"]["0"]
    assert (
        0 <= wait["wait_fraction"] <= 1 and wait["batches_per_epoch"] > wait["warmup_steps"] + wait["steps"]
    )
    for name in ("train", "train3d"):  # the 3D fit's weights channels-last-3d, as on a GPU
        train = sections[name]
        assert train["exit"] == 0 and train["status"] == "completed" and train["stride_warnings"] == 0
        assert train["bf16"] and train["channels_last_weights"] == train["conv_weights"] > 0, name
    for name in ("infer", "infer3d"):
        assert sections[name]["exit"] == 0 and sections[name]["ok"] == sections[name]["cases"], name
    overhead = sections["overhead"]
    assert overhead["host_syncs"]["median"] == 0 and not overhead["not_run"]  # at a GPU's cadence
    assert set(overhead["ms_per_step"]) == {"pipeline", "monitors", "guards"}
    assert "| train | medseg fit: exit status + stride-mismatch warnings | 0 |" in table
    assert "| train3d | medseg fit: exit status + stride-mismatch warnings | 0 |" in table
    assert "| data_wait | unet2d: share of step time waiting for data, 0 workers (steady state) |" in table
    assert "| budget | all sections: seconds vs budget |" in table and "Host-to-device copies" in table


def test_gpu_check_sections_stop_at_a_spent_budget_and_say_so(tmp_path):
    sections = ["throughput", "data_wait", "overhead"]
    assert gpu_check(["--cpu", "--only", *sections, "--budget", "0", "--output", str(tmp_path)]) == 0
    (json_file,) = tmp_path.glob("gpu_check-*.json")
    report = json.loads(json_file.read_text())
    assert report["stopped_at_budget"] == dict.fromkeys(sections, True)
    throughput = report["sections"]["throughput"]
    assert all(set(throughput[case]["not_run"]) == set(ARMS) for case in ("unet2d", "unet3d"))
    assert set(report["sections"]["data_wait"]["not_run"]) == {"0"}
    assert set(report["sections"]["overhead"]["not_run"]) == {
        "all", "no_monitors", "no_monitors_no_guards", "host_syncs"
    }  # fmt: skip
    table = json_file.with_suffix(".md").read_text()
    assert "| unet2d | bf16_cl_compile not run | time budget spent before its warm-up |" in table
    assert "| budget | overhead: seconds vs budget (stopped at its budget) |" in table


def test_gpu_check_nvidia_smi_missing_or_failing_is_recorded_as_unavailable(monkeypatch):
    monkeypatch.setattr(gpu_check_module.shutil, "which", lambda name: None)
    assert gpu_check_module.nvidia_smi() == "unavailable: nvidia-smi not found"
    monkeypatch.setattr(gpu_check_module.shutil, "which", lambda name: "/usr/bin/nvidia-smi")

    def broken(*args, **kwargs):
        raise OSError("Exec format error")

    monkeypatch.setattr(gpu_check_module.subprocess, "run", broken)
    assert gpu_check_module.nvidia_smi() == "unavailable: OSError: Exec format error"
    failed = subprocess.CompletedProcess([], 9, "", "NVIDIA-SMI has failed: no driver")
    monkeypatch.setattr(gpu_check_module.subprocess, "run", lambda *args, **kwargs: failed)
    assert gpu_check_module.nvidia_smi() == "unavailable: exit status 9: NVIDIA-SMI has failed: no driver"


def test_gpu_check_child_runs_are_killed_at_their_time_limit(tmp_path):
    synth = ["data", "synth", "--output", str(tmp_path / "data"), "--num-images", "100000"]  # minutes
    code, seconds, _ = user_runs.medseg(synth, tmp_path / "log", timeout=1.0)
    assert code == user_runs.TIMED_OUT and seconds < 10


def test_gpu_check_runs_as_a_script_without_make(tmp_path):
    script = Path(gpu_check_module.__file__)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the script finds the repository itself
    done = subprocess.run(
        [sys.executable, str(script), "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0 and "--budget" in done.stdout, done.stderr[-2000:]
