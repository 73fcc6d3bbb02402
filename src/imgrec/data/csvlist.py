"""CSV lists of images: rows ``path,label`` (optionally ``,split``), paths relative to the CSV file."""
from __future__ import annotations

import csv as _csv
from pathlib import Path

from imgrec.errors import DatasetError

HEADER_NAMES = {"path", "file", "filename", "image", "label", "class", "split"}


def read_csv_list(csv_path: Path, classes: list[str] | None = None) -> dict[str, tuple[list[Path], list[str]]]:
    """Rows grouped by split ("train" when there is no split column): {split: (paths, label names)}.

    Every problem names its row: missing columns, unknown paths, labels outside ``classes``, bad splits.
    """
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{csv_path}: cannot read CSV ({e})") from None
    rows = list(_csv.reader(text.splitlines()))
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
        if classes is not None and label not in classes:
            raise DatasetError(f"{csv_path}: row {n}: label {label!r} is not in the class list "
                               f"({', '.join(classes[:10])}{' …' if len(classes) > 10 else ''})")
        out.setdefault(split, ([], []))
        out[split][0].append(path)
        out[split][1].append(label)
    if "train" not in out:
        raise DatasetError(f"{csv_path}: no training rows")
    return out
