"""`vip2clip convert` (modeling_vip2clip.cli.convert) and the folder converter on a user's own folder names:
one-line user errors (exit 2, no traceback), the suggested command for an unrecognised layout, and every
converted sample checked (label, defect_type, mask)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modeling_vip2clip.cli.convert import main as convert_main
from modeling_vip2clip.data import DatasetError, convert_folder, detect_layout, load_anomaly_dataset

REPO = Path(__file__).resolve().parents[1]


def _convert(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "modeling_vip2clip.cli.convert", *argv],
                          capture_output=True, text=True, timeout=120, env=env)


def _image(path: Path, seed: int, size: int = 24) -> np.ndarray:
    """A distinct random RGB image per seed (so that a row can be traced back to its file)."""
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return arr


def _mask(path: Path, seed: int, size: int = 24) -> np.ndarray:
    arr = np.zeros((size, size), np.uint8)
    arr[seed % size : seed % size + 5, 2:9] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode="L").save(path)
    return arr


@pytest.fixture()
def own_folders(tmp_path):
    """A line's folders as users name them: nominal/ and OK/ (normal), NG/ (generic anomalous, with a crack/
    sub-folder), scratch/ and dent/ (named defects), masks/ (per folder, one flat)."""
    root = tmp_path / "line3"
    expected = {}  # image_path -> (label, defect_type, image array, mask array or None)
    seed = 0
    for folder in ("nominal", "OK"):
        for i in range(2):
            seed += 1
            expected[f"{folder}/{i}.png"] = (0, "good", _image(root / folder / f"{i}.png", seed), None)
    seed += 1
    expected["NG/0.png"] = (1, "anomaly", _image(root / "NG/0.png", seed), _mask(root / "masks/NG/0.png", seed))
    seed += 1
    expected["NG/crack/c1.png"] = (1, "crack", _image(root / "NG/crack/c1.png", seed),
                                   _mask(root / "masks/crack/c1_mask.png", seed))
    for folder in ("scratch", "dent"):
        for i in range(2):
            seed += 1
            mask = _mask(root / "masks" / folder / f"{folder[0]}{i}_mask.png", seed)
            expected[f"{folder}/{folder[0]}{i}.png"] = (1, folder, _image(root / folder / f"{folder[0]}{i}.png", seed), mask)
    seed += 1  # a mask found in the flat masks/ folder
    expected["dent/flat.png"] = (1, "dent", _image(root / "dent/flat.png", seed), _mask(root / "masks/flat.png", seed))
    return root, expected


def _check_rows(ds, expected):
    assert sorted(ds["image_path"]) == sorted(expected)
    for row in ds:
        label, defect, image, mask = expected[row["image_path"]]
        assert (row["label"], row["defect_type"]) == (label, defect), row["image_path"]
        assert np.array_equal(np.asarray(row["image"]), image)
        if mask is None:
            assert row["mask"] is None
        else:
            assert np.array_equal(np.asarray(row["mask"]), mask), row["image_path"]


def test_user_named_folders_convert_sample_by_sample(own_folders):
    root, expected = own_folders
    ds, report = convert_folder(root, normal_dirs=["nominal", "OK"], anomalous_dirs=["NG", "scratch", "dent"],
                                mask_dir="masks", progress=False)
    assert report.skipped == [] and report.warnings == []
    assert set(ds["category"]) == {"line3"} and set(ds["split"]) == {"test"}
    _check_rows(ds, expected)


def test_default_names_are_case_insensitive_and_unnamed_folders_are_reported(own_folders):
    root, expected = own_folders
    assert detect_layout(root) == "folder"  # OK/, NG/ and nominal/ are known names in any case
    ds, report = convert_folder(root, progress=False)
    _check_rows(ds, {p: e for p, e in expected.items() if p.split("/")[0] in ("nominal", "OK", "NG")})
    [(where, message)] = [(w, m) for w, m in report.warnings if "not converted" in m]
    assert where == "line3" and "dent/, scratch/" in message
    assert "--normal-dir OK nominal --anomalous-dir NG dent scratch --mask-dir masks" in message


def test_a_mask_two_images_share_by_stem_goes_to_neither(tmp_path):
    root = tmp_path / "parts"
    _image(root / "good/0.png", 0)
    _image(root / "scratch/5.png", 1)
    _image(root / "dent/5.png", 2)
    _mask(root / "masks/5.png", 3)
    ds, report = convert_folder(root, anomalous_dirs=["scratch", "dent"], progress=False)
    rows = {r["image_path"]: r for r in ds}
    assert rows["scratch/5.png"]["mask"] is None and rows["dent/5.png"]["mask"] is None
    assert any(path == "masks/5.png" and "matches 2 images" in why for path, why in report.warnings)


def test_named_folder_that_does_not_exist_is_a_dataset_error(own_folders):
    root, _ = own_folders
    with pytest.raises(DatasetError, match=r"--anomalous-dir bumps: no folder 'bumps'.*scratch/ \(2 images\)"):
        convert_folder(root, anomalous_dirs=["scratch", "bumps"], progress=False)


def test_cli_converts_own_folders_and_saves(own_folders, tmp_path, capsys):
    root, expected = own_folders
    out = tmp_path / "line3_ds"
    argv = ["--root", str(root), "--out", str(out), "--normal-dir", "nominal", "OK",
            "--anomalous-dir", "NG", "scratch", "dent", "--mask-dir", "masks"]
    assert convert_main(argv) == 0
    assert f"saved {len(expected)} images (7 anomalous) in 1 categories" in capsys.readouterr().out
    _check_rows(load_anomaly_dataset(out), expected)
    # the same again: --out is not empty
    assert convert_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {out} ({out}): exists and is not empty") and "pass --overwrite" in err
    assert "--resume" not in err  # convert has none
    (out / "notes.txt").write_text("mine")  # the user's own file in --out
    assert convert_main([*argv, "--overwrite"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["line3", "line3_ds"]  # no staging folder left
    assert (out / "notes.txt").read_text() == "mine" and not list(out.glob(".staging-*"))
    _check_rows(load_anomaly_dataset(out), expected)
    capsys.readouterr()


def test_cli_owns_its_out_folder(own_folders, tmp_path, capsys):
    """--out belongs to one run (run_folder.py): held → refused; an --overwrite that fails keeps the old dataset;
    never --root, inside it or around it."""
    import fcntl

    from modeling_vip2clip.run_folder import LOCK_FILE, MANIFEST_FILE

    root, expected = own_folders
    out = tmp_path / "line3_ds"
    argv = ["--root", str(root), "--out", str(out), "--normal-dir", "nominal", "OK",
            "--anomalous-dir", "NG", "scratch", "dent", "--mask-dir", "masks"]
    assert convert_main(argv) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name not in (LOCK_FILE, MANIFEST_FILE)}
    with open(out / LOCK_FILE, "a+") as held:  # another run holds the folder
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert convert_main([*argv, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out ({out}): another vip2clip run is writing to it") and err.count("\n") == 1
    # an overwrite whose conversion fails (no such category): the old dataset stays whole
    assert convert_main([*argv, "--overwrite", "--categories", "nothing"]) == 2
    assert "no usable image" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name not in (LOCK_FILE, MANIFEST_FILE)} == before
    _check_rows(load_anomaly_dataset(out), expected)
    for bad, relation in ((root, "is"), (root / "converted", "lies inside"), (tmp_path, "contains")):
        assert convert_main([*argv[:2], "--out", str(bad), *argv[4:], "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {bad} ({bad}): {relation} the input {root} that this run reads; "), err
    assert not (root / "converted").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--anomalous-dir", "bumps"], "error: --anomalous-dir bumps: no folder 'bumps' in "),
        (["--layout", "mvtec", "--mask-dir", "masks"], "error: --mask-dir apply to --layout folder, not --layout mvtec;"),
    ],
)
def test_cli_user_errors_name_the_flag(own_folders, tmp_path, capsys, extra, message):
    root, _ = own_folders
    assert convert_main(["--root", str(root), "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1 and not (tmp_path / "o").exists()


def test_missing_root_says_it_does_not_exist_at_once(tmp_path):
    missing = tmp_path / "no-such-folder"
    started = time.monotonic()
    done = _convert("--root", str(missing), "--out", str(tmp_path / "o"))
    assert time.monotonic() - started < 5  # the bound: refused in seconds (about 0.5 s unloaded)
    assert done.returncode == 2
    assert done.stderr == f"error: --root {missing} does not exist; pass the folder that holds the raw benchmark\n"
    assert "Traceback" not in done.stderr + done.stdout and "unrecognised" not in done.stderr
    # why it is fast: the check runs before torch, datasets or PIL are imported
    probe = (f"import sys; from modeling_vip2clip.cli.convert import main; rc = main(['--root', {str(missing)!r}, "
             f"'--out', 'o']); print(rc, sorted(m for m in ('torch', 'datasets', 'PIL') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env).stdout
    assert out.split("\n")[0] == "2 []"


def test_unrecognised_layout_lists_folders_and_the_command_that_converts_them(tmp_path):
    root = tmp_path / "my parts"  # a space: the suggested command must quote it
    for i in range(2):
        _image(root / "normal_samples" / f"{i}.png", i)
    _image(root / "scratch/s.png", 5)
    _image(root / "dent/d.png", 6)
    _mask(root / "gt_masks/s.png", 7)
    _mask(root / "gt_masks/d.png", 8)
    out = tmp_path / "ds"
    done = _convert("--root", str(root), "--out", str(out))
    assert done.returncode == 2 and "Traceback" not in done.stderr + done.stdout
    [line] = done.stderr.splitlines()
    assert line.startswith(f"error: {root}: unrecognised dataset layout (found dent/ (1 image), gt_masks/ (2 images), "
                           "normal_samples/ (2 images), scratch/ (1 image)); ")
    command = line.split("run: ", 1)[1]
    assert command == (f"vip2clip convert --layout folder --root {shlex.quote(str(root))} --normal-dir normal_samples "
                       f"--anomalous-dir dent scratch --mask-dir gt_masks --out {out}")
    # ... and the suggested command does convert it
    assert convert_main(shlex.split(command)[2:]) == 0
    ds = load_anomaly_dataset(out)
    assert sorted(zip(ds["image_path"], ds["label"], ds["defect_type"], [m is not None for m in ds["mask"]])) == [
        ("dent/d.png", 1, "dent", True), ("normal_samples/0.png", 0, "good", False),
        ("normal_samples/1.png", 0, "good", False), ("scratch/s.png", 1, "scratch", True)]
