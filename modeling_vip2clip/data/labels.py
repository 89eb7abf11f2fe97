"""The one label rule: what a value of a dataset's label column means (normal 0 / anomalous 1, and the defect name).

Every command opens datasets through :func:`.sources.load_anomaly_dataset`, which maps each label with a
:class:`LabelRule`, so ``train``, ``evaluate``, ``calibrate``, ``predict --dataset`` and ``export
--calibration-dataset`` read a label column the same way:

* ``--normal-label VALUE [VALUE ...]`` given: the label column names classes (defect names such as ``good`` /
  ``scratch`` / ``crack``, or a ``ClassLabel`` of them); the listed values are normal, every other value is
  anomalous and kept as its ``defect_type``. Values are compared as text, case-insensitively (``0`` matches the
  integer 0).
* otherwise one table (:data:`NORMAL_VALUES`, :data:`ANOMALOUS_VALUES`) maps ints, floats, booleans and strings; a
  ``ClassLabel`` is read through its class *names* (in any order: ``["defective", "good"]`` makes ``good`` = 1
  normal), and a ``ClassLabel`` with one normal name beside defect names makes each other name an anomaly of
  that type.
* a value that neither rule understands is one :class:`~.schema.DatasetError` (a one-line usage error, exit 2)
  naming the column, the value and the flag to pass.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from .schema import NORMAL_DEFECT, UNKNOWN_DEFECT, DatasetError

__all__ = ["ANOMALOUS_VALUES", "NORMAL_VALUES", "UNLABELLED", "LabelRule"]

#: Label values (as lower-case text) that mean a normal image.
NORMAL_VALUES = ("0", "false", "normal", "good", "ok", "nominal", "negative")
#: Label values (as lower-case text) that mean an anomalous image whose defect is not named.
ANOMALOUS_VALUES = ("1", "true", "anomaly", "anomalous", "abnormal", "bad", "defect", "defective", "ng", "positive")
#: The ``label`` of a row without one (a dataset scored by ``predict`` without a label column).
UNLABELLED = -1


def _text(value: Any) -> str:
    """A label value as the text the table compares: ``True`` → ``true``, ``1.0`` → ``1``."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip().lower()


class LabelRule:
    """Map one label column's values to ``(label, defect_type)``.

    ``column`` is the column's name (for messages); ``class_names`` the names of a ``ClassLabel`` column (its
    integer values are read through them); ``normal_labels`` the values of ``--normal-label`` (None: the table).
    """

    def __init__(self, column: str, class_names: Sequence[str] | None = None,
                 normal_labels: Iterable[Any] | None = None) -> None:
        self.column = column
        self.class_names = list(class_names) if class_names else None
        self.normal = None if normal_labels is None else {_text(v) for v in normal_labels}
        # A ClassLabel of defect names beside one normal class (e.g. good / crack / scratch) needs no flag.
        self._defect_classes = bool(self.class_names and len(self.class_names) > 1 and
                                    any(_text(n) in NORMAL_VALUES for n in self.class_names))

    def check_values(self, values: Iterable[Any]) -> None:
        """With ``--normal-label``: at least one of its values must occur in the column (a misspelt flag would
        otherwise make every image anomalous). ``values`` are the column's distinct values (or class names)."""
        if self.normal is None:
            return
        shown = sorted({self._name(v) for v in values}, key=str)
        if not self.normal & {_text(v) for v in shown}:
            raise DatasetError(
                f"--normal-label {' '.join(sorted(self.normal))}: no value of the label column {self.column!r} is "
                f"one of them (its values: {', '.join(map(str, shown[:20]))}); pass the value(s) that mark normal "
                "images.")

    def _name(self, value: Any) -> Any:
        names = self.class_names
        if names is not None and isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
            return names[value]
        return value

    def __call__(self, value: Any) -> tuple[int, str]:
        """``(0, "good")`` for a normal value, ``(1, defect name or "anomaly")`` for an anomalous one."""
        name = self._name(value)
        text = _text(name)
        if self.normal is not None:
            if value is not None and text in self.normal:
                return 0, NORMAL_DEFECT
            if value is not None and text:
                return 1, str(name).strip()
        elif value is not None:
            if text in NORMAL_VALUES:
                return 0, NORMAL_DEFECT
            if text in ANOMALOUS_VALUES:
                return 1, UNKNOWN_DEFECT
            if self._defect_classes and name is not value:
                return 1, str(name)
        raise DatasetError(
            f"--label-column {self.column}: label {value!r} is neither normal ({', '.join(NORMAL_VALUES)}) nor "
            f"anomalous ({', '.join(ANOMALOUS_VALUES)}); if the column names classes (e.g. good / scratch), pass "
            "--normal-label with the value(s) of the normal class — every other value then counts as anomalous — "
            "or pass --label-column with a column of such labels.")
