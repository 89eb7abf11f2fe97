"""Tests of modeling_vip2clip.data: converters vs the synthetic generator, bad files,
save/load round trip, lazy torch batches, determinism."""

from __future__ import annotations

import hashlib
import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_vip2clip.data import (
    DatasetError,
    SkipBadCollate,
    convert,
    convert_folder,
    convert_meta_json,
    convert_mvtec,
    convert_visa,
    detect_layout,
    generate_synthetic_benchmark,
    load_anomaly_dataset,
    make_transform,
    read_image,
    to_torch_dataset,
    validate_sample,
    without_decoding,
)
from modeling_vip2clip.data.synthetic import apply_defect, main as synthetic_main, render_texture
from modeling_vip2clip.processing_vip2clip import ViP2CLIPProcessor

SIZE = 64  # generated image side
S = 56  # processor input side
GEN = dict(n_train_good=2, n_test_good=2, n_test_bad=4, image_size=SIZE, seed=0)
CONVERTERS = {"mvtec": convert_mvtec, "meta_json": convert_meta_json, "visa": convert_visa, "folder": convert_folder}


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("synthetic")
    out = {}
    for layout in CONVERTERS:
        root = base / layout
        out[layout] = (root, generate_synthetic_benchmark(root, layout=layout, **GEN))
    return out


@pytest.fixture(scope="module")
def processor():
    return ViP2CLIPProcessor(image_size=S)


def _arr(img) -> np.ndarray:
    return np.asarray(img)


@pytest.mark.parametrize("layout", list(CONVERTERS))
def test_converter_matches_generator(trees, layout):
    root, records = trees[layout]
    assert detect_layout(root) == layout
    ds, report = CONVERTERS[layout](root, split="all", progress=False)
    assert report.skipped == [] and report.warnings == []
    assert report.n_ok == len(ds) == len(records)
    by_path = {r["image_path"]: r for r in records}
    assert sorted(ds["image_path"]) == sorted(by_path)
    for row in ds:
        rec = by_path[row["image_path"]]
        assert validate_sample(row) == []
        assert row["label"] == rec["label"]
        assert row["category"] == rec["category"]
        assert row["defect_type"] == rec["defect_type"]
        assert row["split"] == ("test" if layout == "folder" else rec["split"])
        assert np.array_equal(_arr(row["image"]), _arr(Image.open(root / rec["image_path"])))
        if rec["mask_path"] is None:
            assert row["mask"] is None
        else:
            expected = _arr(Image.open(root / rec["mask_path"]))
            assert set(np.unique(expected)) == {0, 255}
            assert np.array_equal(_arr(row["mask"]), expected)  # pixel-exact, matched by stem
    # split selection and category filtering
    if layout != "folder":
        for split in ("train", "test"):
            part, _ = convert(root, split=split, progress=False)
            assert len(part) == sum(r["split"] == split for r in records)
            assert set(part["split"]) == {split}
    sub = load_anomaly_dataset(root, categories=["fabric"], progress=False)
    assert set(sub["category"]) == {"fabric"}
    assert len(sub) == sum(r["category"] == "fabric" and r["split"] == "test" for r in records)


def test_licence_and_info(trees):
    root, _ = trees["mvtec"]
    ds, _ = convert_mvtec(root, progress=False)
    assert "licence" in ds.info.description.lower() or "license" in ds.info.description.lower()
    mvtec_like = root.parent / "mvtec_named"
    generate_synthetic_benchmark(mvtec_like, categories=("bottle",), n_train_good=0, n_test_good=1, n_test_bad=1, image_size=32)
    ds, _ = convert_mvtec(mvtec_like, progress=False)
    assert ds.info.license == "cc-by-nc-sa-4.0" and "NC" in ds.info.description


def test_bad_files_are_reported_and_skipped(tmp_path):
    root = tmp_path / "mvtec"
    records = generate_synthetic_benchmark(root, categories=("fabric", "metal_plate"), **GEN)
    test_recs = [r for r in records if r["split"] == "test"]
    good = root / "fabric/test/good/000.png"
    data = good.read_bytes()
    corrupt = "fabric/test/good/001.png"  # checksum failure in the middle of the data
    garbled = bytearray((root / corrupt).read_bytes())
    mid = len(garbled) // 2
    garbled[mid : mid + 64] = bytes(range(64))
    (root / corrupt).write_bytes(bytes(garbled))
    truncated = "fabric/test/hole/000.png"
    (root / truncated).write_bytes((root / truncated).read_bytes()[: len(data) // 2])
    empty = "metal_plate/test/good/000.png"
    (root / empty).write_bytes(b"")
    text = "metal_plate/test/good/notes.png"
    (root / text).write_text("this is not an image\n")
    (root / "metal_plate/test/good/.DS_Store").write_bytes(b"\0\1")  # hidden: ignored
    missing = "metal_plate/test/scratch/000.png"
    (root / "metal_plate/ground_truth/scratch/000_mask.png").unlink()
    resized = "metal_plate/test/discolor/000.png"
    mpath = root / "metal_plate/ground_truth/discolor/000_mask.png"
    Image.open(mpath).resize((SIZE // 2, SIZE // 2), Image.Resampling.NEAREST).save(mpath)

    ds, report = convert_mvtec(root, progress=False)
    reasons = dict(report.skipped)
    assert set(reasons) == {corrupt, truncated, empty, text}
    assert "checksum" in reasons[corrupt] or "corrupt" in reasons[corrupt]
    assert "truncated" in reasons[truncated]
    assert "0 bytes" in reasons[empty]
    assert "not a decodable image" in reasons[text]
    warned = dict(report.warnings)
    assert "no mask" in warned[missing] and "mask=None" in warned[missing]
    assert "differs from image size" in warned[resized]
    assert report.n_ok == len(ds) == len(test_recs) - 3  # the text file was never a record
    rows = {r["image_path"]: r for r in ds}
    assert rows[missing]["mask"] is None and rows[missing]["label"] == 1
    assert rows[resized]["mask"].size == (SIZE // 2, SIZE // 2)
    assert "4 files skipped" in report.summary()

    ds_skip, report_skip = convert_mvtec(root, progress=False, missing_mask="skip")
    assert missing in dict(report_skip.skipped) and len(ds_skip) == len(ds) - 1


def test_save_to_disk_round_trip_embeds_bytes(tmp_path):
    src = tmp_path / "src"
    generate_synthetic_benchmark(src, categories=("wood_like", "pill_like"), layout="meta_json", **GEN)
    ds, _ = convert(src, split="all", progress=False)
    expected = [(_arr(r["image"]).copy(), None if r["mask"] is None else _arr(r["mask"]).copy(), r["image_path"]) for r in ds]
    out = tmp_path / "saved"
    ds.save_to_disk(str(out))
    shutil.rmtree(src)
    loaded = load_anomaly_dataset(out)
    assert len(loaded) == len(expected) and loaded.features == ds.features
    for row, (img, mask, path) in zip(loaded, expected):
        assert row["image_path"] == path
        assert np.array_equal(_arr(row["image"]), img)
        assert (row["mask"] is None) == (mask is None)
        if mask is not None:
            assert np.array_equal(_arr(row["mask"]), mask)
    assert set(load_anomaly_dataset(out, split="train")["split"]) == {"train"}
    assert set(load_anomaly_dataset(out, categories=["pill_like"])["category"]) == {"pill_like"}


def _check_batches(batches, ds, n_bad):
    seen = []
    for b in batches:
        k = b["pixel_values"].shape[0]
        assert b["pixel_values"].shape == (k, 3, S, S) and b["pixel_values"].dtype == torch.float32
        assert b["masks"].shape == (k, S, S) and set(torch.unique(b["masks"]).tolist()) <= {0.0, 1.0}
        assert b["labels"].dtype == torch.long and len(b["category"]) == len(b["index"]) == k
        for j, idx in enumerate(b["index"]):
            row = ds[idx]
            assert b["labels"][j].item() == row["label"] and b["category"][j] == row["category"]
            assert bool(b["masks"][j].any()) == (row["label"] == 1)
        seen += b["index"]
    assert len(seen) == len(ds) - n_bad and len(set(seen)) == len(seen)


def test_transform_dataloader_skips_bad_rows(tmp_path, processor):
    root = tmp_path / "tree"
    generate_synthetic_benchmark(root, categories=("fabric", "metal_plate"), **GEN)
    tiny = root / "fabric/test/good/002.png"  # decodes, but below one ViT patch: processor rejects it
    Image.new("RGB", (10, 10), (128, 128, 128)).save(tiny)
    ds, report = convert_mvtec(root, progress=False)
    assert report.skipped == []
    # corrupt a file *after* conversion: only the transform can notice
    broken = root / "metal_plate/test/good/001.png"
    broken.write_bytes(broken.read_bytes()[:100])
    bad_paths = {"fabric/test/good/002.png", "metal_plate/test/good/001.png"}

    collate = SkipBadCollate()
    loader = torch.utils.data.DataLoader(to_torch_dataset(ds, processor), batch_size=4, collate_fn=collate)
    _check_batches(list(loader), ds, n_bad=2)
    assert collate.n_skipped == 2 and {p for _, p, _ in collate.skipped} == bad_paths
    errors = {p: e for _, p, e in collate.skipped}
    assert "processor rejected" in errors["fabric/test/good/002.png"]
    assert "does not decode" in errors["metal_plate/test/good/001.png"]

    # plain with_transform on an undecoded view (row indices via an index column)
    view = without_decoding(ds.add_column("index", list(range(len(ds))))).with_transform(make_transform(processor))
    collate2 = SkipBadCollate()
    _check_batches(list(torch.utils.data.DataLoader(view, batch_size=3, collate_fn=collate2)), ds, n_bad=2)
    assert collate2.n_skipped == 2
    item = view[0]
    assert item["pixel_values"].shape == (3, S, S) and item["masks"].shape == (S, S)


def test_dataloader_workers_start_under_spawn(tmp_path, processor):
    """The dataset wrapper and its transform pickle: workers started with `spawn` (the default on macOS and
    Windows, and for Linux from Python 3.14) yield the same batches as the main process."""
    root = tmp_path / "tree"
    generate_synthetic_benchmark(root, categories=("fabric",), **GEN)
    ds, _ = convert_mvtec(root, progress=False)
    dataset = to_torch_dataset(ds, processor)
    inline = list(torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=SkipBadCollate()))
    spawned = list(torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=SkipBadCollate(), num_workers=1,
                                               multiprocessing_context="spawn"))
    assert len(spawned) == len(inline) > 1
    for a, b in zip(inline, spawned):
        assert a["index"] == b["index"] and a["image_path"] == b["image_path"]
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["masks"], b["masks"])
    _check_batches(spawned, ds, n_bad=0)


def test_mask_of_other_size_is_resized_not_dropped(tmp_path, processor):
    root = tmp_path / "folder"
    generate_synthetic_benchmark(root, categories=("pill_like",), layout="folder", **GEN)
    mpath = root / "pill_like/masks/discolor_000_mask.png"
    Image.open(mpath).resize((SIZE * 2, SIZE * 2), Image.Resampling.NEAREST).save(mpath)
    ds, report = convert_folder(root / "pill_like", progress=False, category="pill")
    assert len(report.warnings) == 1 and set(ds["category"]) == {"pill"}
    batch = SkipBadCollate()(to_torch_dataset(ds, processor).__getitems__(list(range(len(ds)))))
    assert batch["pixel_values"].shape[0] == len(ds)
    assert all(bool(batch["masks"][j].any()) == (ds[i]["label"] == 1) for j, i in enumerate(batch["index"]))


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generator_is_deterministic(tmp_path):
    kw = dict(categories=("fabric", "wood_like"), n_train_good=1, n_test_good=1, n_test_bad=2, image_size=48)
    a = _digest_after(generate_synthetic_benchmark, tmp_path / "a", seed=0, **kw)
    b = _digest_after(generate_synthetic_benchmark, tmp_path / "b", seed=0, **kw)
    c = _digest_after(generate_synthetic_benchmark, tmp_path / "c", seed=1, **kw)
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if not k.endswith("_mask.png"))


def _digest_after(fn, root, **kw):
    fn(root, **kw)
    return _digest(root)


@pytest.mark.parametrize("kind", ["scratch", "patch", "discolor", "hole"])
def test_defect_masks_are_exact(kind):
    rng = np.random.default_rng(3)
    clean = render_texture("metal_plate", rng, 64)
    out, mask = apply_defect(clean, kind, rng, "metal_plate")
    assert mask.any() and np.array_equal(mask, np.any(out != clean, axis=-1))


def test_cli_and_validate_sample(tmp_path, capsys):
    assert synthetic_main(["--out", str(tmp_path / "v"), "--seed", "0", "--layout", "visa", "--image-size", "32",
                           "--categories", "fabric", "--n-train-good", "1", "--n-test-good", "1", "--n-test-bad", "1"]) == 0
    assert "wrote 3 images" in capsys.readouterr().out
    assert (tmp_path / "v/split_csv/1cls.csv").read_text().startswith("object,split,label,image,mask")
    row = {"image": {"bytes": b"not a png", "path": None}, "mask": None, "label": 0, "category": "x",
           "defect_type": "scratch", "split": "test", "image_path": "x.png"}
    problems = validate_sample(row)
    assert any("defect_type" in p for p in problems) and any("does not decode" in p for p in problems)


def test_mask_on_a_normal_image_is_reported_and_ignored(tmp_path, processor, caplog):
    import json

    import datasets

    root = tmp_path / "meta"
    generate_synthetic_benchmark(root, categories=("fabric",), layout="meta_json", **GEN)
    meta = json.loads((root / "meta.json").read_text())
    normal = next(e for e in meta["test"]["fabric"] if e["anomaly"] == 0)
    bad = next(e for e in meta["test"]["fabric"] if e["anomaly"] == 1)
    normal["mask_path"] = bad["mask_path"]  # a defect mask attached to an image labelled normal
    (root / "meta.json").write_text(json.dumps(meta))
    ds, report = convert_meta_json(root, progress=False)
    assert any(path == normal["img_path"] and "normal image has a mask" in why for path, why in report.warnings)
    row = ds[[p for p in ds["image_path"]].index(normal["img_path"])]
    assert row["label"] == 0 and row["mask"] is None
    # a user-built dataset with the same mistake: the transform follows the label and says so
    mask = Image.open(root / bad["mask_path"])
    user = datasets.Dataset.from_dict(
        {"image": [Image.open(root / normal["img_path"])], "mask": [mask], "label": [0],
         "category": ["fabric"], "image_path": [normal["img_path"]]},
        features=datasets.Features({"image": datasets.Image(), "mask": datasets.Image(), "label": datasets.Value("int64"),
                                    "category": datasets.Value("string"), "image_path": datasets.Value("string")}),
    )
    with caplog.at_level("WARNING"):
        batch = make_transform(processor)(without_decoding(user)[:1])
    assert "labelled normal but its mask is not empty" in caplog.text
    assert batch["masks"].sum() == 0 and not batch["bad"].any()


def test_synthetic_cli_describes_every_option_and_tiny_converts(tmp_path, capsys):
    import argparse

    from modeling_vip2clip.data import synthetic

    parser = synthetic.add_arguments(argparse.ArgumentParser())
    for action in parser._actions:
        assert action.help, f"{action.dest} has no help"
        if action.option_strings and action.dest not in ("help", "out", "tiny", "debug"):
            assert "(default: " in action.help, action.dest
    assert synthetic_main(["--out", str(tmp_path / "raw"), "--tiny"]) == 0
    assert "wrote 6 images (2 anomalous) in the 'mvtec' layout" in capsys.readouterr().out
    ds, report = convert(tmp_path / "raw", split="all", progress=False)
    assert report.skipped == [] and len(ds) == 6 and set(ds["category"]) == {"fabric"}
    assert {r["image"].size for r in ds} == {(32, 32)} and sum(ds["label"]) == 2
    # a flag given with --tiny overrides the preset; a size below 16 is a one-line user error
    assert synthetic_main(["--out", str(tmp_path / "raw2"), "--tiny", "--n-test-bad", "3", "--layout", "folder"]) == 0
    assert "wrote 5 images (3 anomalous) in the 'folder' layout" in capsys.readouterr().out
    assert synthetic_main(["--out", str(tmp_path / "raw3"), "--image-size", "8"]) == 2
    assert capsys.readouterr().err == "error: --image-size 8: below 16 pixels; pass --image-size 16 or more\n"
    assert not (tmp_path / "raw3").exists()


# ------------------------------------------------------------------------------ other schemas (sources.py)


def _visa_like_parquet(root: Path) -> dict:
    """The layout of the Hub's BrachioLab/visa: data/<class>.<split>-00000-of-00001.parquet, columns image, mask,
    label (0/1), no category column. Returns {(split name, row): (label, image array, mask array)}."""
    import datasets

    expected = {}
    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image(), "label": datasets.Value("int64")})
    for c, cls in enumerate(("candle", "pcb1")):
        for split, labels in (("train", [0, 0]), ("test", [0, 1, 1])):
            rows = {"image": [], "mask": [], "label": []}
            for i, label in enumerate(labels):
                rng = np.random.default_rng([c, len(split), i])
                image = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
                mask = np.zeros((20, 20), np.uint8)
                if label:
                    mask[2 + i : 9 + i, 3:11] = 255
                rows["image"].append(Image.fromarray(image))
                rows["mask"].append(Image.fromarray(mask, mode="L"))
                rows["label"].append(label)
                expected[(f"{cls}.{split}", i)] = (label, image, mask)
            path = root / "data" / f"{cls}.{split}-00000-of-00001.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return expected


def _check_visa_like(ds, expected, splits):
    rows = list(ds)
    assert len(rows) == sum(1 for s, _ in expected if s in splits)
    seen = set()
    for row in rows:
        split_name, index = row["image_path"].rsplit("/", 1)
        label, image, mask = expected[(split_name, int(index))]
        seen.add((split_name, int(index)))
        assert validate_sample(row) == []
        assert row["category"] == split_name.split(".")[0] and row["split"] == split_name.split(".")[1]
        assert row["label"] == label and row["defect_type"] == ("anomaly" if label else "good")
        assert np.array_equal(np.asarray(read_image(row["image"])), image)  # streamed rows are not decoded
        assert np.array_equal(np.asarray(read_image(row["mask"])), mask)
    assert {s for s, _ in seen} == set(splits) and len(seen) == len(rows)  # every row once, image_path unique


def test_hub_style_parquet_with_one_split_per_class(tmp_path, processor):
    import datasets

    from modeling_vip2clip.data import ANOMALY_FEATURES

    root = tmp_path / "visa_hub"
    expected = _visa_like_parquet(root)
    ds = load_anomaly_dataset(root, split="test")  # the folder: every <class>.test split, category from its name
    assert ds.features == ANOMALY_FEATURES
    _check_visa_like(ds, expected, {"candle.test", "pcb1.test"})
    _check_visa_like(load_anomaly_dataset(root), expected, {"candle.test", "pcb1.test"})  # None: the test splits
    _check_visa_like(load_anomaly_dataset(root, split="candle.train"), expected, {"candle.train"})
    _check_visa_like(load_anomaly_dataset(root, split="all", categories=["pcb1"]), expected, {"pcb1.train", "pcb1.test"})
    # ... the same through datasets.load_dataset("parquet", data_files=...), and streamed
    files = {p.name.split("-")[0]: str(p) for p in (root / "data").glob("*.parquet")}
    _check_visa_like(load_anomaly_dataset(datasets.load_dataset("parquet", data_files=files), split="test"), expected,
                     {"candle.test", "pcb1.test"})
    streamed = load_anomaly_dataset(root, split="test", streaming=True)
    assert isinstance(streamed, datasets.IterableDataset)
    _check_visa_like(streamed, expected, {"candle.test", "pcb1.test"})
    # ... and into model-ready batches: anomalous rows carry their masks
    batch = SkipBadCollate()(to_torch_dataset(ds, processor).__getitems__(list(range(len(ds)))))
    assert batch["labels"].tolist() == ds["label"] and [bool(m.any()) for m in batch["masks"]] == [bool(v) for v in ds["label"]]


def test_other_column_names_and_label_kinds():
    import datasets

    images = [Image.new("RGB", (16, 16), (i * 40, 0, 0)) for i in range(5)]
    source = datasets.Dataset.from_dict(
        {"picture": images, "verdict": [0, 1, 2, 0, 2], "part": ["a", "a", "b", "b", "b"]},
        features=datasets.Features({"picture": datasets.Image(), "verdict": datasets.ClassLabel(names=["OK", "crack", "dent"]),
                                    "part": datasets.Value("string")}))
    ds = load_anomaly_dataset(source, image_column="picture", label_column="verdict", category_column="part")
    assert ds["label"] == [0, 1, 1, 0, 1] and ds["defect_type"] == ["good", "crack", "dent", "good", "dent"]
    assert ds["category"] == ["a", "a", "b", "b", "b"] and ds["mask"] == [None] * 5  # no mask column: image-level
    assert np.array_equal(np.asarray(ds[2]["image"]), np.asarray(images[2]))
    strings = datasets.Dataset.from_dict({"image": images[:3], "label": ["good", "NG", "Anomalous"]})
    assert load_anomaly_dataset(strings)["label"] == [0, 1, 1]
    unlabelled = load_anomaly_dataset(datasets.Dataset.from_dict({"image": images[:2]}), require_labels=False)
    assert unlabelled["label"] == [-1, -1]
    with pytest.raises(DatasetError, match=r"^--label-column label: label 'maybe' is neither normal"):
        load_anomaly_dataset(datasets.Dataset.from_dict({"image": images[:1], "label": ["maybe"]}))


def test_one_label_rule_class_names_in_any_order_and_normal_label():
    import datasets

    images = [Image.new("RGB", (16, 16), (i * 40, 0, 0)) for i in range(4)]
    backwards = datasets.Dataset.from_dict(
        {"image": images, "label": [1, 0, 1, 0]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["defective", "good"])}))
    assert load_anomaly_dataset(backwards)["label"] == [0, 1, 0, 1]  # good (index 1) is the normal class
    names = datasets.Dataset.from_dict({"image": images, "defect": ["good", "scratch", "Good", "crack"]})
    with pytest.raises(DatasetError, match=r"^--label-column defect: label 'scratch' is neither .* --normal-label"):
        load_anomaly_dataset(names, label_column="defect")
    ds = load_anomaly_dataset(names, label_column="defect", normal_labels=["good"])
    assert ds["label"] == [0, 1, 0, 1] and ds["defect_type"] == ["good", "scratch", "good", "crack"]
    with pytest.raises(DatasetError, match=r"^--normal-label goood: no value of the label column 'defect'"):
        load_anomaly_dataset(names, label_column="defect", normal_labels=["goood"])  # a typo is not "all anomalous"
    assert load_anomaly_dataset(datasets.Dataset.from_dict({"image": images, "label": [True, False, False, True]}))[
        "label"] == [1, 0, 0, 1]
    assert load_anomaly_dataset(datasets.Dataset.from_dict({"image": images, "label": [0.0, 1.0, 1.0, 0.0]}))[
        "label"] == [0, 1, 1, 0]
    # The defect-name column of a dataset that otherwise has the canonical columns goes through the rule too.
    canonical_names = ds.cast_column("label", datasets.Value("string")).map(
        lambda row: {"label": row["defect_type"]})
    assert load_anomaly_dataset(canonical_names, normal_labels=["good"])["label"] == [0, 1, 0, 1]


def test_one_image_reader_names_the_input_and_the_reason(tmp_path):
    from modeling_vip2clip.data import ImageReadError

    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 20, 30)).save(buffer, format="PNG")
    data = buffer.getvalue()
    (tmp_path / "ok.png").write_bytes(data)
    for value in (tmp_path / "ok.png", str(tmp_path / "ok.png"), data, {"bytes": data, "path": None},
                  {"bytes": None, "path": str(tmp_path / "ok.png")}, np.full((30, 40, 3), 7, np.uint8)):
        image = read_image(value)
        assert image.size == (40, 30) and image.mode == "RGB"
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    cases = {tmp_path / "nope.png": "no such file", tmp_path / "empty.png": "0 bytes",
             tmp_path / "text.png": "not an image file", tmp_path / "cut.png": "corrupt or truncated"}
    for path, reason in cases.items():
        with pytest.raises(ImageReadError, match=f"^{re.escape(str(path))}: .*{reason}"):
            read_image(path)
    with pytest.raises(ImageReadError, match=r"^part\.png: 40x30 = 1,200 pixels, over the limit of 1,000"):
        read_image(data, what="part.png", max_pixels=1000)
    with pytest.raises(ImageReadError, match="neither bytes nor a path"):
        read_image({"bytes": None, "path": None})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_column": "img"}, r"^--image-column img: no column 'img' in .* \(columns: image, mask, label\); pass --image-column"),
        ({"label_column": "y"}, r"^--label-column y: no column 'y' .* pass --label-column"),
        ({"mask_column": "gt"}, r"^--mask-column gt: no column 'gt' .* pass --mask-column"),
        ({"category_column": "cls"}, r"^--category-column cls: no column 'cls' .* pass --category-column"),
        ({"split": "val"}, r"^--split val: .* has no split 'val' nor any '<category>.val' \(splits: .*candle.test.*\)"),
    ],
)
def test_schema_errors_name_the_flag_and_what_is_there(tmp_path_factory, kwargs, message):
    root = tmp_path_factory.getbasetemp() / "visa_hub_errors"
    if not root.exists():
        _visa_like_parquet(root)
    with pytest.raises(DatasetError, match=message):
        load_anomaly_dataset(root, **{"split": "test", **kwargs})


def test_saved_dataset_dict_and_schema_flags(tmp_path):
    import argparse

    import datasets

    from modeling_vip2clip.data import add_schema_arguments, schema_options

    src = tmp_path / "src"
    generate_synthetic_benchmark(src, categories=("fabric",), **GEN)
    dd = datasets.DatasetDict({s: convert(src, split=s, progress=False)[0] for s in ("train", "test")})
    dd.save_to_disk(str(tmp_path / "saved"))
    assert set(load_anomaly_dataset(tmp_path / "saved")["split"]) == {"test"}
    train = load_anomaly_dataset(tmp_path / "saved", split="train")
    assert set(train["split"]) == {"train"} and train["image_path"] == dd["train"]["image_path"]
    with pytest.raises(DatasetError, match="--split val"):
        load_anomaly_dataset(tmp_path / "saved", split="val")
    with pytest.raises(DatasetError, match="--dataset .*nothing-here: no such file or folder"):
        load_anomaly_dataset(tmp_path / "nothing-here")
    args = add_schema_arguments(argparse.ArgumentParser()).parse_args(["--image-column", "img", "--mask-column", "gt"])
    assert schema_options(args) == {"image_column": "img", "label_column": "label", "mask_column": "gt",
                                    "category_column": "category", "normal_labels": None}
    args = add_schema_arguments(argparse.ArgumentParser()).parse_args(["--normal-label", "good", "ok"])
    assert schema_options(args)["normal_labels"] == ["good", "ok"]
