"""Shared file readers for the annotation modules; every error names the file and the line or entry."""

from __future__ import annotations

import csv
import io
import json
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diffusionret.data.errors import AnnotationError


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise AnnotationError(path, f"{what} not found")
    return path


def read_text(path: Path, what: str) -> str:
    require_file(path, what)
    try:
        return path.read_text(encoding="utf-8-sig")  # tolerate a BOM from spreadsheet exports
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise AnnotationError(path, f"not UTF-8 text ({exc.reason})", line=line) from exc


def read_json(path: Path, what: str) -> Any:
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise AnnotationError(path, f"invalid JSON: {exc.msg} (column {exc.colno})", line=exc.lineno) from exc


def read_id_list(path: Path, what: str) -> list[tuple[int, str]]:
    """``[(line number, id)]`` of a one-id-per-line file, skipping blank lines."""
    ids = []
    for number, line in enumerate(read_text(path, what).splitlines(), start=1):
        item = line.strip()
        if not item:
            continue
        if any(ch.isspace() for ch in item):
            raise AnnotationError(path, f"expected one video id per line, got {item!r}", line=number)
        ids.append((number, item))
    return ids


def read_csv_rows(path: Path, what: str, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """``(line number, row)`` for each data row of a CSV with a header that has the ``required`` columns."""
    reader = csv.DictReader(io.StringIO(read_text(path, what), newline=""))
    header = reader.fieldnames or []
    missing = [name for name in required if name not in header]
    if missing:
        raise AnnotationError(path, f"missing column(s) {missing}; header is {header}", line=1)
    try:
        for row in reader:
            if None in row:  # more fields than the header
                raise AnnotationError(path, f"{len(header) + len(row[None])} fields, header has {len(header)}",
                                      line=reader.line_num)
            if all((value or "").strip() == "" for value in row.values()):
                continue
            yield reader.line_num, row
    except csv.Error as exc:
        raise AnnotationError(path, f"malformed CSV: {exc}", line=reader.line_num) from exc


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain containers and strings only: a pickle that names any class is refused, so a
    downloaded annotation file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain lists/dicts/strings allowed")


def read_plain_pickle(path: Path, what: str) -> Any:
    require_file(path, what)
    try:
        with open(path, "rb") as handle:
            return _PlainUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise AnnotationError(path, f"cannot unpickle: {exc}") from exc
