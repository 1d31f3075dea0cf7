"""Benchmark helpers: alternation, medians and ratios, the report files, FLOP counting, and the GPU
benchmark's paths without a GPU. Nothing here is timed: speed is what the benchmarks measure."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from benchmarks import gpu_throughput
from benchmarks.common import alternate, machine_slug, markdown_table, median, ratio, train_flops, write_json
from benchmarks.deep_supervision import main as deep_supervision
from benchmarks.gpu_throughput import main as gpu_main
from benchmarks.inference_speed import bare_pass, infer_device
from benchmarks.memory import smaps_rollup
from benchmarks.preloaded import planned_network, preload
from benchmarks.readme_figures import main as readme_figures
from benchmarks.run_all import summarize, write_report
from benchmarks.training_overhead import PairedSteps
from benchmarks.training_overhead import main as training_overhead
from benchmarks.volume_plan import main as volume_plan
from pipeline.models import UNet
from pipeline.training.module import SegmentationModule


def test_benchmarks_alternate_reverses_every_other_round() -> None:
    calls: list[str] = []
    arms = {name: (lambda name=name: calls.append(name) or len(calls)) for name in "abc"}
    results = alternate(arms, repeats=3)
    assert calls == list("abccbaabc")
    assert results == {"a": [1, 6, 7], "b": [2, 5, 8], "c": [3, 4, 9]}
    asked: list[int] = []
    stopped = alternate(arms, repeats=5, stop=lambda: asked.append(len(calls)) or len(asked) == 2)
    assert asked == [12, 15] and stopped == {"a": [10, 15], "b": [11, 14], "c": [12, 13]}  # whole rounds
    with pytest.raises(ValueError, match="repeats"):
        alternate(arms, repeats=0)


def test_benchmarks_median_and_ratio() -> None:
    assert median([3.0, 1.0, 2.0, 100.0, 0.5]) == 2.0
    assert ratio(1.0, 3.0) == 0.333
    assert math.isnan(ratio(1.0, 0.0))
    with pytest.raises(ValueError):
        median([])


def test_benchmarks_paired_steps_time_baselines_and_pipeline_alike() -> None:
    batches = [{"image": torch.randn(2, 1, 16, 16), "mask": torch.randint(2, (2, 16, 16))} for _ in range(3)]
    # the baselines start from the host batches and copy them themselves, as the pipeline's step does
    paired = PairedSteps(
        {"bare": lambda: UNet(1, 2, features=(4, 8))}, lr=1e-3, clip=1.0, host_batches=batches
    )
    trainer = SimpleNamespace(precision="32-true", estimated_stepping_batches=3)
    module = SimpleNamespace(device=torch.device("cpu"), memory_format=torch.contiguous_format)
    paired.on_train_start(trainer, module)
    for index in range(3):
        paired.on_train_batch_start(trainer, module, {"moved": "by Lightning, not used"}, index)
    assert [len(paired.seconds[k]) for k in ("bare", "pipeline")] == [3, 2]  # pipeline: between calls
    paired.seconds = {"pipeline": [9.0, 1.0, 3.0], "bare": [9.0, 2.0, 2.0]}
    paired.cpu = {"pipeline": [9.0, 1.0, 1.0], "bare": [9.0, 3.0, 1.0]}
    rates = paired.rates(warmup=1, steps=2, batch_size=8)  # the first step is left out
    assert rates == {
        "pipeline": {"images_per_s": 4.0, "cpu_s_per_step": 1.0},
        "bare": {"images_per_s": 4.0, "cpu_s_per_step": 2.0},
    }
    with pytest.raises(RuntimeError, match="steps timed"):
        paired.rates(warmup=2, steps=2, batch_size=8)


def test_benchmarks_preload_gives_planned_3d_patches_and_the_fit_flags_for_that_network(
    volume_dir: Path, tmp_path: Path
) -> None:
    settings = {"spatial_dims": 3, "iterations_per_epoch": 3, "cache_dir": str(tmp_path / "cache")}
    batches, data = preload(volume_dir, None, 4, (4, 8, 16, 32), **settings)
    net = data.plan.net_3d
    assert len(batches) == 4 and data.batch_size == net.batch and data.patch_size == net.patch
    assert batches[0]["image"].shape == (net.batch, 1, *net.patch) and batches[0]["mask"].shape == (
        net.batch,
        *net.patch,
    )
    init, flags = planned_network(data, 3)
    assert init["strides"] == [list(s) for s in net.strides] and len(init["kernel_sizes"]) == 4
    assert init["strides"][0] == [1, 2, 2]  # 3 mm slices at 0.9 mm in plane: pooled in plane first
    assert flags == [
        "--data.patch_size", json.dumps(list(net.patch)),
        "--model.net.init_args.strides", json.dumps(init["strides"]),
        "--model.net.init_args.kernel_sizes", json.dumps(init["kernel_sizes"]),
    ]  # fmt: skip
    assert planned_network(SimpleNamespace(plan=None), 2) == ({}, [])  # 2D images: nothing planned


def test_benchmarks_training_overhead_3d_trains_fit_and_baselines_on_the_planned_network(
    tmp_path: Path,
) -> None:
    args = "--dims 3 --volumes 6 --patch 16 24 24 --features 4 8 16 32 64 --steps 2 --warmup 1 --repeats 1"
    result = training_overhead([*args.split(), "--output", str(tmp_path / "t.json"), "--run.wandb", "false"])
    assert set(result["images_per_s"]) == {"pipeline", "bare", "monai"} and result["ratio"] > 0
    settings = result["settings"]
    assert settings["dims"] == 3 and settings["input"] == [16, 24, 24] and len(settings["strides"]) == 4
    assert result["flops_per_image"]["bare"] > 0 and result["flops_per_image"]["monai"] > 0
    (first, *_) = summarize("training_3d", result)
    shape = "x".join(map(str, settings["input"]))
    assert first[1] == f"3D UNet, {shape} x {settings['batch_size']}: medseg fit vs bare loop (patches/s)"


def test_benchmarks_deep_supervision_trains_scores_and_tables_every_arm(
    volume_dir: Path, tmp_path: Path
) -> None:
    # unknown arguments go to every fit: 2 steps each, so the 30 s per arm is a bound, not the length
    fit = "--trainer.max_steps 2 --data.iterations_per_epoch 2 --data.num_workers 0 --model.hd95 false"
    args = ["--data", str(volume_dir), "--test-cases", "2", "--minutes", "0.5", "--work", str(tmp_path / "w")]
    result = deep_supervision([*args, "--output", str(tmp_path / "ds.json"), *fit.split()])
    arms = result["arms"]
    assert list(arms) == ["2d_off", "2d_on", "3d_on", "3d_off"] and len(result["split"]["test"]) == 2
    assert {arm: r["variant"]["deep_supervision"] for arm, r in arms.items()} == {
        "2d_off": False, "2d_on": True, "3d_on": True, "3d_off": False,
    }  # fmt: skip
    assert all(r["steps"] == 2 and 0 <= r["dice"]["mean"] <= 1 and r["seconds"] > 0 for r in arms.values())
    assert set(arms["3d_on"]["per_case"]) == set(result["split"]["test"])
    table = (tmp_path / "ds.md").read_text()
    assert table.count("\n") == 6 and "| 3d_on | 2 |" in table
    assert json.loads((tmp_path / "ds.json").read_text())["arms"]["2d_on"]["deep_supervision"] is True
    timed = deep_supervision(
        [*args, "--output", str(tmp_path / "ds.json"), "--step-cost-only", "--step-repeats", "1"]
    )
    assert set(timed["step_cost"]) == {"2d", "3d"} and timed["arms"] == result["arms"]  # added, arms kept
    assert timed["step_cost"]["3d"]["batch"] >= 1 and timed["step_cost"]["3d"]["seconds_on"] > 0
    assert "on / off" in (tmp_path / "ds.md").read_text()


def test_benchmarks_machine_slug_names_gpu_or_cpu() -> None:
    assert (
        machine_slug({"device": "NVIDIA H100 80GB HBM3", "cpu": "x", "cpu_count": 16})
        == "nvidia-h100-80gb-hbm3"
    )
    cpu = {"device": "cpu", "cpu": "AMD EPYC 7B13 64-Core Processor", "cpu_count": 2}
    assert machine_slug(cpu) == "cpu2-amd-epyc-7b13-64-core-processor"


def test_benchmarks_report_files_flag_missed_targets(tmp_path: Path) -> None:
    report = {
        "date": "2026-01-02",
        "machine_slug": "cpu2-test",
        "machine": {"device": "cpu", "cpu": "test", "cpu_count": 2, "torch": "2.x"},
        "load_average": {"start": 1.0, "end": 2.0},
        "seconds": 12.0,
        "benchmarks": {
            "training": {
                "images_per_s": {"pipeline": 9.0, "bare": 10.0},
                "cpu_s_per_step": {"pipeline": 1.0, "bare": 1.0},
                "ratio": 0.9,
                "cpu_ratio": 1.0,
                "median_step_s": {"pipeline": 0.8, "bare": 0.8},
                "median_step_ratio": 1.0,
            },
            "memory": {
                "figures_mb": {
                    "20": {"peak_rss_mb": 100.0, "peak_pss_mb": 80.0},
                    "200": {"peak_rss_mb": 110.0, "peak_pss_mb": 90.0},
                },
                "ratio": 1.1,
                "ratio_pss": 1.125,
            },
            "gpu": {"skipped": "no CUDA GPU available"},
            "cache": {"error": "Traceback ...\nRuntimeError: disk full\n"},
        },
    }
    json_path, md_path = write_report(report, tmp_path)
    assert json_path.name == "cpu2-test-2026-01-02.json"
    assert json.loads(json_path.read_text())["benchmarks"]["training"]["ratio"] == 0.9
    table = md_path.read_text()
    training = next(line for line in table.splitlines() if "medseg fit vs bare loop" in line)
    assert training.endswith("| >= 0.95 | NO |")
    memory = next(line for line in table.splitlines() if "200 vs 20 volumes" in line)
    assert memory.endswith("| <= 1.5 | yes |")
    assert "| gpu | skipped | no CUDA GPU available |" in table
    assert "RuntimeError: disk full" in table
    assert summarize("unknown", {}) == []
    again, _ = write_report(report, tmp_path)  # a second run of the day keeps the first
    assert again != json_path and again.name.startswith("cpu2-test-2026-01-02-") and json_path.is_file()


def test_benchmarks_markdown_table_and_json(tmp_path: Path) -> None:
    table = markdown_table(("a", "b"), [(1, 0.123456), ("x", "")])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.123 |", "| x |  |"]
    write_json(tmp_path / "r.json", {"path": tmp_path})
    assert json.loads((tmp_path / "r.json").read_text()) == {"path": str(tmp_path)}


def test_benchmarks_train_flops_counts_forward_and_backward() -> None:
    conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
    flops = train_flops(conv, torch.randn(1, 1, 8, 8), torch.randint(2, (1, 8, 8)))
    forward = 2 * (2 * 8 * 8) * (1 * 3 * 3)  # 2 FLOPs per multiply-add, per output element
    assert flops == forward + forward  # backward: the weight gradient only (the input needs none)
    assert conv.weight.grad is None


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="Linux only")
def test_benchmarks_smaps_rollup_reads_proportional_sizes() -> None:
    fields = smaps_rollup(os.getpid())
    assert fields["Pss"] > 0
    assert fields["Pss"] >= fields["Pss_Anon"]


def test_benchmarks_gpu_throughput_skips_without_cuda(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = gpu_main(["--output", str(tmp_path / "gpu.json")])
    assert result["skipped"] == "no CUDA GPU available"
    assert json.loads((tmp_path / "gpu.json").read_text())["skipped"] == "no CUDA GPU available"
    assert "skipped" in capsys.readouterr().out


def test_benchmarks_gpu_throughput_dry_run_on_cpu(tmp_path: Path) -> None:
    args = "--device cpu --size 32 --batch-size 2 --features 4 8 --steps 1 --warmup 1 --repeats 1"
    args += " --matmul-size 32 --no-compile --images 4 --wait-workers 0 --wait-steps 1"
    result = gpu_main([*args.split(), "--output", str(tmp_path / "gpu.json")])
    assert set(result["images_per_s"]) == {"fp32", "bf16", "bf16_cl"}
    assert result["speedup_vs_fp32"]["fp32"] == 1.0
    assert result["flops_per_image"] > 0
    assert 0 <= result["wait_fraction"]["0"] <= 1
    assert not result["errors"]


def test_benchmarks_gpu_arm_that_fails_is_reported_with_its_row_and_the_others_still_run(monkeypatch) -> None:
    real = gpu_throughput.arm_step

    def arm_step(name: str, net: nn.Module, device: torch.device):
        step, calls = real(name, net, device), []

        def failing(batch: dict) -> None:  # bf16 fails in its warm-up (a compiler), bf16_cl in a timed round
            calls.append(1)
            if name == "bf16" or len(calls) > 1:
                raise RuntimeError(f"{name}: no kernel | here\nand a second line")
            step(batch)

        return failing if name != "fp32" else step

    monkeypatch.setattr(gpu_throughput, "arm_step", arm_step)
    case = gpu_throughput.unet2d(16, 2, (4, 8))
    result = gpu_throughput.measure_case(case, torch.device("cpu"), 1, 1, 2, ["fp32", "bf16", "bf16_cl"])
    assert set(result["images_per_s"]) == {"fp32"} and set(result["errors"]) == {"bf16", "bf16_cl"}
    assert result["errors"]["bf16"].startswith("RuntimeError: bf16: no kernel")
    rows = summarize("gpu", result | {"matmul_tflops": 1.0, "fraction_of_matmul": {"fp32": 0.0}})
    for arm in ("bf16", "bf16_cl"):  # the first line, its pipe escaped for the markdown table
        assert ("gpu", f"{arm} failed", f"RuntimeError: {arm}: no kernel \\| here", "", "", "", "NO") in rows
    stopped = gpu_throughput.measure_case(case, torch.device("cpu"), 1, 1, 3, ["fp32", "bf16"], lambda: True)
    assert stopped["not_run"] == dict.fromkeys(["fp32", "bf16"], "time budget spent before its warm-up")
    stopped |= {"matmul_tflops": 1.0, "fraction_of_matmul": {}}
    assert ("gpu", "bf16 not run", "time budget spent before its warm-up", "", "", "", "") in summarize(
        "gpu", stopped
    )


def test_benchmarks_inference_bare_loop_runs_where_and_as_infer_does(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert infer_device() == (torch.device("cuda"), torch.bfloat16)  # medseg infer's choice on a GPU
    module = SegmentationModule(UNet(1, 3, features=(4, 8)), hd95=False).eval()
    dtypes: list[torch.dtype] = []
    module.net.head.register_forward_hook(lambda _, args, out: dtypes.append(out.dtype))
    bare_pass(module, [torch.rand(3, 1, 16, 16)], batch_size=2, dtype=torch.bfloat16)
    assert dtypes == [torch.bfloat16, torch.bfloat16]  # both chunks under the same autocast as infer


def suite_report(folder: Path, date: str, benchmarks: dict) -> None:
    write_json(folder / f"cpu2-test-{date}.json", {"date": date, "quick": False, "benchmarks": benchmarks})


def test_benchmarks_readme_figures_come_from_the_newest_run_of_each_benchmark(tmp_path: Path) -> None:
    inference = {"infer_cases_per_s": 2.0, "bare_cases_per_s": 2.5, "ratio": 0.8}
    suite_report(tmp_path, "2026-01-01", {"inference": inference, "gpu": {"skipped": "no GPU"}})
    suite_report(tmp_path, "2026-02-01", {"inference": {**inference, "ratio": 0.91}, "cache": {"error": "x"}})
    write_json(tmp_path / "cpu2-test-2026-03-01.json", {"date": "2026-03-01", "quick": True, "benchmarks": {
        "inference": {**inference, "ratio": 0.1}}})  # fmt: skip
    readme = tmp_path / "README.md"
    readme.write_text(
        "kept <!-- figure inference.ratio -->0.5<!-- /figure --> of it\n"
        "<!-- benchmarks:begin -->\nold rows\n<!-- benchmarks:end -->\n"
    )
    args = ["--readme", str(readme), "--results", str(tmp_path)]
    assert readme_figures(["--check", *args]) == 1
    assert readme_figures(args) == 0
    text = readme.read_text()
    assert "kept <!-- figure inference.ratio -->0.91<!-- /figure --> of it" in text  # not the quick run's
    assert (
        "old rows" not in text
        and "| inference | medseg infer vs bare loop (cases/s) | 2 | 2.5 | 0.91 |" in text
    )
    assert "`cpu2-test-2026-02-01.json`" in text and "| gpu |" not in text and "| cache |" not in text
    assert readme_figures(["--check", *args]) == 0  # rewriting again changes nothing
    # a later run of the same day (its file name carries the time) is newer than the day's first
    write_json(tmp_path / "cpu2-test-2026-02-01-093000.json", {"date": "2026-02-01", "quick": False,
               "benchmarks": {"inference": {**inference, "ratio": 0.93}}})  # fmt: skip
    assert readme_figures(args) == 0 and "inference.ratio -->0.93<" in readme.read_text()


def test_benchmarks_readme_figures_match_the_recorded_results() -> None:
    assert readme_figures(["--check"]) == 0, "run python benchmarks/readme_figures.py"


def test_benchmarks_readme_figures_read_the_scripts_that_run_alone(tmp_path: Path) -> None:
    # real_size.py and the other single scripts write results/<name>.json, outside make bench's
    # suite reports: their inline figures come from there, and the table is left to the suite
    write_json(tmp_path / "real_size.json", {"targets": {"fit_outside_share": {"value": 0.1234}}})
    readme = tmp_path / "README.md"
    readme.write_text(
        "outside <!-- figure real_size.targets.fit_outside_share.value -->0.5<!-- /figure -->\n"
    )
    args = ["--readme", str(readme), "--results", str(tmp_path)]
    assert readme_figures(["--check", *args]) == 1
    assert readme_figures(args) == 0
    assert "outside <!-- figure real_size.targets.fit_outside_share.value -->0.123<!-- /figure -->" in (
        readme.read_text()
    )


def test_benchmarks_readme_figures_write_the_quickstart_transcript_and_ablation_means(tmp_path: Path) -> None:
    # the README's console transcript is what benchmarks/quickstart.py recorded, long commands
    # wrapped before an option; ablation figures are means over seeds of the ablation's runs.csv
    step = {"comment": "what it does", "lines": ["OK: 2 cases", "..."], "seconds": 1.0}
    plan = (
        "medseg plan " + " ".join(["-c configs/a_rather_long_config_name.yaml"] * 3) + " --data.root data/T"
    )
    write_json(tmp_path / "quickstart.json", {"transcript": {"best_dice": 0.81, "best_step": 40, "steps": [
        {**step, "command": "medseg data check data/T"},
        {**step, "command": plan},
        {**step, "command": "medseg fit --data.root data/T", "lines": ["wrote summary.json"]},
    ]}, "train": {"minutes": 7.25, "best_dice": 0.9123}})  # fmt: skip
    runs = tmp_path / "runs.csv"
    runs.write_text("run,variant,seed,dice,dice_organ,dice_lesion,dice_vessel,hd95\n"
                    "a-s0,unet,0,0.6,1,1,1,1\na-s1,unet,1,0.8,1,1,1,1\n")  # fmt: skip
    readme = tmp_path / "README.md"
    readme.write_text(
        "took <!-- figure quickstart.train.minutes -->0<!-- /figure --> min, Dice "
        "<!-- figure quickstart.train.best_dice -->0<!-- /figure -->; skips "
        "<!-- figure ablation.unet.dice -->0<!-- /figure -->\n"
        "<!-- transcript:begin -->\nstale\n<!-- transcript:end -->\n"
    )
    args = ["--readme", str(readme), "--results", str(tmp_path), "--ablation", str(runs)]
    assert readme_figures(args) == 0
    text = readme.read_text()
    assert (
        "minutes -->7.25<" in text and "best_dice -->0.912<" in text and "ablation.unet.dice -->0.7<" in text
    )
    block = text.split("<!-- transcript:begin -->\n")[1].split("<!-- transcript:end -->")[0]
    assert "stale" not in block and block.startswith(
        "```console\n$ medseg data check data/T    # what it does\n"
    )
    plan_lines = block.split("\n\n")[1].splitlines()
    command = [line for line in plan_lines if not line.startswith("OK") and line != "..."]
    assert len(command) > 1 and all(line.endswith(" \\") for line in command[:-1])
    assert command[-1].endswith(" --data.root data/T    # what it does")
    assert all(len(line) <= 100 for line in command[:-1])
    assert " ".join(line.rstrip(" \\").strip() for line in command).startswith("$ " + plan)
    assert "wrote summary.json\n# best val/dice 0.81 at step 40\n```" in block
    assert readme_figures(["--check", *args]) == 0


@pytest.mark.slow
def test_benchmarks_volume_plan_auto_arm_keeps_test_cases_out_and_scores_its_model_folder(
    volume_dir: Path, tmp_path: Path
) -> None:
    result = volume_plan(
        ["--data", str(volume_dir), "--test-cases", "2", "--minutes", "0.75", "--arms", "auto",
         "--work", str(tmp_path / "w"), "--output", str(tmp_path / "auto.json")]
    )  # fmt: skip
    test = result["split"]["test"]
    view = tmp_path / "w" / "auto_data" / volume_dir.name
    seen = {p.name.removesuffix(".nii.gz") for p in (view / "imagesTr").iterdir()}
    assert seen == set(result["split"]["train"]) | set(result["split"]["val"]) and not seen & set(test)
    auto = result["arms"]["auto"]
    assert set(auto["per_case"]) == set(test) and 0 <= auto["dice"]["mean"] <= 1
    assert auto["auto"]["choice"]["model"] and 0 < auto["auto"]["used_share"] < 1.5
