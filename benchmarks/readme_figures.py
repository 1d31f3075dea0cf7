"""Rewrite README.md's benchmark figures from the recorded results: no hand-typed numbers.

    python benchmarks/readme_figures.py            # rewrite README.md in place
    python benchmarks/readme_figures.py --check    # exit 1 if README.md is out of date

Every figure comes from the newest suite report (``results/<machine>-<date>.json``, ``make
bench``) that ran its benchmark, so a partial run (``--only cache``) updates only its own figures.
Two kinds of places in the README are rewritten:

- the table between ``<!-- benchmarks:begin -->`` and ``<!-- benchmarks:end -->``: every
  benchmark's headline rows (``run_all.summarize``), each with the report it comes from;
- inline figures, ``<!-- figure benchmark.key.path -->0.855<!-- /figure -->``: the value at that
  path in the benchmark's result (``inference.ratio``, ``cache.slices_per_second.cache``), or in a
  single script's result file, ``results/<name>.json``, for the scripts that run alone
  (``STANDALONE``: ``real_size.targets.fit_outside_share.value``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from benchmarks.common import HEADER, RESULTS, markdown_table  # noqa: E402
from benchmarks.run_all import BENCHMARKS, summarize  # noqa: E402

README = REPO / "README.md"
TABLE = re.compile(r"(<!-- benchmarks:begin -->\n).*?(<!-- benchmarks:end -->)", re.S)
FIGURE = re.compile(r"(<!-- figure ([\w.]+) -->)(.*?)(<!-- /figure -->)")
SUITE = re.compile(r".+-\d{4}-\d{2}-\d{2}(-\d{6})?\.json$")  # <machine>-<date>[-<hhmmss>].json
STANDALONE = ("real_size", "real_size_memory", "surface_metrics", "chaos")  # not in make bench


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
    value = results[bench][1]
    for key in keys:
        value = value[key]
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


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
    return FIGURE.sub(lambda m: m.group(1) + figure(figures, m.group(2)) + m.group(4), text)


def standalone_results(folder: Path) -> dict[str, tuple[str, dict]]:
    """name -> (file name, result) of the single scripts' result files that exist."""
    return {
        name: (f"{name}.json", json.loads((folder / f"{name}.json").read_text()))
        for name in STANDALONE
        if (folder / f"{name}.json").is_file()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the README is out of date")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--results", type=Path, default=RESULTS)
    opts = parser.parse_args(argv)
    text = opts.readme.read_text()
    new = rewrite(text, newest_results(opts.results), standalone_results(opts.results))
    if opts.check:
        if new != text:
            print(f"{opts.readme} is out of date: run python benchmarks/readme_figures.py")
        return int(new != text)
    opts.readme.write_text(new)
    print(f"rewrote the benchmark figures of {opts.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
