"""Convert anomaly-detection benchmarks from their on-disk layouts to ``datasets``.

Every converter returns ``(dataset, report)``: a :class:`datasets.Dataset`
with the canonical schema of :mod:`modeling_vip2clip.data.schema` and a
:class:`ConversionReport` that lists every file that was skipped (with its path
and the reason) and every warning. Converters never crash on a bad file: a
0-byte, truncated, corrupt or non-image file is decoded with PIL inside
``try``/``except`` (``verify()`` *and* a full ``load()``), logged, counted and
skipped; the rest converts.

Supported layouts
-----------------
* ``mvtec`` (:func:`convert_mvtec`): ``<root>/<category>/{train,test}/<defect>/*.png``
  with masks ``<root>/<category>/ground_truth/<defect>/<stem>_mask.png``, matched
  to images **by file stem**, never by sorted position. Also MPDD, BTAD
  (normal folder ``ok``), KSDD2-style trees, or a single category folder.
* ``visa`` (:func:`convert_visa`): ``<root>/split_csv/1cls.csv`` with columns
  ``object,split,label,image,mask`` (paths relative to ``root``, label
  ``normal``/``anomaly``).
* ``meta_json`` (:func:`convert_meta_json`): the ViP²-CLIP / AnomalyCLIP
  authors' ``<root>/meta.json`` (``{"train": {cls: [{img_path, mask_path,
  cls_name, specie_name, anomaly}, ...]}, "test": {...}}``), which their
  ``generate_dataset_json`` scripts write for all 18 benchmarks of the paper.
* ``folder`` (:func:`convert_folder`): a user's plain layout ``<root>/good/*``,
  ``<root>/bad/*`` (or ``anomalous/``, ``anomaly/``, ``defect/``; sub-folders of
  it become defect types), optional masks ``<root>/masks/<stem>[_mask].*``;
  the category is the folder name (or ``category=``). A root whose
  sub-folders each have that layout gives one category per sub-folder.

Missing masks
-------------
An anomalous image whose mask file is missing or undecodable is, by default
(``missing_mask="keep"``), **kept with ``mask=None`` and a warning**: its image
label is still valid, and image-only benchmarks (HeadCT, BrainMRI, Br35H)
legitimately have no masks. Pass ``missing_mask="skip"`` to drop such rows
instead (they are then listed in ``report.skipped``). Pixel-level metrics must
ignore anomalous rows whose mask is None (``has_mask`` is False in the batches
built by :mod:`modeling_vip2clip.data.loading`). A mask whose size differs from
its image is kept with a warning: the processor resizes masks to the model's
input size anyway.

Masks are binarised (``value > mask_threshold``, default 0 as in the reference
code) and stored as 0/255 single-channel PNG bytes; images are stored by path
and read lazily. :meth:`datasets.Dataset.save_to_disk` embeds the image bytes,
so a saved dataset no longer needs the source tree; ``Dataset.to_parquet``
would store the *paths* only (use ``save_to_disk`` or ``push_to_hub``, which
embed).

Licences: MVTec AD is distributed under CC BY-NC-SA 4.0 (non-commercial) and
VisA under CC BY 4.0; converted copies keep those terms, which are written into
``dataset.info.license`` when the categories identify the benchmark. Other
benchmarks: check their own licence (pass ``license=``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from datasets import Dataset, DatasetInfo
from PIL import Image, ImageFile, UnidentifiedImageError

from .schema import NORMAL_DEFECT, UNKNOWN_DEFECT, anomaly_features

__all__ = [
    "IMAGE_EXTENSIONS",
    "MVTEC_CATEGORIES",
    "VISA_CATEGORIES",
    "LICENSES",
    "ConversionOptions",
    "ConversionReport",
    "detect_layout",
    "convert",
    "convert_mvtec",
    "convert_visa",
    "convert_meta_json",
    "convert_folder",
]

logger = logging.getLogger(__name__)

#: File extensions treated as images (case-insensitive).
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
MVTEC_CATEGORIES = frozenset(
    "bottle cable capsule carpet grid hazelnut leather metal_nut pill screw tile toothbrush "
    "transistor wood zipper".split()
)
VISA_CATEGORIES = frozenset(
    "candle capsules cashew chewinggum fryum macaroni1 macaroni2 pcb1 pcb2 pcb3 pcb4 pipe_fryum".split()
)
#: Licence identifiers written into ``DatasetInfo.license`` for known benchmarks.
LICENSES = {
    "mvtec": "cc-by-nc-sa-4.0",
    "visa": "cc-by-4.0",
}
_LICENSE_NOTES = {
    "mvtec": "MVTec AD (MVTec Software GmbH) is licensed under CC BY-NC-SA 4.0: "
    "non-commercial use only, share alike, attribution required.",
    "visa": "VisA (Amazon) is licensed under CC BY 4.0: attribution required.",
}
_SPLITS = ("train", "test")
_NORMAL_DIRS = ("good", "ok", "normal")
_BAD_DIRS = ("bad", "anomalous", "anomaly", "defect", "defective")
_MASK_SUFFIXES = ("_mask", "_gt", "-mask", "")


# --------------------------------------------------------------------------- report


@dataclass
class ConversionReport:
    """What a conversion did: rows kept, files skipped (path, reason), warnings (path, message).

    Paths are relative to the dataset root where possible.
    """

    source: str = ""
    layout: str = ""
    n_ok: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append((path, reason))
        logger.warning("skipped %s: %s", path, reason)

    def warn(self, path: str, message: str) -> None:
        self.warnings.append((path, message))
        logger.warning("%s: %s", path, message)

    def summary(self) -> str:
        """A short multi-line human-readable summary."""
        lines = [
            f"{self.layout or 'dataset'} at {self.source}: {self.n_ok} rows converted, "
            f"{self.n_skipped} files skipped, {len(self.warnings)} warnings"
        ]
        lines += [f"  skipped {p}: {r}" for p, r in self.skipped[:20]]
        if self.n_skipped > 20:
            lines.append(f"  ... and {self.n_skipped - 20} more skipped")
        lines += [f"  warning {p}: {m}" for p, m in self.warnings[:20]]
        if len(self.warnings) > 20:
            lines.append(f"  ... and {len(self.warnings) - 20} more warnings")
        return "\n".join(lines)


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class ConversionOptions:
    """The options every converter takes as keywords (``convert_mvtec(root, progress=False)``, ...).

    ``missing_mask``: ``"keep"`` an anomalous image whose mask is missing or unusable (with ``mask=None``
    and a warning) or ``"skip"`` it. ``mask_threshold``: a mask pixel is defect where its grey value is
    above it. ``verify``: fully decode every image (skipping bad files) rather than only checking it
    exists. ``progress``: a tqdm bar. ``license``: the licence written into ``dataset.info`` (default:
    detected for MVTec AD / VisA).
    """

    missing_mask: str = "keep"
    mask_threshold: int = 0
    verify: bool = True
    progress: bool = True
    license: str | None = None

    def __post_init__(self) -> None:
        if self.missing_mask not in ("keep", "skip"):
            raise ValueError(f"missing_mask must be 'keep' or 'skip', got {self.missing_mask!r}")



@dataclass
class _Candidate:
    image: Path  # absolute path
    rel: str  # path relative to root (POSIX)
    label: int
    category: str
    defect_type: str
    split: str
    mask: Path | None = None  # absolute path of the expected mask
    mask_expected: bool = True  # False: the dataset provides no mask for this row


def _rel(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _splits(split: str) -> tuple[str, ...]:
    if split == "all":
        return _SPLITS
    if split in _SPLITS:
        return (split,)
    raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")


def _visible(entries: Iterable[Path]) -> list[Path]:
    return sorted(p for p in entries if not p.name.startswith("."))


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return f"not a decodable image (PIL cannot identify it): {exc}"
    if isinstance(exc, (OSError, SyntaxError)) and "truncated" in str(exc).lower():
        return f"truncated image data: {exc}"
    return f"corrupt image ({type(exc).__name__}): {exc}"


def _check_image(path: Path) -> tuple[int, int]:
    """Fully decode ``path``; return (width, height) or raise ``ValueError(reason)``."""
    if not path.is_file():
        raise ValueError("file not found")
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise ValueError(f"unsupported file extension {path.suffix!r}")
    if path.stat().st_size == 0:
        raise ValueError("empty file (0 bytes)")
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # never accept a truncated file silently
    try:
        with Image.open(path) as im:
            im.verify()  # structure / checksums
        with Image.open(path) as im:
            im.load()  # actually decode every pixel
            return im.size
    except Exception as exc:  # noqa: BLE001 - every decode failure is reported, none crashes
        raise ValueError(_describe_error(exc)) from exc
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _load_mask(path: Path, threshold: int) -> tuple[bytes, tuple[int, int], bool]:
    """Decode, binarise (> threshold) and re-encode a mask as 0/255 L-mode PNG bytes."""
    _check_image(path)
    with Image.open(path) as im:
        arr = np.asarray(im.convert("L"))
    binary = arr > threshold
    out = Image.fromarray(binary.astype(np.uint8) * 255, mode="L")
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue(), out.size, bool(binary.any())


def _license_for(categories: Iterable[str]) -> str | None:
    cats = set(categories)
    if cats and cats <= MVTEC_CATEGORIES:
        return "mvtec"
    if cats and cats <= VISA_CATEGORIES:
        return "visa"
    return None


def _build(candidates: Sequence[_Candidate], root: Path, report: ConversionReport, options: ConversionOptions) -> Dataset:
    from tqdm.auto import tqdm

    rows = []
    n_without_mask = 0
    for cand in tqdm(candidates, desc=f"Converting {report.layout}", unit="img", disable=not options.progress):
        size = None
        if options.verify:
            try:
                size = _check_image(cand.image)
            except ValueError as exc:
                report.skip(cand.rel, str(exc))
                continue
        elif not cand.image.is_file():
            report.skip(cand.rel, "file not found")
            continue
        mask_value = None
        if cand.label == 1:
            problem = None
            if cand.mask is None:
                if cand.mask_expected:
                    problem = "no mask file found for this anomalous image"
                else:
                    n_without_mask += 1
            elif not cand.mask.is_file():
                problem = f"mask file not found: {_rel(cand.mask, root)}"
            else:
                try:
                    mask_bytes, mask_size, nonempty = _load_mask(cand.mask, options.mask_threshold)
                except ValueError as exc:
                    problem = f"mask {_rel(cand.mask, root)} unusable: {exc}"
                else:
                    mask_value = {"bytes": mask_bytes, "path": _rel(cand.mask, root)}
                    if size is not None and mask_size != size:
                        report.warn(
                            cand.rel,
                            f"mask size {mask_size} differs from image size {size}; "
                            "kept (the processor resizes masks)",
                        )
                    if not nonempty:
                        report.warn(cand.rel, "mask of an anomalous image is empty")
            if problem is not None:
                if options.missing_mask == "skip":
                    report.skip(cand.rel, problem)
                    continue
                report.warn(cand.rel, problem + "; kept with mask=None")
        rows.append(
            {
                "image": {"path": str(cand.image), "bytes": None},
                "mask": mask_value,
                "label": cand.label,
                "category": cand.category,
                "defect_type": cand.defect_type,
                "split": cand.split,
                "image_path": cand.rel,
            }
        )
    if n_without_mask:
        report.warn(
            report.source,
            f"{n_without_mask} anomalous images have no mask in this dataset (image-level labels only)",
        )
    report.n_ok = len(rows)

    key = options.license or _license_for(r["category"] for r in rows)
    lic = LICENSES.get(key, key) if key else None
    note = _LICENSE_NOTES.get(key, "Check the licence of the source dataset before redistributing.")
    features = anomaly_features()
    info = DatasetInfo(
        features=features,
        description=(
            f"Anomaly-detection images converted by vip2clip from the {report.layout!r} layout "
            f"at {root.name!r} ({report.n_ok} rows). {note}"
        ),
        license=lic or "",
    )
    ds = Dataset.from_list(rows, features=features, info=info)
    logger.info(report.summary())
    return ds


def _new_report(root: Path, layout: str) -> ConversionReport:
    return ConversionReport(source=str(root), layout=layout)


def _index_masks(folder: Path) -> dict[str, Path]:
    """Map image stem -> mask file in ``folder`` (``<stem>_mask.png`` preferred to ``<stem>.png``)."""
    index: dict[str, tuple[int, Path]] = {}
    if not folder.is_dir():
        return {}
    for p in _visible(folder.iterdir()):
        if not p.is_file():
            continue
        for rank, suffix in enumerate(_MASK_SUFFIXES):
            if suffix and not p.stem.endswith(suffix):
                continue
            key = p.stem[: len(p.stem) - len(suffix)] if suffix else p.stem
            if key not in index or rank < index[key][0]:
                index[key] = (rank, p)
            break
    return {k: v for k, (_, v) in index.items()}


# --------------------------------------------------------------------------- layouts


def _mvtec_category_dirs(root: Path) -> list[Path]:
    if any((root / s).is_dir() for s in _SPLITS) and not any(
        (d / s).is_dir() for d in root.iterdir() if d.is_dir() for s in _SPLITS
    ):
        return [root]  # a single category folder
    return [d for d in _visible(root.iterdir()) if d.is_dir() and any((d / s).is_dir() for s in _SPLITS)]


def detect_layout(root: str | os.PathLike) -> str | None:
    """Guess the layout of a raw dataset folder: ``"meta_json"``, ``"visa"``,
    ``"mvtec"``, ``"folder"`` or None (checked in that order)."""
    root = Path(root)
    if not root.is_dir():
        return None
    if (root / "meta.json").is_file():
        return "meta_json"
    if (root / "split_csv" / "1cls.csv").is_file():
        return "visa"
    if _mvtec_category_dirs(root):
        return "mvtec"
    if _folder_category_dirs(root):
        return "folder"
    return None


def convert_mvtec(
    root: str | os.PathLike,
    split: str = "test",
    categories: Sequence[str] | None = None,
    *,
    normal_dirs: Sequence[str] = ("good", "ok"),
    **options: Any,
) -> tuple[Dataset, ConversionReport]:
    """Convert an MVTec-AD-style tree (MVTec AD, MPDD, BTAD, ...).

    Layout: ``<root>/<category>/{train,test}/<defect>/<name>`` and
    ``<root>/<category>/ground_truth/<defect>/<stem>_mask.<ext>`` (also
    ``<stem>.<ext>``), matched by stem. ``root`` may also be one category folder.
    Folders named in ``normal_dirs`` hold normal images (``defect_type`` "good").
    MVTec AD is licensed CC BY-NC-SA 4.0 (non-commercial). ``options``: see :class:`ConversionOptions`.
    """
    root, opts = Path(root), ConversionOptions(**options)
    report = _new_report(root, "mvtec")
    wanted = set(categories) if categories is not None else None
    candidates: list[_Candidate] = []
    for cat_dir in _mvtec_category_dirs(root):
        category = cat_dir.name
        if wanted is not None and category not in wanted:
            continue
        gt_root = cat_dir / "ground_truth"
        has_gt = gt_root.is_dir()
        n_no_gt = 0
        for sp in _splits(split):
            split_dir = cat_dir / sp
            if not split_dir.is_dir():
                continue
            for defect_dir in _visible(split_dir.iterdir()):
                if not defect_dir.is_dir():
                    report.warn(_rel(defect_dir, root), "unexpected file outside a defect folder; ignored")
                    continue
                is_normal = defect_dir.name in normal_dirs
                masks = {} if is_normal else _index_masks(gt_root / defect_dir.name)
                used: set[str] = set()
                for img in _visible(defect_dir.iterdir()):
                    if img.is_dir():
                        continue
                    mask = None if is_normal else masks.get(img.stem)
                    if mask is not None:
                        used.add(img.stem)
                    if not is_normal and not has_gt:
                        n_no_gt += 1
                    candidates.append(
                        _Candidate(
                            image=img,
                            rel=_rel(img, root),
                            label=0 if is_normal else 1,
                            category=category,
                            defect_type=NORMAL_DEFECT if is_normal else defect_dir.name,
                            split=sp,
                            mask=mask,
                            mask_expected=has_gt,
                        )
                    )
                for stem in sorted(set(masks) - used):
                    if sp == "test":
                        report.warn(_rel(masks[stem], root), "mask has no matching image; ignored")
        if n_no_gt:
            report.warn(_rel(cat_dir, root), f"no ground_truth folder: {n_no_gt} anomalous images have no mask")
    if wanted is not None:
        found = {c.category for c in candidates}
        for missing in sorted(wanted - found):
            report.warn(str(root), f"category {missing!r} not found")
    return _build(candidates, root, report, opts), report


def _warn_if_normal_has_mask(report: ConversionReport, root: Path, image_rel: str, mask_rel: str) -> None:
    """An index that gives a normal image a mask file: say so; the mask is ignored (the reference scores normal
    images against an empty mask)."""
    if mask_rel and (root / mask_rel).is_file():
        report.warn(image_rel, f"normal image has a mask ({mask_rel}); ignored, normal images are "
                    "scored against an empty mask (fix the label if it is anomalous)")


def convert_visa(
    root: str | os.PathLike,
    split: str = "test",
    categories: Sequence[str] | None = None,
    *,
    csv_file: str = "split_csv/1cls.csv",
    **options: Any,
) -> tuple[Dataset, ConversionReport]:
    """Convert VisA through its split CSV (``object,split,label,image,mask``).

    Paths in the CSV are relative to ``root``; ``label`` is ``normal`` or
    ``anomaly``. VisA gives no defect names, so anomalous rows get
    ``defect_type="anomaly"``. VisA is licensed CC BY 4.0. ``options``: see :class:`ConversionOptions`.
    """
    root, opts = Path(root), ConversionOptions(**options)
    report = _new_report(root, "visa")
    csv_path = root / csv_file
    wanted = set(categories) if categories is not None else None
    splits = _splits(split)
    candidates: list[_Candidate] = []
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        need = {"object", "split", "label", "image", "mask"}
        if reader.fieldnames is None or not need <= {c.strip() for c in reader.fieldnames}:
            raise ValueError(f"{csv_path}: expected columns {sorted(need)}, got {reader.fieldnames}")
        for lineno, raw in enumerate(reader, start=2):
            rec = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            if rec["split"] not in splits:
                continue
            if wanted is not None and rec["object"] not in wanted:
                continue
            where = f"{csv_file}:{lineno}"
            if rec["label"] not in ("normal", "anomaly"):
                report.skip(rec["image"] or where, f"{where}: unknown label {rec['label']!r}")
                continue
            if not rec["image"]:
                report.skip(where, "empty image path")
                continue
            anomalous = rec["label"] == "anomaly"
            if not anomalous:
                _warn_if_normal_has_mask(report, root, rec["image"], rec["mask"])
            candidates.append(
                _Candidate(
                    image=root / rec["image"],
                    rel=Path(rec["image"]).as_posix(),
                    label=int(anomalous),
                    category=rec["object"],
                    defect_type=UNKNOWN_DEFECT if anomalous else NORMAL_DEFECT,
                    split=rec["split"],
                    mask=(root / rec["mask"]) if anomalous and rec["mask"] else None,
                )
            )
    return _build(candidates, root, report, opts), report


def convert_meta_json(
    root: str | os.PathLike,
    split: str = "test",
    categories: Sequence[str] | None = None,
    *,
    meta_file: str = "meta.json",
    **options: Any,
) -> tuple[Dataset, ConversionReport]:
    """Convert a dataset indexed by the authors' ``meta.json``.

    Each entry has ``img_path``, ``mask_path`` ("" when there is none),
    ``cls_name``, ``specie_name`` and ``anomaly`` (0/1). Paths are relative to
    ``root`` (absolute paths are used as they are). An anomalous entry with
    ``mask_path`` "" (or pointing at a folder, as the reference loader
    tolerates) has no mask: such image-level datasets give a single warning.
    ``specie_name`` becomes ``defect_type`` for anomalous rows (``"anomaly"``
    when it is empty or is a file name). ``options``: see :class:`ConversionOptions`.
    """
    root, opts = Path(root), ConversionOptions(**options)
    report = _new_report(root, "meta_json")
    with open(root / meta_file, encoding="utf-8") as f:
        meta = json.load(f)
    wanted = set(categories) if categories is not None else None
    candidates: list[_Candidate] = []
    for sp in _splits(split):
        for cls_name, entries in sorted((meta.get(sp) or {}).items()):
            if wanted is not None and cls_name not in wanted:
                continue
            for i, entry in enumerate(entries):
                where = f"{meta_file}[{sp}][{cls_name}][{i}]"
                try:
                    img_path = str(entry["img_path"])
                    anomalous = int(entry.get("anomaly", 0)) == 1
                except (KeyError, TypeError, ValueError) as exc:
                    report.skip(where, f"malformed entry: {exc!r}")
                    continue
                mask_rel = str(entry.get("mask_path") or "")
                specie = str(entry.get("specie_name") or "")
                if not anomalous:
                    defect = NORMAL_DEFECT
                elif not specie or Path(specie).suffix.lower() in IMAGE_EXTENSIONS:
                    defect = UNKNOWN_DEFECT
                else:
                    defect = specie
                if not anomalous:
                    _warn_if_normal_has_mask(report, root, img_path, mask_rel)
                mask = (root / mask_rel) if anomalous and mask_rel else None
                expected = True
                if mask is None or mask.is_dir():
                    mask, expected = None, False
                candidates.append(
                    _Candidate(
                        image=root / img_path,
                        rel=Path(img_path).as_posix(),
                        label=int(anomalous),
                        category=str(entry.get("cls_name") or cls_name),
                        defect_type=defect,
                        split=sp,
                        mask=mask,
                        mask_expected=expected,
                    )
                )
    return _build(candidates, root, report, opts), report


def _folder_parts(d: Path) -> tuple[Path | None, list[Path]]:
    good = next((d / n for n in _NORMAL_DIRS if (d / n).is_dir()), None)
    bad = [d / n for n in _BAD_DIRS if (d / n).is_dir()]
    return good, bad


def _folder_category_dirs(root: Path) -> list[Path]:
    good, bad = _folder_parts(root)
    if good is not None or bad:
        return [root]
    out = []
    for d in _visible(root.iterdir()):
        if d.is_dir():
            good, bad = _folder_parts(d)
            if good is not None or bad:
                out.append(d)
    return out


def convert_folder(
    root: str | os.PathLike,
    split: str = "test",
    category: str | None = None,
    categories: Sequence[str] | None = None,
    **options: Any,
) -> tuple[Dataset, ConversionReport]:
    """Convert a plain user folder: ``good/``, ``bad/`` (or ``anomalous/``,
    ``anomaly/``, ``defect/``), optional ``masks/``.

    Images directly in ``bad/`` get ``defect_type="anomaly"``; images in
    ``bad/<name>/`` get ``defect_type=<name>``. The mask of ``bad/[<name>/]x.png``
    is looked up as ``masks/<name>/x[_mask].*`` then ``masks/x[_mask].*``.
    Without a ``masks/`` folder the dataset is image-level only (one warning).
    The layout has no train/test split: every row is tagged with ``split``
    (``"all"`` tags ``"test"``). ``category`` overrides the folder name (single
    folder only); a root whose sub-folders each have this layout gives one
    category per sub-folder (filter with ``categories``). ``options``: see :class:`ConversionOptions`.
    """
    root, opts = Path(root), ConversionOptions(**options)
    report = _new_report(root, "folder")
    tag = "test" if split == "all" else _splits(split)[0]
    wanted = set(categories) if categories is not None else None
    candidates: list[_Candidate] = []
    cat_dirs = _folder_category_dirs(root)
    if category is not None and len(cat_dirs) > 1:
        raise ValueError("category= applies to a single good/bad folder; use categories= to filter")
    for cat_dir in cat_dirs:
        name = category or cat_dir.name
        if wanted is not None and name not in wanted:
            continue
        good, bads = _folder_parts(cat_dir)
        mask_dir = cat_dir / "masks"
        has_masks = mask_dir.is_dir()
        root_masks = _index_masks(mask_dir)
        groups: list[tuple[Path, int, str]] = []
        if good is not None:
            groups += [(p, 0, NORMAL_DEFECT) for p in _visible(good.rglob("*")) if p.is_file()]
        for bad in bads:
            for p in _visible(bad.iterdir()):
                if p.is_file():
                    groups.append((p, 1, UNKNOWN_DEFECT))
                elif p.is_dir():
                    groups += [(q, 1, p.name) for q in _visible(p.rglob("*")) if q.is_file()]
        n_no_masks = 0
        for path, label, defect in groups:
            mask = None
            if label == 1:
                if defect != UNKNOWN_DEFECT:
                    mask = _index_masks(mask_dir / defect).get(path.stem)
                mask = mask or root_masks.get(path.stem)
                n_no_masks += not has_masks
            candidates.append(
                _Candidate(
                    image=path, rel=_rel(path, root), label=label, category=name,
                    defect_type=defect, split=tag, mask=mask, mask_expected=has_masks,
                )
            )
        if n_no_masks:
            report.warn(_rel(cat_dir, root) if cat_dir != root else name, "no masks/ folder: image-level labels only")
    return _build(candidates, root, report, opts), report


_CONVERTERS = {
    "mvtec": convert_mvtec,
    "visa": convert_visa,
    "meta_json": convert_meta_json,
    "folder": convert_folder,
}


def convert(
    root: str | os.PathLike,
    split: str = "test",
    categories: Sequence[str] | None = None,
    *,
    layout: str | None = None,
    **kwargs,
) -> tuple[Dataset, ConversionReport]:
    """Convert ``root`` with the converter of ``layout`` (auto-detected when None)."""
    layout = layout or detect_layout(root)
    if layout not in _CONVERTERS:
        raise ValueError(
            f"{root}: unrecognised dataset layout (expected meta.json, split_csv/1cls.csv, "
            "an MVTec-style <category>/{train,test}/<defect>/ tree, or good/ + bad/ folders)"
        )
    return _CONVERTERS[layout](root, split=split, categories=categories, **kwargs)
