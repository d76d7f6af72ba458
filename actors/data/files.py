"""Reading prompt files with Hugging Face ``datasets`` (memory-mapped Arrow tables).

Each file becomes a ``datasets.Dataset`` whose rows stay in Arrow files (the
``datasets`` cache, or the folder ``save_to_disk`` wrote): a 1M-row file is not
turned into 1M Python objects. Every error is a ``ConfigError`` naming the
config key and the file.
"""

from __future__ import annotations

import os
from pathlib import Path

from actors.validation import ConfigError

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".pq": "parquet", ".csv": "csv",
           ".arrow": "arrow"}
"""File suffix -> ``datasets`` builder; a folder is a ``save_to_disk`` dataset."""


def cache_dir() -> Path:
    """Where converted and preprocessed Arrow files live ($FLEETRL_CACHE or ~/.cache/fleetrl)."""
    root = Path(os.environ.get("FLEETRL_CACHE", Path.home() / ".cache" / "fleetrl")) / "datasets"
    root.mkdir(parents=True, exist_ok=True)
    return root


def load_file(path: str, key: str):
    """One prompt file (or ``save_to_disk`` folder) as a ``datasets.Dataset``."""
    import datasets

    datasets.disable_progress_bars()
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{key}: {path}: no such file or folder")
    try:
        if p.is_dir():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                splits = list(ds)
                if "train" not in ds:
                    raise ConfigError(f"{key}: {path}: a DatasetDict without a 'train' split (splits: {splits})")
                ds = ds["train"]
            return ds
        builder = FORMATS.get(p.suffix.lower())
        if builder is None:
            raise ConfigError(f"{key}: {path}: unknown format {p.suffix or '(no suffix)'!r} "
                              f"(known: {', '.join(sorted(FORMATS))}, or a save_to_disk folder)")
        extra = {"features": _csv_text_features(p), "keep_default_na": False} if builder == "csv" else {}
        return datasets.load_dataset(builder, data_files=[str(p.resolve())], split="train",
                                     cache_dir=str(cache_dir() / "raw"), **extra)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow/datasets raise many kinds; one line, naming the file
        msg = " ".join(str(e).split())[:300]
        raise ConfigError(f"{key}: {path}: cannot be read ({type(e).__name__}: {msg})") from None


def _csv_text_features(path: Path):
    """Every CSV column as text: no type guessing, so an answer ``"0100"`` stays ``"0100"``."""
    import csv

    import datasets

    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: Excel's "CSV UTF-8" starts with a BOM
        header = next(csv.reader(f), None)
    if not header:
        raise ConfigError(f"data.train_files: {path}: no header row")
    return datasets.Features({name: datasets.Value("string") for name in header})


def file_fingerprint(path: str) -> list:
    """What identifies a file's content cheaply: resolved path, size and mtime (of every file in a folder)."""
    p = Path(path).resolve()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return [str(p)] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
