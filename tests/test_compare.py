"""`medseg compare` on a micro-ablation: a row per run with the summaries' numbers, and real PNGs."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.experiments.compare import PLOTS
from pipeline.run.naming import dataset_name
from tests.helpers.ablation import RUNS


@pytest.fixture(scope="module")
def report(micro_ablation, tmp_path_factory):
    output = tmp_path_factory.mktemp("report")
    main(["compare", str(micro_ablation), "--output", str(output)])
    return output


def test_compare_report_has_a_row_per_run_with_the_numbers_of_its_summary(
    report, micro_ablation, phantom_dir
):
    lines = (report / "report.md").read_text().splitlines()
    header = [
        cell.strip()
        for cell in next(line for line in lines if line.startswith("| run |")).strip("|").split("|")
    ]
    rows = {}
    for line in lines:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0] in RUNS:
            rows[cells[0]] = dict(zip(header, cells, strict=True))
    assert sorted(rows) == sorted(RUNS)
    for name, row in rows.items():
        summary = json.loads((micro_ablation / dataset_name(phantom_dir) / name / "summary.json").read_text())
        best, grads = summary["best"], summary["GradientFlowMonitor"]
        assert row["status"] == "completed" and row["params"] == f"{summary['params']:,}"
        assert row["best val Dice"] == f"{best['val/dice']:.3f}"
        for cls in ("organ", "lesion", "vessel"):
            assert row[f"Dice {cls}"] == f"{best[f'val/dice_{cls}']:.3f}", cls
        assert row["HD95 (px; mm for volumes)"] == f"{best['val/hd95']:.1f}"
        assert row["s/epoch"] == f"{summary['seconds_per_epoch']:.1f}"
        assert row["grad first/last, start"] == f"{grads['first_last_ratio']['start']:.2e}"
        assert row["grad first/last, end"] == f"{grads['first_last_ratio']['end']:.2e}"
        assert row["vanishing"] == "no" and row["exploding"] == "no"

    table = {row["run"]: row for row in csv.DictReader((report / "runs.csv").open())}
    for name in RUNS:
        summary = json.loads((micro_ablation / dataset_name(phantom_dir) / name / "summary.json").read_text())
        assert float(table[name]["dice"]) == summary["best"]["val/dice"]
        assert float(table[name]["dice_vessel"]) == summary["best"]["val/dice_vessel"]
        assert (
            float(table[name]["ratio_start"]) == summary["GradientFlowMonitor"]["first_last_ratio"]["start"]
        )
        assert table[name]["knob_skips"] == str(summary["variant"]["skips"])


def test_compare_plots_are_png_images_with_content(report):
    text = (report / "report.md").read_text()
    for name in PLOTS:
        assert f"]({name})" in text
        with Image.open(report / name) as image:
            assert image.format == "PNG" and image.width >= 300 and image.height >= 200
            pixels = image.convert("L")
            low, high = pixels.getextrema()
            assert high - low > 100, name  # drawn on, not a blank canvas


def test_compare_says_when_there_are_no_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["compare", str(tmp_path), "--output", str(tmp_path / "report")])
    assert stopped.value.code == 1
    assert "holds no run directories" in capsys.readouterr().err
