"""Reading records (one dict per example) for SFT and preference data: JSONL, Parquet, ``datasets``.

``read_records(path, split, what)`` -> ``[(where, record), ...]`` where ``where`` locates the record for
error messages (``file.jsonl:12``, ``file.parquet row 3``, ``dir[train] row 5``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from postrl.data.sources import DataError, read_json_lines

DATA_FILE_BUILDERS = {".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow", ".txt": "text"}
SAVED_DATASET_FILES = ("dataset_info.json", "dataset_dict.json", "state.json")  # written by save_to_disk


def _rows(rows: Any, label: str) -> list[tuple[str, dict]]:
    return [(f"{label} row {i}", dict(r)) for i, r in enumerate(rows)]


def _split(ds: Any, path: str, split: str, what: str) -> Any:
    """The ``split`` of a DatasetDict (a Dataset is returned as it is)."""
    if hasattr(ds, "keys") and not hasattr(ds, "column_names") or isinstance(getattr(ds, "column_names", None), dict):
        if split not in ds:
            raise DataError(f"{what} {path!r} has no split {split!r}; splits: {', '.join(ds.keys())}")
        return ds[split]
    return ds


def read_records(path: str, split: str = "train", what: str = "data") -> list[tuple[str, dict]]:
    """Records of a ``.jsonl`` or ``.parquet`` file, a ``datasets`` directory (``save_to_disk``), data files
    ``datasets`` reads (.json, .csv, .arrow, .txt), a directory of data files, or a hub dataset name (online
    only). ``what`` names the data in error messages ("SFT data", "preference data")."""
    p = Path(path).expanduser()
    if p.suffix in (".jsonl", ".parquet") and p.is_dir():
        raise DataError(f"{what} {path} is a directory, not a {p.suffix} file")
    if p.suffix in (".jsonl", ".parquet") and not p.is_file():
        raise DataError(f"{what} file not found: {path}")
    if p.suffix == ".jsonl":
        records = [(f"{p}:{lineno}", rec) for lineno, rec in read_json_lines(p, f"{what} file")]
    elif p.suffix == ".parquet" and p.is_file():
        import pyarrow.parquet as pq

        try:
            records = _rows(pq.read_table(p).to_pylist(), str(p))
        except Exception as exc:  # noqa: BLE001 - re-raised with the file named
            raise DataError(f"cannot read Parquet file {p}: {exc}") from exc
    else:
        records = _read_datasets(p, path, split, what)
    if not records:
        raise DataError(f"{what} {path} contains no records")
    return records


def _read_datasets(p: Path, path: str, split: str, what: str) -> list[tuple[str, dict]]:
    import datasets

    if not p.exists():
        from postrl.models.loading import hub_reachable

        if p.suffix or not hub_reachable():
            raise DataError(f"{what} not found: {path} (no such file or directory; a hub dataset name needs the "
                            "Hugging Face hub, which is unreachable)")
    try:
        if p.is_dir() and any((p / n).is_file() for n in SAVED_DATASET_FILES):
            ds = datasets.load_from_disk(str(p))
        elif p.is_file():
            builder = DATA_FILE_BUILDERS.get(p.suffix)
            if builder is None:
                raise DataError(f"{what} file {p} has an unsupported type {p.suffix!r}; use .jsonl, .parquet, "
                                f"{', '.join(DATA_FILE_BUILDERS)}, a datasets directory (save_to_disk) or a hub "
                                "dataset name")
            ds = datasets.load_dataset(builder, data_files=str(p), split="train")
        else:  # a directory of data files, or a hub name
            ds = datasets.load_dataset(str(p) if p.exists() else path)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised with what was tried
        raise DataError(f"cannot load {what} {path!r} with `datasets`: {exc}") from exc
    return _rows(_split(ds, path, split, what), f"{path}[{split}]")
