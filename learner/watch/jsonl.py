"""The run directory's JSON-lines files (``metrics.jsonl``, ``eval.jsonl``, ``samples.jsonl``).

One JSON object per line, each with an integer ``step``. Readers skip a line that does
not parse (the torn last line of a run that crashed mid-write, or of one still writing).
A resumed run cuts each file back to its checkpoint's step, so no step appears twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO


def read_rows(path: Path) -> list[dict]:
    """The rows of ``path`` that are JSON objects with an integer ``step`` ([] if no file)."""
    rows = []
    path = Path(path)
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and not isinstance(row["step"], bool):
                rows.append(row)
    return rows


def open_cut_back(path: Path, resume_step: int | None) -> tuple[IO[str], list[dict], list[dict]]:
    """Open ``path`` for appending rows: a fresh run (``resume_step`` None) starts it empty,
    a resumed one keeps the rows up to ``resume_step``. Returns ``(file, kept, removed)``.
    The kept rows are written to a temporary file first and moved over ``path``, so a crash
    here never loses them."""
    path = Path(path)
    rows = read_rows(path) if resume_step is not None else []
    kept = [r for r in rows if r["step"] <= resume_step] if resume_step is not None else []
    removed = [r for r in rows if r["step"] > resume_step] if resume_step is not None else []
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)
    return path.open("a"), kept, removed


def append(file: IO[str], row: dict) -> None:
    """Write ``row`` as one line and flush it (a reader sees whole rows, a crash tears at most the last)."""
    file.write(json.dumps(row) + "\n")
    file.flush()
