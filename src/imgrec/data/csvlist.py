"""CSV lists of images: rows ``path,label`` (optionally ``,split``), paths relative to the CSV file.

Multi-label lists put several labels in the label cell, separated by ``;`` (``img.jpg,beach;dog;people``).

Paths may be absolute or lead out of the CSV's folder (``../pool/img.jpg``, ``/data/pool/img.jpg``): a list is
something its user writes to point at images wherever they are, unlike an image folder, whose links imgrec does
not follow out of it (``folder.scan_images``). So a CSV someone else wrote can name any file you can read: read
one from a stranger before training on it or packing it (``imgrec data check LIST`` lists every path it reads).
"""
from __future__ import annotations

from pathlib import Path

from imgrec.errors import DatasetError
from imgrec.safeio import read_csv_rows

HEADER_NAMES = {"path", "file", "filename", "image", "label", "labels", "class", "classes", "split"}
LABEL_SEP = ";"


def read_csv_list(csv_path: Path, classes: list[str] | None = None, multilabel: bool = False
                  ) -> dict[str, tuple[list[Path], list]]:
    """Rows grouped by split ("train" when there is no split column): {split: (paths, label names)}.

    With ``multilabel`` each label is a sorted list of names (the cell split at ``;``), else one name.
    Every problem names its row: missing columns, unknown paths, labels outside ``classes``, bad splits,
    an empty label in a multi-label cell.
    """
    rows = _read_rows(csv_path)
    start = 1 if rows and {c.strip().lower() for c in rows[0]} & HEADER_NAMES else 0
    out: dict[str, tuple[list[Path], list[str]]] = {}
    for n, row in enumerate(rows[start:], start=start + 1):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise DatasetError(f"{csv_path}: row {n}: expected 'path,label', got {','.join(row)[:100]!r}")
        rel, label = row[0].strip(), row[1].strip()
        split = row[2].strip().lower() if len(row) > 2 and row[2].strip() else "train"
        if split not in ("train", "val", "test"):
            raise DatasetError(f"{csv_path}: row {n}: split must be train, val or test, got {split!r}")
        path = (csv_path.parent / rel) if not Path(rel).is_absolute() else Path(rel)
        if not path.exists() and not path.is_symlink():
            raise DatasetError(f"{csv_path}: row {n}: file not found: {rel}")
        names = [label]
        if multilabel:
            names = [x.strip() for x in label.split(LABEL_SEP)]
            if not all(names):
                raise DatasetError(f"{csv_path}: row {n}: empty label in {label!r} (labels are separated by "
                                   f"'{LABEL_SEP}', e.g. beach;dog)")
        for name in names:
            if classes is not None and name not in classes:
                raise DatasetError(f"{csv_path}: row {n}: label {name!r} is not in the class list "
                                   f"({', '.join(classes[:10])}{' …' if len(classes) > 10 else ''})")
        out.setdefault(split, ([], []))
        out[split][0].append(path)
        out[split][1].append(sorted(set(names)) if multilabel else label)
    if "train" not in out:
        raise DatasetError(f"{csv_path}: no training rows")
    return out


def csv_has_multiple_labels(csv_path: Path) -> bool:
    """True when some row's label cell holds a ``;``: the list is multi-label (``imgrec train`` detects
    the task from it; ``--task`` overrides)."""
    return any(len(row) > 1 and LABEL_SEP in row[1] for row in _read_rows(csv_path))


def _read_rows(csv_path: Path) -> list[list[str]]:
    """The CSV file's rows (a UTF-8 byte-order mark ignored, imgrec.safeio.read_csv_rows); DatasetError when it
    cannot be read."""
    return read_csv_rows(csv_path, "cannot read CSV", error=DatasetError)
