"""Bad inputs through the ``medseg`` entry: one clear line naming the file and the problem, a non-zero
exit, and no partial outputs. Kinds: truncated gzip, zero-byte file, wrong extension, 4D where 3D is
expected, mismatched mask shape, label out of range, NaN intensities, empty folder, unreadable
permissions, symbolic link loop, config typo, missing checkpoint, unsafe (code-running) checkpoint;
across ``medseg fit``, ``medseg validate``, ``medseg data check`` and ``medseg infer``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cli import main
from pipeline.data.synthesis.phantoms_3d import generate_volumes
from tests.conftest import REPO, fit_args


def medseg(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """Run ``medseg args`` in this process: (exit code, stdout, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def one_line(text: str, path: Path, problem: str) -> None:
    """Exactly one line of a report (``data check``, ``infer``'s table) names ``path``, stating ``problem``."""
    lines = [line for line in text.splitlines() if str(path) in line and not line.startswith("FAILED:")]
    assert len(lines) == 1, text[-3000:]
    assert problem in lines[0], lines[0]


def error_line(stderr: str, path: Path, problem: str) -> None:
    """``medseg`` printed one error, ``error: <path>: <problem>``."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert errors[0].startswith(f"error: {path}: ") and problem in errors[0], errors[0]


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 small NIfTI volumes in MSD layout (read-only: copy before changing)."""
    return generate_volumes(tmp_path_factory.mktemp("volumes"), 4, shape=(24, 24, 6), seed=0)


@pytest.fixture(scope="module")
def checkpoint(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-step medseg checkpoint for ``medseg infer``."""
    runs = tmp_path_factory.mktemp("runs")
    main(fit_args(phantom_dir, runs, "--run.wandb", "false", "--trainer.limit_train_batches", "1"))
    return next(runs.rglob("best.ckpt"))


def zero_byte(root: Path) -> Path:
    path = root / "images" / "phantom_03.png"
    path.write_bytes(b"")
    return path


def mask_shape(root: Path) -> Path:
    path = root / "masks" / "phantom_03.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(path)
    return path


def label_range(root: Path) -> Path:
    path = root / "masks" / "phantom_03.png"
    mask = np.array(Image.open(path))
    mask[0, 0] = 9
    Image.fromarray(mask).save(path)
    return path


def nan_intensities(root: Path) -> Path:
    png = root / "images" / "phantom_03.png"
    image = np.array(Image.open(png)).astype(np.float32)
    image[5, 5] = np.nan
    png.unlink()
    path = png.with_suffix(".tif")
    Image.fromarray(image).save(path)
    return path


def symlink_loop(root: Path) -> Path:
    path = root / "images" / "phantom_03.png"
    path.unlink()
    other = root / "images" / "loop"
    path.symlink_to(other)
    other.symlink_to(path)
    return path


def truncated_gzip(root: Path) -> Path:
    path = root / "imagesTr" / "vol_001.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def wrong_extension(root: Path) -> Path:
    path = root / "imagesTr" / "vol_001.nii.gz"  # named NIfTI, holds a PNG
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path, format="PNG")
    return path


def four_d_mask(root: Path) -> Path:
    path = root / "labelsTr" / "vol_001.nii.gz"
    stored = nib.load(path)
    labels = np.asarray(stored.dataobj)
    nib.save(nib.Nifti1Image(np.stack([labels, labels], -1), stored.affine), path)
    return path


# kind -> (corruption, base data set, problem stated by fit and data check)
DATA_FAULTS: dict[str, tuple[Callable[[Path], Path], str, str]] = {
    "zero_byte": (zero_byte, "2d", "cannot read as an image"),
    "mask_shape": (mask_shape, "2d", "mask size (32, 32) differs from image size (64, 64)"),
    "label_range": (label_range, "2d", "label value(s) [9] not in the classes 0..3"),
    "nan_intensities": (nan_intensities, "2d", "NaN or infinite intensities"),
    "symlink_loop": (symlink_loop, "2d", "Too many levels of symbolic links"),
    "truncated_gzip": (truncated_gzip, "volumes", "truncated or corrupt"),
    "wrong_extension": (wrong_extension, "volumes", "not a gzip file"),
    "four_d_mask": (four_d_mask, "volumes", "mask has 2 channels; store class indices in one 3D volume"),
}


@pytest.fixture(params=sorted(DATA_FAULTS))
def broken(request, phantom_dir: Path, volumes: Path, tmp_path: Path) -> tuple[Path, Path, str]:
    """(data set root, the bad file, the problem) for one kind of data fault."""
    corrupt, base, problem = DATA_FAULTS[request.param]
    root = tmp_path / "data"
    shutil.copytree(phantom_dir if base == "2d" else volumes, root, symlinks=True)
    return root, corrupt(root), problem


def test_bad_inputs_fit_names_the_file_and_writes_nothing(broken, tmp_path, capsys):
    root, path, problem = broken
    runs = tmp_path / "runs"
    code, _, err = medseg(capsys, *fit_args(root, runs, "--run.wandb", "false"))
    assert code == 1
    error_line(err, path, problem)
    assert not runs.exists()  # no run directory, config, W&B run or checkpoint


def test_bad_inputs_data_check_names_the_file(broken, capsys):
    root, path, problem = broken
    code, out, _ = medseg(capsys, "data", "check", str(root))
    assert code == 1
    one_line(out, path, problem)
    assert "FAILED: 1 problem(s)" in out


def nan_input(folder: Path, image_2d: Path, volume: Path) -> Path:
    image = np.array(Image.open(image_2d)).astype(np.float32)
    image[3, 3] = np.inf
    path = folder / "inf.tif"
    Image.fromarray(image).save(path)
    return path


def five_d_input(folder: Path, image_2d: Path, volume: Path) -> Path:
    stored = nib.load(volume)
    path = folder / "five.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(stored.dataobj)[..., None, None], stored.affine), path)
    return path


def corrupted_copy(corrupt: Callable[[Path], Path]) -> Callable[[Path, Path, Path], Path]:
    """An infer input: the file ``corrupt`` damages, in a copy of its data set's folder layout."""

    def make(folder: Path, image_2d: Path, volume: Path) -> Path:
        for base, sub in (
            (image_2d, "images"),
            (volume, "imagesTr"),
            (volume.parents[1] / "labelsTr" / volume.name, "labelsTr"),
        ):
            (folder / sub).mkdir(exist_ok=True)
            shutil.copy(base, folder / sub / base.name)
        return corrupt(folder)

    return make


# kind -> (input maker, problem stated by medseg infer)
INFER_FAULTS = {
    "zero_byte": (corrupted_copy(zero_byte), "cannot read as an image"),
    "truncated_gzip": (corrupted_copy(truncated_gzip), "truncated or corrupt"),
    "wrong_extension": (corrupted_copy(wrong_extension), "not a gzip file"),
    "five_d_where_3d_expected": (five_d_input, "expected a 3D volume"),
    "nan_intensities": (nan_input, "NaN or infinite intensities"),
}


@pytest.mark.parametrize("kind", sorted(INFER_FAULTS))
def test_bad_inputs_infer_names_the_file_and_writes_no_prediction(
    kind, phantom_dir, volumes, checkpoint, tmp_path, capsys
):
    make, problem = INFER_FAULTS[kind]
    path = make(tmp_path, phantom_dir / "images" / "phantom_03.png", volumes / "imagesTr" / "vol_001.nii.gz")
    out = tmp_path / "out"
    code, stdout, _ = medseg(
        capsys,
        "infer",
        "--checkpoint",
        str(checkpoint),
        "--input",
        str(path),
        "--output",
        str(out),
        "--accelerator",
        "cpu",
        "--num-workers",
        "0",
    )
    assert code == 1
    one_line(stdout, path, problem)
    # the table records the failure; no segmentation, probability map or overlay was written
    assert [p.name for p in out.rglob("*") if p.is_file()] == ["predictions.csv"]


def test_bad_inputs_infer_names_a_symlink_loop_given_as_input(phantom_dir, checkpoint, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(phantom_dir, root)
    path, out = symlink_loop(root), tmp_path / "out"
    code, _, err = medseg(
        capsys, "infer", "--checkpoint", str(checkpoint), "--input", str(path), "--output", str(out)
    )
    assert code == 1 and not out.exists()
    error_line(err, path, "symbolic link loop")


def test_bad_inputs_empty_folder_everywhere(phantom_dir, checkpoint, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    runs, out = tmp_path / "runs", tmp_path / "out"
    code, _, err = medseg(capsys, *fit_args(empty, runs, "--run.wandb", "false"))
    assert code == 1 and not runs.exists()
    error_line(err, empty, "unknown data layout")
    code, stdout, _ = medseg(capsys, "data", "check", str(empty))
    assert code == 1
    one_line(stdout, empty, "unknown data layout")
    code, _, err = medseg(
        capsys, "infer", "--checkpoint", str(checkpoint), "--input", str(empty), "--output", str(out)
    )
    assert code == 1 and not out.exists()
    error_line(err, empty, "no inputs found")


class WritesAFile:
    """Unpickling this calls ``open(path, "w")``: a stand-in for any code a checkpoint could run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (str(self.path), "w"))


def bad_checkpoint(kind: str, folder: Path) -> tuple[Path, str]:
    """(checkpoint path, the problem medseg must state) for ``missing`` or ``unsafe``."""
    path = folder / f"{kind}.ckpt"
    if kind == "unsafe":
        payload = {
            "state_dict": {},
            "hyper_parameters": {"lr": 0.1},
            "x": WritesAFile(folder / "payload-ran"),
        }
        torch.save(payload, path)
        return path, "refused to load: unpickling it would call io.open"
    return path, "checkpoint not found"


@pytest.mark.parametrize("command", ["fit", "validate"])
@pytest.mark.parametrize("kind", ["missing", "unsafe"])
def test_bad_inputs_checkpoint_is_refused_before_anything_runs(kind, command, phantom_dir, tmp_path, capsys):
    path, problem = bad_checkpoint(kind, tmp_path)
    runs = tmp_path / "runs"
    args = fit_args(phantom_dir, runs, "--run.wandb", "false", "--ckpt_path", str(path))
    code, _, err = medseg(capsys, command, *args[1:])
    assert code == 1
    error_line(err, path, problem)
    assert not (tmp_path / "payload-ran").exists() and not runs.exists()


def test_bad_inputs_infer_missing_checkpoint(phantom_dir, tmp_path, capsys):
    path, problem = bad_checkpoint("missing", tmp_path)
    out = tmp_path / "out"
    code, _, err = medseg(
        capsys, "infer", "--checkpoint", str(path), "--input", str(phantom_dir), "--output", str(out)
    )
    assert code == 1 and not out.exists()
    error_line(err, path, problem)


def test_bad_inputs_config_typo_names_the_key(phantom_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    config = tmp_path / "typo.yaml"
    config.write_text("trainer:\n  max_epoks: 3\n")
    code, _, err = medseg(capsys, *fit_args(phantom_dir, runs, "-c", str(config)))
    assert code == 2 and not runs.exists()
    assert "does not accept option 'trainer.max_epoks'" in err.splitlines()[-1]
    code, _, err = medseg(capsys, *fit_args(phantom_dir, runs, "--model.learning_rate", "0.1"))
    assert code == 2 and not runs.exists()
    assert "model.learning_rate" in err.splitlines()[-1]


def test_bad_inputs_unreadable_file(phantom_dir, tmp_path):
    """chmod 000 does not stop root; there the check runs with the capabilities that let root read
    anything (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) dropped by ``setpriv``."""
    root = tmp_path / "data"
    shutil.copytree(phantom_dir, root)
    path = root / "images" / "phantom_03.png"
    path.chmod(0)
    command = [sys.executable, "-m", "pipeline", "data", "check", str(root)]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and setpriv (util-linux) is missing: cannot make a file unreadable")
        command = [setpriv, "--bounding-set", "-dac_override,-dac_read_search", *command]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    one_line(result.stdout, path, "permission denied")
