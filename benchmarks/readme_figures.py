"""Rewrite README.md's benchmark figures from the recorded results: no hand-typed numbers.

    python benchmarks/readme_figures.py            # rewrite README.md in place
    python benchmarks/readme_figures.py --check    # exit 1 if README.md is out of date

Every figure comes from the newest suite report (``results/<machine>-<date>.json``, ``make
bench``) that ran its benchmark, so a partial run (``--only cache``) updates only its own figures.
Three kinds of places in the README are rewritten:

- the table between ``<!-- benchmarks:begin -->`` and ``<!-- benchmarks:end -->``: every
  benchmark's headline rows (``run_all.summarize``), each with the report it comes from;
- inline figures, ``<!-- figure benchmark.key.path -->0.855<!-- /figure -->``: the value at that
  path in the benchmark's result (``inference.ratio``, ``cache.slices_per_second.cache``), or in a
  single script's result file, ``results/<name>.json``, for the scripts that run alone
  (``STANDALONE``: ``real_size.targets.fit_outside_share.value``), or the mean over seeds of a
  variant's score in the CPU ablation's ``benchmarks/ablation/runs.csv``
  (``ablation.unet-relu-kaiming.dice``);
- the console block between ``<!-- transcript:begin -->`` and ``<!-- transcript:end -->``: the
  commands of "Train on your own volumes" and what they printed, from ``results/quickstart.json``
  (``benchmarks/quickstart.py`` runs them).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from benchmarks.common import HEADER, RESULTS, markdown_table  # noqa: E402
from benchmarks.run_all import BENCHMARKS, summarize  # noqa: E402

README = REPO / "README.md"
TABLE = re.compile(r"(<!-- benchmarks:begin -->\n).*?(<!-- benchmarks:end -->)", re.S)
FIGURE = re.compile(r"(<!-- figure ([\w.-]+) -->)(.*?)(<!-- /figure -->)")
SUITE = re.compile(r".+-\d{4}-\d{2}-\d{2}(-\d{6})?\.json$")  # <machine>-<date>[-<hhmmss>].json
TRANSCRIPT = re.compile(r"(<!-- transcript:begin -->\n).*?(<!-- transcript:end -->)", re.S)
STANDALONE = (
    "real_size",
    "real_size_memory",
    "surface_metrics",
    "chaos",
    "quickstart",
    "cv_ensemble",
    "chaos_auto",
    "volumes_auto",
    "deep_supervision",
)  # not in make bench
ABLATION = REPO / "benchmarks" / "ablation" / "runs.csv"  # medseg compare's table of the CPU ablation
SCORES = ("dice", "dice_organ", "dice_lesion", "dice_vessel", "hd95")  # ablation columns a figure may quote
WIDTH = 100  # a transcript's command lines are wrapped (with a backslash) to this width


def newest_results(folder: Path) -> dict[str, tuple[str, dict]]:
    """benchmark -> (report file name, its result) from the newest suite report that ran it
    without an error or a skip (by the report's date and time of day, then its file name)."""
    reports = []
    for path in folder.glob("*.json"):
        if (match := SUITE.match(path.name)) and not path.name.startswith("gpu_check-"):
            report = json.loads(path.read_text())
            if "benchmarks" in report and not report.get("quick"):
                reports.append((report["date"], match.group(1) or "", path.name, report))
    newest: dict[str, tuple[str, dict]] = {}
    for _, _, name, report in sorted(reports, key=lambda r: r[:3]):
        for bench, result in report["benchmarks"].items():
            if "error" not in result and "skipped" not in result:
                newest[bench] = (name, result)
    return newest


def figure(results: dict[str, tuple[str, dict]], path: str) -> str:
    """The value at ``benchmark.key...`` formatted: thousands separated from 100 up, else 3 digits."""
    bench, *keys = path.split(".")
    if bench not in results:
        raise SystemExit(f"README figure {path}: no recorded result of {bench!r} in benchmarks/results/")
    value = results[bench][1]
    for key in keys:
        value = value[key]
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def command_lines(command: str, comment: str) -> list[str]:
    """``$ command  # comment``, wrapped at ``WIDTH`` before an option whose values would not fit
    on the line, continued with a backslash."""
    chunks: list[str] = []
    for word in command.split(" "):
        if word.startswith("-") or not chunks:
            chunks.append(word)
        else:
            chunks[-1] += " " + word
    lines, line = [], "$"
    for chunk in chunks:
        if len(line) + len(chunk) + 1 > WIDTH - 2 and line.strip() not in ("$", ""):
            lines.append(line + " \\")
            line = "   "
        line += " " + chunk
    return [*lines, f"{line}    # {comment}"]


def transcript(quickstart: dict) -> str:
    """The console block of ``benchmarks/quickstart.py``'s transcript: each command, then the
    lines it printed that the README shows; the fit's line says its best ``val/dice``."""
    record = quickstart["transcript"]
    blocks = []
    for step in record["steps"]:
        lines = [*command_lines(step["command"], step["comment"]), *step["lines"]]
        if step["command"].startswith("medseg fit"):
            lines.append(f"# best val/dice {record['best_dice']} at step {record['best_step']}")
        blocks.append("\n".join(lines))
    return "```console\n" + "\n\n".join(blocks) + "\n```\n"


def rewrite(
    text: str, results: dict[str, tuple[str, dict]], alone: dict[str, tuple[str, dict]] | None = None
) -> str:
    """``text`` with its benchmark table filled from the suite's ``results`` and its inline
    figures from those and the single scripts' results ``alone``."""
    order = {bench: i for i, bench in enumerate(BENCHMARKS)}  # make bench's order, whatever ran last
    ordered = sorted(results.items(), key=lambda item: order.get(item[0], len(order)))
    rows = [(*row, f"`{name}`") for bench, (name, result) in ordered for row in summarize(bench, result)]
    table = markdown_table((*HEADER, "recorded in"), rows)
    text = TABLE.sub(lambda m: m.group(1) + table + m.group(2), text)
    figures = {**(alone or {}), **results}
    if "quickstart" in figures:
        text = TRANSCRIPT.sub(lambda m: m.group(1) + transcript(figures["quickstart"][1]) + m.group(2), text)
    return FIGURE.sub(lambda m: m.group(1) + figure(figures, m.group(2)) + m.group(4), text)


def standalone_results(folder: Path) -> dict[str, tuple[str, dict]]:
    """name -> (file name, result) of the single scripts' result files that exist."""
    return {
        name: (f"{name}.json", json.loads((folder / f"{name}.json").read_text()))
        for name in STANDALONE
        if (folder / f"{name}.json").is_file()
    }


def ablation_results(runs_csv: Path) -> dict[str, tuple[str, dict]]:
    """``{"ablation": (file, {variant: {column: mean over its seeds}})}`` from the ablation's
    ``runs.csv``, for figures such as ``ablation.unet-relu-kaiming.dice``; empty without the file."""
    if not runs_csv.is_file():
        return {}
    by_variant: dict[str, list[dict[str, str]]] = {}
    for row in csv.DictReader(runs_csv.open()):
        by_variant.setdefault(row["variant"], []).append(row)
    means = {
        variant: {column: statistics.mean(float(row[column]) for row in rows) for column in SCORES}
        for variant, rows in by_variant.items()
    }
    return {"ablation": (runs_csv.name, means)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the README is out of date")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--ablation", type=Path, default=ABLATION, help="the ablation's runs.csv")
    opts = parser.parse_args(argv)
    text = opts.readme.read_text()
    alone = {**standalone_results(opts.results), **ablation_results(opts.ablation)}
    new = rewrite(text, newest_results(opts.results), alone)
    if opts.check:
        if new != text:
            print(f"{opts.readme} is out of date: run python benchmarks/readme_figures.py")
        return int(new != text)
    opts.readme.write_text(new)
    print(f"rewrote the benchmark figures of {opts.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
