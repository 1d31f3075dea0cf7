"""Does planning pay? Per-case 3D Dice on held-out generated volumes at equal CPU wall time.

    python benchmarks/volume_plan.py                       # 4 arms x 8 minutes, about 40 minutes
    python benchmarks/volume_plan.py --minutes 2 --cases 16 --arms planned_2d basicunet_loop

Every arm trains for the same wall time on the same training cases (``medseg data synth
--volumes``: CT-like, every case with its own spacing) and is scored on the same held-out cases,
per case in 3D on their own grid (Dice per class, from the written NIfTI masks):

- ``planned_2d``: ``configs/data/msd.yaml`` + ``configs/model/unet.yaml`` as they come: the plan
  decides spacing, patch, batch and pooling; the LR schedule follows the time budget.
- ``template_256``: the same run with the old template's fixed 256 x 256 patch and batch 8.
- ``basicunet_loop``: the peer a user writes in an afternoon: a plain PyTorch loop, MONAI's 2D
  ``BasicUNet``, per-case z-score, random flips, ``DiceCELoss``, Adam at 1e-3, random 64 x 64
  slices, batch 32 (the hand-set values that worked on a task of this slice size), no resampling;
  it predicts whole slices with MONAI's sliding windows.
- ``planned_3d``: ``configs/model/unet3d.yaml`` with the plan's 3D patch.
- ``auto``: ``medseg auto`` on the training and validation cases with the arm's time as its whole
  budget (planning, every run, out-of-fold prediction, choice), then its model folder (one
  network or an ensemble, with its postprocessing) on the test cases.

Also, for the planned 2D model: each held-out scan resampled to another spacing (in-plane 1.5x
coarser, slices 2x finer, written with its true affine) against the scan at its own spacing, and
whether every written mask has its input's shape and affine (to 1e-6).
Results: ``results/volume_plan.json`` and a markdown table (``--output``).

On a real task instead of generated volumes (``--data``, MSD layout; the classes from its
``dataset.json``), e.g. the CHAOS MR set with 4 cases held out::

    python benchmarks/volume_plan.py --data ../shared/data/chaos_mr_t2 --test-cases 4 --minutes 15 \
        --arms planned_2d planned_3d basicunet_loop --loop-patch 128 --output benchmarks/results/chaos.json

The plain loop's batch holds the same voxels a step whatever its patch (32 x 64 x 64 = 131,072, the
plan's CPU budget), so a larger patch for larger slices costs it no compute.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.networks.nets import BasicUNet
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from benchmarks.common import RESULTS, load_average, machine_info, markdown_table, write_json  # noqa: E402
from pipeline.data.cache.resample import resampled_shape  # noqa: E402
from pipeline.run.naming import dataset_name  # noqa: E402

CONFIGS = REPO / "configs"
LOOP_STEP_VOXELS = 32 * 64 * 64  # the plain loop's voxels a step (batch x patch x patch)
ARMS = ("planned_2d", "template_256", "basicunet_loop", "planned_3d", "auto")


def medseg(*args: str) -> None:
    """``python -m pipeline`` in a child process (a clean process per arm); raises on failure."""
    subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, check=True)


def class_names(data: Path) -> tuple[str, ...]:
    """The foreground classes of an MSD ``dataset.json``, in label order."""
    labels = json.loads((data / "dataset.json").read_text())["labels"]
    return tuple(name for _, name in sorted((int(k), v) for k, v in labels.items()))[1:]


def make_data(
    work: Path, cases: int, seed: int, test_cases: int, given: Path | None = None
) -> tuple[Path, dict]:
    """The data (``given``, or generated volumes) and one split for every arm: (data folder, split
    dict). A generated folder is named by its case count and seed, so a work folder of an earlier
    run with other settings is not reused."""
    data = given or work / f"volumes-{cases}-s{seed}"
    if given is None and not (data / "dataset.json").is_file():
        medseg(
            "data",
            "synth",
            "--volumes",
            "--output",
            str(data),
            "--num-images",
            str(cases),
            "--seed",
            str(seed),
        )
    work.mkdir(parents=True, exist_ok=True)
    ids = sorted(p.name[: -len(".nii.gz")] for p in (data / "imagesTr").glob("*.nii.gz"))
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    n_test, n_val = test_cases, max(2, round(len(ids) * 0.15))
    split = {"test": sorted(order[:n_test]), "val": sorted(order[n_test : n_test + n_val])}
    split["train"] = sorted(order[n_test + n_val :])
    (work / "split.json").write_text(json.dumps(split, indent=2))
    return data, split


def fit_medseg(
    work: Path, data: Path, name: str, minutes: float, model: str, *extra: str
) -> tuple[Path, int]:
    """A ``medseg fit`` of ``minutes`` wall time; returns (its best checkpoint, optimiser steps)."""
    runs = work / "runs"
    clock = f"00:00:{int(minutes):02d}:{round(minutes % 1 * 60):02d}"
    args = ["fit", "-c", str(CONFIGS / "default.yaml"), "-c", str(CONFIGS / "model" / f"{model}.yaml")]
    args += ["-c", str(CONFIGS / "data" / "msd.yaml"), "--data.root", str(data)]
    args += [
        "--data.split_file",
        str(work / "split.json"),
        "--data.cache_dir",
        str(work / "cache" / data.name),
    ]
    args += ["--trainer.max_time", clock, "--trainer.max_epochs", "10000", "--run.root", str(runs)]
    args += ["--run.name", name, "--run.overwrite", "true"]  # a re-run of the benchmark measures again
    args += ["--run.wandb", "false", "--trainer.enable_progress_bar", "false", *extra]
    medseg(*args)
    run = runs / "default" / dataset_name(data) / name
    return run / "checkpoints" / "best.ckpt", json.loads((run / "summary.json").read_text())["steps"]


def training_view(work: Path, data: Path, split: dict) -> Path:
    """The data set without its test cases: an MSD folder of links (named as ``data``), so that
    ``medseg auto`` never sees a test case."""
    view = work / "auto_data" / data.name
    if view.exists():
        shutil.rmtree(view)
    kept = sorted(split["train"] + split["val"])
    for folder in ("imagesTr", "labelsTr"):
        (view / folder).mkdir(parents=True)
        for case in kept:
            (view / folder / f"{case}.nii.gz").symlink_to((data / folder / f"{case}.nii.gz").resolve())
    dataset = json.loads((data / "dataset.json").read_text())
    dataset["training"] = [
        {"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in kept
    ]
    dataset["numTraining"] = len(kept)
    (view / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return view


def auto_arm(work: Path, data: Path, split: dict, minutes: float) -> tuple[Path, int, dict]:
    """``medseg auto`` on the training and validation cases with the arm's whole time as its budget,
    then its model folder on the test cases; returns (predictions, optimiser steps of all its runs,
    what it chose and the budget it used)."""
    view = training_view(work, data, split)
    runs = work / "runs"
    folder = runs / "auto" / dataset_name(view)
    if folder.exists():
        shutil.rmtree(folder)  # a re-run of the benchmark measures again
    seconds = round(minutes * 60)
    budget = f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    medseg("auto", str(view), "--budget", budget, "--runs-root", str(runs), "--",
           "--run.wandb", "false", "--trainer.enable_progress_bar", "false",
           "--data.cache_dir", str(work / "cache" / "auto"))  # fmt: skip
    summary = json.loads((folder / "auto_summary.json").read_text())
    output = work / "predictions" / "auto"
    medseg("infer", "--model-dir", str(folder), "--input", *(str(data / "imagesTr" / f"{c}.nii.gz") for c in split["test"]),
           "--output", str(output), "--overwrite")  # fmt: skip
    steps = sum(run.get("steps") or 0 for run in summary["runs"])
    chosen = {k: summary[k] for k in ("choice", "used_s", "used_share", "phases_s", "folds_trained", "runs")}
    return output, steps, chosen


def zscore(volume: np.ndarray) -> np.ndarray:
    return ((volume - volume.mean()) / max(volume.std(), 1e-8)).astype(np.float32)


def axial(path: Path) -> np.ndarray:
    """(Z, X, Y) array of a NIfTI file as stored (the plain loop neither reorients nor resamples)."""
    return np.moveaxis(np.asanyarray(nib.load(path).dataobj), 2, 0)


def plain_loop(
    work: Path, data: Path, split: dict, minutes: float, seed: int, patch: int, classes: int
) -> tuple[Path, int]:
    """The afternoon peer: 2D BasicUNet on random ``patch`` x ``patch`` axial patches for ``minutes``;
    writes its predictions of the test cases (NIfTI, the inputs' geometry); returns (their folder, steps)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    images = {c: zscore(axial(data / "imagesTr" / f"{c}.nii.gz")) for c in split["train"]}
    labels = {c: axial(data / "labelsTr" / f"{c}.nii.gz").astype(np.int64) for c in split["train"]}
    net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=1 + classes)
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    batch, cases, steps = LOOP_STEP_VOXELS // patch**2, list(images), 0
    end = time.perf_counter() + minutes * 60
    while time.perf_counter() < end:
        xs, ys = [], []
        for _ in range(batch):
            case = cases[rng.integers(len(cases))]
            z = rng.integers(len(images[case]))
            x, y = _pad(images[case][z], patch), _pad(labels[case][z], patch)
            top, left = (rng.integers(n - patch + 1) for n in x.shape)
            x, y = x[top : top + patch, left : left + patch], y[top : top + patch, left : left + patch]
            for axis in (0, 1):
                if rng.random() < 0.5:
                    x, y = np.flip(x, axis), np.flip(y, axis)
            xs.append(x.copy())
            ys.append(y.copy())
        logits = net(torch.from_numpy(np.stack(xs))[:, None])
        loss = loss_fn(logits, torch.from_numpy(np.stack(ys))[:, None])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
    out = work / "predictions" / "basicunet_loop"
    out.mkdir(parents=True, exist_ok=True)
    net.eval()
    with torch.no_grad():
        for case in split["test"]:
            source = nib.load(data / "imagesTr" / f"{case}.nii.gz")
            volume = zscore(axial(data / "imagesTr" / f"{case}.nii.gz"))
            # padded as in training (BasicUNet's instance norm sees the padding; MONAI's pads with 0)
            x = torch.from_numpy(np.stack([_pad(plane, patch) for plane in volume]))[:, None]
            logits = sliding_window_inference(x, (patch, patch), 8, net, overlap=0.5, mode="gaussian")
            labels = logits.argmax(1)[:, : volume.shape[1], : volume.shape[2]]
            pred = np.moveaxis(labels.numpy().astype(np.uint8), 0, 2)
            nib.save(nib.Nifti1Image(pred, source.affine), out / f"{case}.nii.gz")
    return out, steps


def _pad(plane: np.ndarray, size: int) -> np.ndarray:
    rows, cols = max(0, size - plane.shape[0]), max(0, size - plane.shape[1])
    return np.pad(plane, ((0, rows), (0, cols)), constant_values=plane.min()) if rows or cols else plane


def dice_per_case(
    predictions: Path, truth: Path, cases: list[str], classes: tuple[str, ...]
) -> dict[str, dict[str, float]]:
    """{case: {class: 3D Dice}} on the case's own grid; NaN where both lack the class."""
    scores = {}
    for case in cases:
        pred = np.asanyarray(nib.load(predictions / f"{case}.nii.gz").dataobj)
        true = np.asanyarray(nib.load(truth / f"{case}.nii.gz").dataobj)
        scores[case] = {}
        for k, name in enumerate(classes, start=1):
            p, t = pred == k, true == k
            total = p.sum() + t.sum()
            scores[case][name] = float(2 * (p & t).sum() / total) if total else float("nan")
    return scores


def summarise(scores: dict[str, dict[str, float]], classes: tuple[str, ...]) -> dict[str, float]:
    """Mean per-case Dice per class and over the classes."""
    out = {name: float(np.nanmean([s[name] for s in scores.values()])) for name in classes}
    out["mean"] = float(np.mean([out[name] for name in classes]))
    return out


def resampled_copies(data: Path, cases: list[str], work: Path, classes: tuple[str, ...]) -> Path:
    """The test scans at another spacing (in-plane 1.5x coarser, slices 2x finer), written with
    their true affine, and their labels sampled at the same points (each class's indicator linearly,
    then the arg max); returns the folder (imagesTr/labelsTr)."""
    out = work / "respaced"
    for case in cases:
        image, label = (nib.load(data / f"{kind}Tr" / f"{case}.nii.gz") for kind in ("images", "labels"))
        factors = np.array([1.5, 1.5, 0.5])  # spacing multipliers along the stored axes
        spacing = np.linalg.norm(image.affine[:3, :3], axis=0)
        size = resampled_shape(image.shape, spacing, spacing * factors)
        grid = [np.linspace(0, n - 1, m) for n, m in zip(image.shape, size, strict=True)]
        coords = np.stack(np.meshgrid(*grid, indexing="ij"))
        values = ndimage.map_coordinates(np.asanyarray(image.dataobj).astype(np.float32), coords, order=1)
        affine = image.affine.copy()
        affine[:3, :3] = image.affine[:3, :3] * ((np.array(image.shape) - 1) / (np.array(size) - 1))
        labels = np.argmax(
            [
                ndimage.map_coordinates(
                    (np.asanyarray(label.dataobj) == k).astype(np.float32), coords, order=1
                )
                for k in range(1 + len(classes))
            ],
            axis=0,
        ).astype(np.uint8)
        for kind, array in (("images", values.round().astype(np.int16)), ("labels", labels)):
            (out / f"{kind}Tr").mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, affine), out / f"{kind}Tr" / f"{case}.nii.gz")
    return out


def geometry_kept(inputs: Path, outputs: Path, cases: list[str]) -> bool:
    """Every written mask has its input's shape and affine (to 1e-6)."""
    for case in cases:
        source, written = nib.load(inputs / f"{case}.nii.gz"), nib.load(outputs / f"{case}.nii.gz")
        if source.shape[:3] != written.shape or not np.allclose(source.affine, written.affine, atol=1e-6):
            return False
    return True


def infer(checkpoint: Path, inputs: Path, cases: list[str], output: Path) -> Path:
    medseg("infer", "--checkpoint", str(checkpoint), "--input", *(str(inputs / f"{c}.nii.gz") for c in cases),
           "--output", str(output), "--overwrite")  # fmt: skip
    return output


def respaced_scores(
    work: Path, data: Path, test: list[str], own: dict[str, float], classes: tuple[str, ...]
) -> dict:
    """The planned 2D model on the test scans at another spacing, against ``own`` (its Dice at
    their own spacing), and whether every mask it wrote kept its input's shape and affine."""
    respaced = resampled_copies(data, test, work, classes)
    checkpoint = work / "runs" / "default" / dataset_name(data) / "planned_2d" / "checkpoints" / "best.ckpt"
    out = infer(checkpoint, respaced / "imagesTr", test, work / "predictions" / "respaced")
    moved = summarise(dice_per_case(out, respaced / "labelsTr", test, classes), classes)
    return {
        "dice": moved,
        "difference": {k: moved[k] - own[k] for k in own},
        "geometry_kept": geometry_kept(respaced / "imagesTr", out, test)
        and geometry_kept(data / "imagesTr", work / "predictions" / "planned_2d", test),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=40, help="generated volumes (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=None, help="an MSD task instead of generated volumes")
    parser.add_argument("--test-cases", type=int, default=10, help="cases held out (default: %(default)s)")
    parser.add_argument(
        "--loop-patch", type=int, default=64, help="the plain loop's patch side (default: 64)"
    )
    parser.add_argument("--minutes", type=float, default=8.0, help="wall time per arm (default: %(default)s)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "volume_plan", help="work folder")
    parser.add_argument("--output", type=Path, default=RESULTS / "volume_plan.json")
    parser.add_argument(
        "--respaced-only",
        action="store_true",
        help="only measure the respaced scans again, with the planned_2d run in --work, into --output",
    )
    opts = parser.parse_args(argv)
    data, split = make_data(opts.work, opts.cases, opts.seed, opts.test_cases, opts.data)
    test, truth, classes = split["test"], data / "labelsTr", class_names(data)
    if opts.respaced_only:
        result = json.loads(opts.output.read_text())
        result["respaced"] = respaced_scores(
            opts.work, data, test, result["arms"]["planned_2d"]["dice"], classes
        )
        write_json(opts.output, result)
        print("respaced test scans:", result["respaced"])
        return result
    result = {"machine": machine_info(), "load_start": load_average(), "data": str(opts.data or "generated"),
              "cases": sum(map(len, split.values())), "split": split, "minutes_per_arm": opts.minutes,
              "loop_patch": opts.loop_patch, "arms": {}}  # fmt: skip
    extra = {"template_256": ("--data.patch_size", "[256, 256]", "--data.batch_size", "8")}
    model = {"planned_3d": "unet3d"}
    for arm in opts.arms:
        start = time.perf_counter()
        details = None
        if arm == "basicunet_loop":
            predictions, steps = plain_loop(
                opts.work, data, split, opts.minutes, opts.seed, opts.loop_patch, len(classes)
            )
        elif arm == "auto":
            predictions, steps, details = auto_arm(opts.work, data, split, opts.minutes)
        else:
            checkpoint, steps = fit_medseg(
                opts.work, data, arm, opts.minutes, model.get(arm, "unet"), *extra.get(arm, ())
            )
            predictions = infer(checkpoint, data / "imagesTr", test, opts.work / "predictions" / arm)
        scores = dice_per_case(predictions, truth, test, classes)
        result["arms"][arm] = {
            "dice": summarise(scores, classes),
            "per_case": scores,
            "steps": steps,
            "seconds": time.perf_counter() - start,
            **({"auto": details} if details else {}),
        }
        print(arm, result["arms"][arm]["dice"], flush=True)
    if "planned_2d" in opts.arms and opts.data is None:
        result["respaced"] = respaced_scores(
            opts.work, data, test, result["arms"]["planned_2d"]["dice"], classes
        )
    result["load_end"] = load_average()
    write_json(opts.output, result)
    rows = [
        (arm, r["steps"], *(f"{r['dice'][k]:.3f}" for k in (*classes, "mean")))
        for arm, r in result["arms"].items()
    ]
    table = markdown_table(("arm", "steps", *(f"Dice {c}" for c in classes), "mean Dice"), rows)
    opts.output.with_suffix(".md").write_text(table + "\n")
    print(table)
    if "respaced" in result:
        print("respaced test scans:", result["respaced"])
    return result


if __name__ == "__main__":
    main()
