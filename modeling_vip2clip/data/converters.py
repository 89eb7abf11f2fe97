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
* ``folder`` (:func:`convert_folder`): a user's own folders (anomalib's ``Folder``
  convention): normal images in ``<root>/good/`` (or ``ok``, ``normal``, ``nominal``,
  any case, or the folders named with ``normal_dirs=``), anomalous ones in ``bad/``
  (``anomalous``, ``anomaly``, ``defect``, ``defective``, ``NG``; sub-folders become
  defect types) or in folders named with ``anomalous_dirs=`` (``scratch/`` + ``dent/``:
  each name is a defect type), optional masks ``<root>/masks/[<folder>/]<stem>[_mask].*``
  (``mask_dir=``); the category is the folder name (or ``category=``). A root whose
  sub-folders each have that layout gives one category per sub-folder.

Missing masks
-------------
An anomalous image whose mask file is missing or undecodable is, by default
(``missing_mask="keep"``), **kept with ``mask=None`` and a warning**: its image
label is still valid, and image-only benchmarks (HeadCT, BrainMRI, Br35H)
legitimately have no masks. Pass ``missing_mask="skip"`` to drop such rows
instead (they are then listed in ``report.skipped``). Pixel-level metrics must
ignore anomalous rows whose mask is None (``has_mask`` is False in the batches
built by :mod:`modeling_vip2clip.data.transforms`). A mask whose size differs from
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
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from datasets import Dataset, DatasetInfo
from PIL import Image, UnidentifiedImageError

from .images import IMAGE_EXTENSIONS, ImageReadError, read_image
from .schema import NORMAL_DEFECT, UNKNOWN_DEFECT, DatasetError, anomaly_features

__all__ = [
    "NORMAL_FOLDER_NAMES",
    "ANOMALOUS_FOLDER_NAMES",
    "MASK_FOLDER_NAMES",
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
    "suggest_folder_command",
    "unrecognised_layout_message",
]

logger = logging.getLogger(__name__)

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
#: Folder names (case-insensitive) that the ``folder`` layout reads as normal / anomalous images / masks.
NORMAL_FOLDER_NAMES = ("good", "ok", "normal", "nominal")
ANOMALOUS_FOLDER_NAMES = ("bad", "anomalous", "anomaly", "defect", "defective", "ng")
MASK_FOLDER_NAMES = ("masks", "mask")
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
    # Sub-folders with images that no folder name claimed (the folder layout), each with the `vip2clip convert`
    # command that includes them: (folder names, command).
    unconverted: list[tuple[list[str], str]] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append((path, reason))
        logger.warning("skipped %s: %s", path, reason)

    def warn(self, path: str, message: str) -> None:
        self.warnings.append((path, message))
        logger.warning("%s: %s", path, message)

    def headline(self) -> str:
        """The counts, one line (the skips and warnings were logged one by one as they happened)."""
        return (f"{self.layout or 'dataset'} at {self.source}: {self.n_ok} rows converted, "
                f"{self.n_skipped} files skipped, {len(self.warnings)} warnings")

    def summary(self) -> str:
        """A short multi-line human-readable summary."""
        lines = [self.headline()]
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
    if isinstance(exc, ImageReadError):
        return str(exc)
    return f"corrupt image ({type(exc).__name__}): {exc}"


def _check_image(path: Path) -> tuple[int, int]:
    """Fully decode ``path``; return (width, height) or raise ``ValueError(reason)``."""
    if not path.is_file():
        raise ValueError("file not found")
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise ValueError(f"unsupported file extension {path.suffix!r}")
    if path.stat().st_size == 0:
        raise ValueError("empty file (0 bytes)")
    try:
        with Image.open(path) as im:
            im.verify()  # structure / checksums, which decoding alone does not check
        return read_image(path, what=path.name).size  # the package's one reader: every pixel decoded, truncation refused
    except Exception as exc:  # noqa: BLE001 - every decode failure is reported, none crashes
        raise ValueError(_describe_error(exc)) from exc


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
    columns = {name: [r[name] for r in rows] for name in features}  # from_list cannot build an empty table
    ds = Dataset.from_dict(columns, features=features, info=info)
    logger.info(report.headline())  # the skips and warnings are already in the log, once each
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


def _is_named(d: Path, names: Iterable[str]) -> bool:
    return d.name.lower() in {n.lower() for n in names}


def _looks_like(d: Path, names: Iterable[str]) -> bool:
    """A looser match, for guesses only: a word of the name is one of ``names`` (``OK_parts``, ``normal-2024``)."""
    return bool(set(re.split(r"[^a-z0-9]+", d.name.lower())) & {n.lower() for n in names})


@dataclass(frozen=True)
class _FolderSpec:
    """Which sub-folders of a category folder hold what: names given by the user are matched exactly (they may
    be relative paths such as ``test/broken``); the default names case-insensitively."""

    normal_dirs: tuple[str, ...] | None = None  # None: NORMAL_FOLDER_NAMES
    anomalous_dirs: tuple[str, ...] | None = None  # None: ANOMALOUS_FOLDER_NAMES
    mask_dir: str | None = None  # None: MASK_FOLDER_NAMES

    @property
    def explicit(self) -> bool:
        return (self.normal_dirs, self.anomalous_dirs, self.mask_dir) != (None, None, None)

    def _find(self, d: Path, names: tuple[str, ...] | None, defaults: tuple[str, ...]) -> list[Path]:
        if names is not None:
            return [d / n for n in names if (d / n).is_dir()]
        return [p for p in _visible(d.iterdir()) if p.is_dir() and _is_named(p, defaults)]

    def parts(self, d: Path) -> tuple[list[Path], list[Path], Path | None]:
        """(normal folders, anomalous folders, mask folder or None) of the category folder ``d``."""
        normal = self._find(d, self.normal_dirs, NORMAL_FOLDER_NAMES)
        anomalous = self._find(d, self.anomalous_dirs, ANOMALOUS_FOLDER_NAMES)
        masks = self._find(d, None if self.mask_dir is None else (self.mask_dir,), MASK_FOLDER_NAMES)
        return normal, anomalous, (masks[0] if masks else None)

    def category_dirs(self, root: Path) -> list[Path]:
        """``[root]`` when ``root`` itself has the layout, else its sub-folders that have it."""
        def has(d: Path) -> bool:
            normal, anomalous, _ = self.parts(d)
            return bool(normal or anomalous)

        if has(root):
            return [root]
        return [d for d in _visible(root.iterdir()) if d.is_dir() and has(d)]


def _folder_category_dirs(root: Path) -> list[Path]:
    return _FolderSpec().category_dirs(root)


def _images_below(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _folder_flags(normal: Sequence[str], anomalous: Sequence[str], masks: Sequence[str]) -> str:
    parts = []
    if normal:
        parts.append("--normal-dir " + " ".join(shlex.quote(n) for n in normal))
    if anomalous:
        parts.append("--anomalous-dir " + " ".join(shlex.quote(n) for n in anomalous))
    if masks:
        parts.append("--mask-dir " + shlex.quote(masks[0]))
    return " ".join(parts)


def suggest_folder_command(root: str | os.PathLike, out: str = "OUT") -> str | None:
    """The ``vip2clip convert --layout folder`` command that would convert the sub-folders of ``root`` (a guess:
    folders with a normal-looking name are normal, ``masks``-like ones hold masks, the others are defect types),
    or None when ``root`` has no sub-folder with images."""
    root = Path(root)
    subdirs = [d for d in _visible(root.iterdir()) if d.is_dir()] if root.is_dir() else []
    masks = [d.name for d in subdirs if _looks_like(d, MASK_FOLDER_NAMES + ("gt", "truth"))]
    images = [d for d in subdirs if d.name not in masks and _images_below(d)]
    if not images:
        return None
    normal = [d.name for d in images if _looks_like(d, NORMAL_FOLDER_NAMES)]
    anomalous = [d.name for d in images if d.name not in normal]
    return (f"vip2clip convert --layout folder --root {shlex.quote(str(root))} "
            f"{_folder_flags(normal, anomalous, masks[:1])} --out {shlex.quote(str(out))}")


def describe_subfolders(root: str | os.PathLike) -> str:
    """``"OK/ (12 images), NG/ (3 images), masks/ (3 images)"`` for the sub-folders of ``root``."""
    subdirs = [d for d in _visible(Path(root).iterdir()) if d.is_dir()]
    if not subdirs:
        return "no sub-folders"
    counts = [(d.name, _images_below(d)) for d in subdirs]
    return ", ".join(f"{name}/ ({n} image{'' if n == 1 else 's'})" for name, n in counts)


def _folder_groups(anomalous: Path) -> list[tuple[Path, str]]:
    """(image, defect_type) under one anomalous folder. A folder with a generic name (``bad``, ``NG``, ...)
    says nothing about the defect: its own files get ``"anomaly"`` and each sub-folder names a defect type;
    any other folder (``scratch``) is the defect type of every image below it."""
    if not _is_named(anomalous, ANOMALOUS_FOLDER_NAMES):
        return [(q, anomalous.name) for q in _visible(anomalous.rglob("*")) if q.is_file()]
    out: list[tuple[Path, str]] = []
    for p in _visible(anomalous.iterdir()):
        if p.is_file():
            out.append((p, UNKNOWN_DEFECT))
        elif p.is_dir():
            out += [(q, p.name) for q in _visible(p.rglob("*")) if q.is_file()]
    return out


class _MaskFinder:
    """Finds the mask of an anomalous image by file stem (never by position): in ``<masks>/<the image's
    folder, relative to the category folder>/``, then ``<masks>/<defect_type>/``, then ``<masks>/``."""

    def __init__(self, mask_dir: Path | None, cat_dir: Path) -> None:
        self.mask_dir, self.cat_dir = mask_dir, cat_dir
        self._indexes: dict[Path, dict[str, Path]] = {}

    def _index(self, folder: Path) -> dict[str, Path]:
        if folder not in self._indexes:
            self._indexes[folder] = _index_masks(folder)
        return self._indexes[folder]

    def find(self, image: Path, defect: str) -> Path | None:
        if self.mask_dir is None:
            return None
        folders = [self.mask_dir / image.parent.relative_to(self.cat_dir)]
        if defect != UNKNOWN_DEFECT:
            folders.append(self.mask_dir / defect)
        folders.append(self.mask_dir)
        for folder in folders:
            mask = self._index(folder).get(image.stem)
            if mask is not None:
                return mask
        return None


def _check_named_folders(root: Path, cat_dirs: list[Path], spec: _FolderSpec) -> None:
    """Every folder the user named must exist in some category folder."""
    named = [("--normal-dir", n) for n in spec.normal_dirs or ()] + [
        ("--anomalous-dir", n) for n in spec.anomalous_dirs or ()] + (
        [("--mask-dir", spec.mask_dir)] if spec.mask_dir is not None else [])
    for flag, name in named:
        if not any((d / name).is_dir() for d in cat_dirs or [root]):
            where = root if not cat_dirs or cat_dirs == [root] else f"any category folder of {root}"
            raise DatasetError(
                f"{flag} {name}: no folder {name!r} in {where} (found: {describe_subfolders(cat_dirs[0] if cat_dirs else root)}); "
                f"pass the names of {root}'s own sub-folders"
            )


def convert_folder(
    root: str | os.PathLike,
    split: str = "test",
    category: str | None = None,
    categories: Sequence[str] | None = None,
    *,
    normal_dirs: Sequence[str] | None = None,
    anomalous_dirs: Sequence[str] | None = None,
    mask_dir: str | None = None,
    **options: Any,
) -> tuple[Dataset, ConversionReport]:
    """Convert a user's own folders (the convention of anomalib's ``Folder``): normal images in
    ``normal_dirs``, anomalous ones in ``anomalous_dirs``, optional masks in ``mask_dir``.

    Names given are sub-folders (or relative paths) of the category folder, matched exactly. Left as None
    they default to the folders whose names are, case-insensitively, in :data:`NORMAL_FOLDER_NAMES`
    (``good``, ``ok``, ``normal``, ``nominal``), :data:`ANOMALOUS_FOLDER_NAMES` (``bad``, ``anomalous``,
    ``anomaly``, ``defect``, ``defective``, ``ng``) and :data:`MASK_FOLDER_NAMES` (``masks``, ``mask``).

    ``defect_type``: an anomalous folder's own name (``scratch/`` → ``"scratch"``); for a generic name
    (``bad/``, ``NG/``) its sub-folders name the defect types and its own files get ``"anomaly"``. The
    mask of an anomalous image is found by file stem (``x.png`` → ``x.png``, ``x_mask.png``, ``x_gt.png``)
    in ``<mask_dir>/<image folder>/``, then ``<mask_dir>/<defect_type>/``, then ``<mask_dir>/``; a mask
    that two images would share (same stem in two folders, flat ``<mask_dir>/``) is given to neither, with a
    warning. Without a mask folder the dataset is image-level only (one warning). Sub-folders of ``root``
    that are none of these are listed in a warning, with the command that would include them.

    The layout has no train/test split: every row is tagged with ``split`` (``"all"`` tags ``"test"``).
    ``category`` overrides the folder name (single folder only); a root whose sub-folders each have this
    layout gives one category per sub-folder (filter with ``categories``). ``options``: see
    :class:`ConversionOptions`. A named folder that does not exist raises :class:`DatasetError`.
    """
    root, opts = Path(root), ConversionOptions(**options)
    spec = _FolderSpec(
        normal_dirs=None if normal_dirs is None else tuple(normal_dirs),
        anomalous_dirs=None if anomalous_dirs is None else tuple(anomalous_dirs),
        mask_dir=mask_dir,
    )
    report = _new_report(root, "folder")
    tag = "test" if split == "all" else _splits(split)[0]
    wanted = set(categories) if categories is not None else None
    candidates: list[_Candidate] = []
    cat_dirs = spec.category_dirs(root)
    if spec.explicit:
        _check_named_folders(root, cat_dirs, spec)
    elif not cat_dirs:
        raise DatasetError(unrecognised_layout_message(root))
    if category is not None and len(cat_dirs) > 1:
        raise ValueError("category= applies to a single folder of normal/anomalous images; use categories= to filter")
    for cat_dir in cat_dirs:
        name = category or cat_dir.name
        if wanted is not None and name not in wanted:
            continue
        where = _rel(cat_dir, root) if cat_dir != root else name
        normal, anomalous, masks = spec.parts(cat_dir)
        _warn_unused_folders(report, root, cat_dir, normal, anomalous, masks)
        groups = [(p, 0, NORMAL_DEFECT) for good in normal for p in _visible(good.rglob("*")) if p.is_file()]
        groups += [(p, 1, defect) for bad in anomalous for p, defect in _folder_groups(bad)]
        finder = _MaskFinder(masks, cat_dir)
        rows = [
            _Candidate(
                image=path, rel=_rel(path, root), label=label, category=name, defect_type=defect, split=tag,
                mask=finder.find(path, defect) if label == 1 else None, mask_expected=masks is not None,
            )
            for path, label, defect in groups
        ]
        claimed: dict[Path, list[_Candidate]] = {}
        for cand in rows:
            if cand.mask is not None:
                claimed.setdefault(cand.mask, []).append(cand)
        for mask, owners in claimed.items():
            if len(owners) > 1:
                report.warn(_rel(mask, root), f"mask matches {len(owners)} images by stem "
                            f"({', '.join(c.rel for c in owners[:4])}); given to none: put each defect's masks "
                            f"in {_rel(masks, root)}/<folder>/")
                for cand in owners:
                    cand.mask = None
        if masks is None and any(c.label == 1 for c in rows):
            report.warn(where, "no masks/ folder: image-level labels only")
        candidates += rows
    return _build(candidates, root, report, opts), report


def _warn_unused_folders(report: ConversionReport, root: Path, cat_dir: Path, normal: list[Path],
                         anomalous: list[Path], masks: Path | None) -> None:
    """Sub-folders with images that the conversion leaves out: say so, with the command that includes them."""
    used = {p.relative_to(cat_dir).parts[0] for p in [*normal, *anomalous, *([masks] if masks else [])]
            if p.is_relative_to(cat_dir) and p != cat_dir}
    unused = [d.name for d in _visible(cat_dir.iterdir()) if d.is_dir() and d.name not in used and _images_below(d)]
    if unused:
        flags = _folder_flags([p.name for p in normal], [p.name for p in anomalous] + unused,
                              [masks.name] if masks else [])
        # A whole command, not flags: every command that reads a raw folder (evaluate, train, ...) converts it on
        # the fly without these flags; `vip2clip convert` is the one that has them.
        command = f"vip2clip convert --layout folder --root {shlex.quote(str(root))} {flags} --out OUT"
        report.unconverted.append((unused, command))
        report.warn(_rel(cat_dir, root) if cat_dir != root else cat_dir.name,
                    f"sub-folders {', '.join(u + '/' for u in unused)} are neither normal nor anomalous by name and "
                    f"were not converted; to include them as defect types run: {command}")


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
    """Convert ``root`` with the converter of ``layout`` (auto-detected when None).

    A ``root`` that does not exist, is a file, or (auto-detected) has no layout known here raises
    :class:`DatasetError`; the last lists the sub-folders found and the ``vip2clip convert --layout folder``
    command that would convert them.
    """
    path = Path(root).expanduser()
    if not path.exists():
        raise DatasetError(f"{root} does not exist; pass the folder that holds the raw benchmark")
    if not path.is_dir():
        raise DatasetError(f"{root} is a file, not a folder; pass the folder that holds the raw benchmark")
    layout = layout or detect_layout(path)
    if layout not in _CONVERTERS:
        raise DatasetError(unrecognised_layout_message(path))
    return _CONVERTERS[layout](path, split=split, categories=categories, **kwargs)


def unrecognised_layout_message(root: str | os.PathLike, out: str = "OUT") -> str:
    """``<root>: unrecognised dataset layout (found ...); <the fix>``, the fix being the suggested
    ``vip2clip convert --layout folder`` command when the sub-folders hold images."""
    command = suggest_folder_command(root, out)
    guessed_normal = command is not None and "--normal-dir" in command
    fix = (f"if these are your own normal/anomalous folders, run: {command}" if guessed_normal else
           f"if these are your own folders, run (with the folders of normal images moved to --normal-dir): "
           f"{command}" if command else
           "expected meta.json, split_csv/1cls.csv, an MVTec-style <category>/{train,test}/<defect>/ tree, "
           "or folders of normal and anomalous images (vip2clip convert --layout folder --normal-dir ... "
           "--anomalous-dir ...)")
    return f"{root}: unrecognised dataset layout (found {describe_subfolders(root)}); {fix}"
