"""Training data in the formats HF users keep it in: a local `datasets` directory (what
`Dataset.save_to_disk` / `DatasetDict.save_to_disk` write) or a parquet file, read as rows of the
same `messages` (or `prompt`) records a JSONL file holds. `datasets` is imported only when such
data is given: it takes seconds to import."""

from __future__ import annotations

import hashlib
from pathlib import Path

from salora.errors import SaLoRAError

# Files `save_to_disk` writes: a Dataset's directory holds the first two, a DatasetDict's the third.
DATASET_FILES = ("dataset_info.json", "state.json")
DATASET_DICT_FILE = "dataset_dict.json"


def is_hf_data(path: str | Path) -> bool:
    """A directory (taken as a `datasets` directory) or a `.parquet` file, rather than JSONL."""
    path = Path(path)
    return path.is_dir() or path.suffix.lower() == ".parquet"


def _datasets():
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - a dependency of the project
        raise SaLoRAError("reading a datasets directory or parquet file needs the `datasets` package (pip install datasets)") from e
    return datasets


def read_rows(path: str | Path) -> list[dict]:
    """The records of a `datasets` directory (a DatasetDict's `train` split, or its only split) or of
    a parquet file, as plain dicts; errors name the path and say what was expected."""
    path = Path(path)
    datasets = _datasets()
    if path.suffix.lower() == ".parquet":
        if not path.is_file():
            raise SaLoRAError(f"{path}: no such file")
        import pyarrow.parquet  # read directly: datasets' from_parquet writes a cache and a progress bar

        try:
            table = pyarrow.parquet.read_table(str(path))
        except Exception as e:  # pyarrow raises its own types for every kind of bad file
            raise SaLoRAError(f"{path}: not a readable parquet file ({_first_line(e)})") from e
        return _check_rows(path, table.to_pylist())
    if (path / DATASET_DICT_FILE).is_file():
        splits = _load_from_disk(datasets, path)
        if "train" in splits:
            return _check_rows(path, splits["train"].to_list())
        if len(splits) == 1:
            return _check_rows(path, next(iter(splits.values())).to_list())
        raise SaLoRAError(f"{path}: a DatasetDict without a `train` split (it has {', '.join(sorted(splits))}); save the split to use")
    if all((path / name).is_file() for name in DATASET_FILES):
        return _check_rows(path, _load_from_disk(datasets, path).to_list())
    raise SaLoRAError(f"{path}: a directory that is not a `datasets` directory (no {DATASET_DICT_FILE} or {' and '.join(DATASET_FILES)})")


def _load_from_disk(datasets, path: Path):
    try:
        return datasets.load_from_disk(str(path), keep_in_memory=True)
    except Exception as e:  # damaged arrow files or metadata raise pyarrow's and datasets' own types
        raise SaLoRAError(f"{path}: not a readable datasets directory ({_first_line(e)})") from e


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _check_rows(path: Path, rows: list[dict]) -> list[dict]:
    if not rows:
        raise SaLoRAError(f"{path}: no records")
    return rows


def fingerprint(path: str | Path) -> str:
    """SHA-256 of a data file, or of a directory's files (relative names and contents, in order), so
    a resumed run can tell that its data changed."""
    path = Path(path)
    digest = hashlib.sha256()
    if not path.is_dir():
        _update(digest, path)
        return digest.hexdigest()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        _update(digest, file)
        digest.update(b"\0")
    return digest.hexdigest()


def _update(digest, file: Path) -> None:
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
