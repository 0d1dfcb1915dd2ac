"""`kvasir-shard build --split-file FILE`: reuse a published split instead of drawing one.

FILE is a CSV (comma, semicolon or tab separated, with a header) naming each image and its
split or fold: a previous build's samples.csv (columns `source`, `split`, `fold`), or a data
set's own split file with a path column (`path`, `source`, `file`, `filename` or `image`) and
`split` (train | val | validation | test) or `fold` (0..K-1; `test` holds out). Paths are
matched to the source's files exactly (relative to the data root), else by a unique shared
tail (`polyps/x.jpg` matches `kvasir-dataset-v2/polyps/x.jpg`). Source files the split file
does not name, and rows that name no file, stop the build unless `allow_missing`; both lists
go into the manifest either way.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .errors import UserError

PATH_COLUMNS = ("source", "path", "file", "filename", "image")
SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "valid": "val",
               "test": "test"}
_SHOWN = 5  # example paths in messages


class SplitFileError(UserError):
    """The split file cannot be read or does not fit the source."""


@dataclass
class SplitFile:
    """A published split: where each named file goes."""

    path: Path
    sha256: str
    rows: dict[str, tuple[str, str]]  # normalized path -> (split or fold dir, fold text)
    layout: str  # "holdout" | "folds"
    folds: int
    unlisted: list[str] = field(default_factory=list)  # source files it does not name
    missing: list[str] = field(default_factory=list)  # its rows that name no source file
    _matched: dict[str, str] = field(default_factory=dict)  # source rel -> its row's path

    def of(self, rel: str) -> tuple[str, str]:
        """(split, fold text) of a matched source file."""
        return self.rows[self._matched[rel]]

    def match(self, records: list, allow_missing: bool) -> None:
        """Pair source files (records with a class) with rows; reject the unlisted ones."""
        candidates = [r for r in records if r.cls is not None and not r.reject]
        by_tail: dict[str, list[str]] = {}
        for r in candidates:
            parts = PurePosixPath(r.rel).parts
            for k in range(1, len(parts) + 1):
                by_tail.setdefault("/".join(parts[-k:]), []).append(r.rel)
        rels, rel_of_row = {r.rel for r in candidates}, {}
        for row in self.rows:
            parts = row.split("/")  # the row may carry extra leading folders, or fewer
            longer = next((t for k in range(len(parts)) if (t := "/".join(parts[k:])) in rels),
                          None)
            hits = [longer] if longer else by_tail.get(row, [])
            if len(hits) == 1:
                rel_of_row[row] = hits[0]
        self._matched = {rel: row for row, rel in rel_of_row.items()}
        self.missing = sorted(set(self.rows) - set(rel_of_row))
        self.unlisted = sorted(r.rel for r in candidates if r.rel not in self._matched)
        if (self.missing or self.unlisted) and not allow_missing:
            raise SplitFileError(self._disagreement())
        for r in candidates:
            if r.rel not in self._matched:
                r.reject = f"not in the split file {self.path.name}"

    def _disagreement(self) -> str:
        parts = []
        if self.unlisted:
            parts.append(f"{len(self.unlisted)} source file(s) it does not name (e.g. "
                         f"{', '.join(self.unlisted[:_SHOWN])})")
        if self.missing:
            parts.append(f"{len(self.missing)} row(s) naming no file of the source, or more "
                         f"than one (e.g. {', '.join(self.missing[:_SHOWN])})")
        return (f"split file {self.path} and the source disagree: {'; '.join(parts)}. Fix the "
                "file, or pass --allow-missing to pack only the files it names")

    def summary(self) -> dict:
        """What the manifest records of it."""
        return {"path": str(self.path), "sha256": self.sha256, "rows": len(self.rows),
                "unlisted": self.unlisted, "missing": self.missing}


def _normalize(path: str) -> str:
    p = PurePosixPath(path.strip().replace("\\", "/"))
    return "/".join(x for x in p.parts if x not in (".", "/"))


def _placement(row: dict, split_col: str | None, fold_col: str | None, where: str
               ) -> tuple[str, str]:
    split = (row.get(split_col) or "").strip().lower() if split_col else ""
    fold = (row.get(fold_col) or "").strip() if fold_col else ""
    if split == "test" or fold.lower() == "test":
        return "test", ""
    if fold:
        if not fold.isdigit():
            raise SplitFileError(f"{where}: fold {fold!r} is not a number or 'test'")
        return f"fold{int(fold)}", str(int(fold))
    if split not in SPLIT_NAMES:
        raise SplitFileError(f"{where}: split {split!r} is none of {sorted(SPLIT_NAMES)}")
    return SPLIT_NAMES[split], ""


def read_split_file(path: str) -> SplitFile:
    """Parse FILE; SplitFileError naming the file and line for anything malformed."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise SplitFileError(f"split file {p} cannot be read ({exc})") from exc
    try:
        dialect = csv.Sniffer().sniff(text.splitlines()[0], delimiters=",;\t")
    except (csv.Error, IndexError):
        dialect = csv.excel
    reader = csv.DictReader(text.splitlines(), dialect=dialect)
    cols = {c.strip().lower(): c for c in reader.fieldnames or []}
    path_col = next((cols[c] for c in PATH_COLUMNS if c in cols), None)
    split_col, fold_col = cols.get("split"), cols.get("fold")
    if path_col is None or (split_col is None and fold_col is None):
        raise SplitFileError(f"split file {p}: needs a path column ({', '.join(PATH_COLUMNS)}) "
                             f"and a 'split' or 'fold' column; found {reader.fieldnames}")
    rows: dict[str, tuple[str, str]] = {}
    for n, row in enumerate(reader, start=2):
        name = _normalize(row.get(path_col) or "")
        if not name:
            continue
        place = _placement(row, split_col, fold_col, f"{p}, line {n}")
        if rows.setdefault(name, place) != place:
            raise SplitFileError(f"{p}, line {n}: {name} is placed twice, differently")
    folds = sorted({int(f) for _, f in rows.values() if f})
    if folds and any(s in ("train", "val") for s, f in rows.values() if not f):
        raise SplitFileError(f"split file {p} mixes folds with train/val rows; use one or the "
                             "other (test may go with either)")
    if folds and folds != list(range(len(folds))):
        raise SplitFileError(f"split file {p}: folds {folds} are not 0..K-1")
    return SplitFile(p, hashlib.sha256(text.encode()).hexdigest(), rows,
                     "folds" if folds else "holdout", len(folds))
