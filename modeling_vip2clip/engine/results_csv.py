r"""The CSV files of a prediction run (`predictions.csv`, `skipped.csv` and their per-process parts): append-only,
fsynced per batch, a torn last line cut off on resume, parts merged without duplicates.

File names of any bytes: the CSVs are always valid UTF-8. A name whose bytes are not UTF-8 (Python holds them as
surrogate escapes) is written with each such byte as `\xHH` (Python's `backslashreplace`), e.g. the Latin-1 name
`caf\xe9.png`; :func:`path_from_csv` turns the text back into the name on disk (`\x80`–`\xff` are never
produced by a UTF-8 name, so the rule is unambiguous unless a name spells such an escape literally)."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import BadFileError, UsageError, explain, sentence, writing

__all__ = ["PREDICTIONS_CSV", "SKIPPED_CSV", "CsvLog", "read_csv_rows", "done_ids", "merge_parts", "part_files",
           "csv_text", "path_from_csv"]

PREDICTIONS_CSV = "predictions.csv"
SKIPPED_CSV = "skipped.csv"
_PART = re.compile(r"^(predictions|skipped)\.part-(\d+)\.csv$")


_ESCAPED_BYTE = re.compile(r"\\x([89a-f][0-9a-f])")


def csv_text(value: Any) -> Any:
    r"""A field as written to the CSV: strings as valid UTF-8, undecodable file-name bytes as `\xHH`."""
    if not isinstance(value, str):
        return value
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # lone surrogates that are not escaped bytes
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def path_from_csv(text: str) -> str:
    r"""The file name a CSV field stands for (:func:`csv_text` undone): `\xHH` escapes back to their bytes."""
    if "\\x" not in text:
        return text
    raw = _ESCAPED_BYTE.sub(lambda m: chr(0xDC00 + int(m.group(1), 16)), text)
    return raw.encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")


def _cut_torn_tail(path: Path) -> None:
    """Truncate a file after its last newline: a row cut short by a killed write is dropped (and redone)."""
    if not path.is_file():
        return
    with open(path, "r+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            start = max(0, end - 65536)
            handle.seek(start)
            chunk = handle.read(end - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        else:
            keep = 0
        if keep != size:
            handle.truncate(keep)


_UNREADABLE = "cannot read the results of an earlier run"


def _bad_row(path: Path, number: int, why: str) -> None:
    raise BadFileError(sentence(_UNREADABLE, path, f"row {number} has {why}", "fix or delete that row, or run "
                                "without --resume into another folder"))


def read_csv_rows(path: str | os.PathLike) -> tuple[list[str] | None, list[list[str]]]:
    """`(header, rows)` of a CSV written here, ignoring a torn last line; `(None, [])` when absent or empty."""
    path = Path(path)
    if not path.is_file():
        return None, []

    def complete_lines(handle) -> Iterable[str]:
        for line in handle:
            if line.endswith("\n"):
                yield line

    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(complete_lines(handle)))
    except (UnicodeDecodeError, csv.Error) as error:  # a file edited or damaged by hand: name it
        raise explain(error, path, _UNREADABLE) from None
    for number, row in enumerate(rows[1:], start=2):
        if row and len(row) != len(rows[0]):
            _bad_row(path, number, f"{len(row)} fields where the header has {len(rows[0])}")
    return (rows[0], rows[1:]) if rows else (None, [])


class CsvLog:
    """An append-only CSV: each `write` is flushed and fsynced; a torn last line is cut off on opening."""

    def __init__(self, path: Path, header: list[str]):
        _cut_torn_tail(path)
        existing, _ = read_csv_rows(path)
        if existing is not None and existing != header:
            raise UsageError(f"--resume: {path} has the columns {','.join(existing)} but this run writes "
                             f"{','.join(header)}; resume with the same --save-maps / --save-masks, or use another "
                             "--output-dir.")
        self.path = path
        self.handle = open(path, "a", newline="", encoding="utf-8")
        self.writer = csv.writer(self.handle)
        if existing is None:
            self.handle.truncate(0)
            self.write([header])

    def write(self, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        with writing(self.path):
            self.writer.writerows([[csv_text(field) for field in row] for row in rows])
            self.handle.flush()
            os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


def part_files(output_dir: Path, kind: str) -> list[Path]:
    found = [(int(m.group(2)), p) for p in output_dir.glob(f"{kind}.part-*.csv") if (m := _PART.match(p.name))]
    return [p for _, p in sorted(found)]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def done_ids(output_dir: Path, header: list[str]) -> set[str]:
    done: set[str] = set()
    for path in [output_dir / PREDICTIONS_CSV, *part_files(output_dir, "predictions")]:
        existing, rows = read_csv_rows(path)
        if existing is not None and existing != header:
            raise UsageError(f"--resume: {path} has the columns {','.join(existing)} but this run writes "
                             f"{','.join(header)}; resume with the same --save-maps / --save-masks, or use another "
                             "--output-dir.")
        score = header.index("score") if "score" in header else None
        for number, row in enumerate(rows, start=2):
            if row and score is not None and not _is_number(row[score]):
                _bad_row(path, number, f"the score {row[score]!r}, not a number")
        done.update(path_from_csv(row[0]) for row in rows if row)
    return done


def merge_parts(output_dir: Path, kind: str, header: list[str]) -> None:
    """Append the parts' rows to the main CSV (rows whose first field is already there are skipped, so a merge
    cut short and run again adds nothing twice), then delete the parts."""
    parts = part_files(output_dir, kind)
    if not parts:
        return
    target = output_dir / (PREDICTIONS_CSV if kind == "predictions" else SKIPPED_CSV)
    _cut_torn_tail(target)
    _, existing = read_csv_rows(target)
    seen = {row[0] for row in existing if row}
    log = CsvLog(target, header)
    try:
        for part in parts:
            _, rows = read_csv_rows(part)
            fresh = []
            for row in rows:
                if row and row[0] not in seen:
                    seen.add(row[0])
                    fresh.append(row)
            log.write(fresh)
    finally:
        log.close()
    for part in parts:
        part.unlink()
