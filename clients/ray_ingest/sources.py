"""What `coca index SOURCE --ray` reads: SOURCE as a Ray Dataset of rows (source, uri, metadata), and
one item's bytes, size-capped.

SOURCE is one of
  * a directory: its image files, recursively (coca.media.IMAGE_SUFFIXES), in sorted order;
  * a glob (`photos/**/*.jpg`): the files it matches;
  * a text file (.txt, .lst): one path or URI a line (blank lines and `#` comments skipped);
  * a Parquet or CSV manifest (.parquet, .csv): one row per image, the path or URI in `--path-column`
    (default `path`, else `url`: img2dataset's input layout), every other column the item's metadata
    (values as text; empty cells left out).
Relative paths in a text file or manifest are taken from the file's folder. A URI is `file://...` or any
scheme pyarrow opens (s3://, gs://, hdfs://, ...); http(s) is not downloaded here (img2dataset does that).
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from coca.errors import InvalidInputError

TEXT_SUFFIXES = (".txt", ".lst")
MANIFEST_SUFFIXES = (".parquet", ".csv")
PATH_COLUMNS = ("path", "url")  # looked for in this order when --path-column is not given
GLOB_CHARS = frozenset("*?[")


class ItemFailure(Exception):
    """One item cannot be indexed: a gRPC status name (NOT_FOUND, INVALID_ARGUMENT, ...) and why."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- SOURCE -> rows
@dataclass
class Source:
    """A checked SOURCE: its entries (directory, glob, text file) or its manifest and path column."""

    entries: Optional[list[str]] = None
    manifest: Optional[Path] = None
    path_column: str = ""

    @property
    def total(self) -> Optional[int]:
        """Number of items, when known without reading the whole source."""
        if self.entries is not None:
            return len(self.entries)
        return _manifest_rows(self.manifest)

    def dataset(self, metadata: dict[str, str]):
        """A Ray Dataset of rows {source, uri, metadata (JSON text)}."""
        import ray.data

        if self.entries is not None:
            shared = json.dumps(metadata)
            return ray.data.from_items([{"source": e, "uri": _uri(e), "metadata": shared} for e in self.entries])
        read = ray.data.read_parquet if self.manifest.suffix.lower() == ".parquet" else ray.data.read_csv
        return read(str(self.manifest)).map_batches(
            _manifest_rows_to_items, batch_format="pyarrow", zero_copy_batch=True,
            fn_kwargs={"column": self.path_column, "base": str(self.manifest.parent), "shared": metadata})


def resolve(source: str, path_column: Optional[str] = None) -> Source:
    """What SOURCE names, checked on this machine before anything starts (InvalidInputError if unusable)."""
    path = Path(source)
    if path.suffix.lower() in MANIFEST_SUFFIXES and path.is_file():
        return Source(manifest=path, path_column=_path_column(path, path_column))
    if path_column is not None:
        raise InvalidInputError(f"--path-column applies to a Parquet/CSV manifest, not to {source}")
    return Source(entries=_listed(source))


def _listed(source: str) -> list[str]:
    """The entries of a directory, glob or text-file SOURCE."""
    from coca import media

    path = Path(source)
    if path.is_dir():
        return [str(p) for p in media.image_files(path)]
    if GLOB_CHARS & set(source):
        return sorted(p for p in glob.glob(source, recursive=True) if os.path.isfile(p))
    if path.suffix.lower() in TEXT_SUFFIXES and path.is_file():
        return [_resolve(line, path.parent) for line in _lines(path)]
    if not path.exists():
        raise InvalidInputError(f"{source}: no such file or directory")
    raise InvalidInputError(f"{source}: not a directory, glob, text file ({', '.join(TEXT_SUFFIXES)}) or "
                            f"manifest ({', '.join(MANIFEST_SUFFIXES)})")


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _resolve(entry: str, base: Path) -> str:
    """A URI as is; a relative path from `base`."""
    if "://" in entry or os.path.isabs(entry):
        return entry
    return os.path.normpath(base / entry)


def _uri(entry: str) -> str:
    """What the item's uri says: the URI, or the file's absolute path (as plain `coca index` stores it)."""
    return entry if "://" in entry else os.path.abspath(entry)


def _path_column(path: Path, wanted: Optional[str]) -> str:
    columns = _manifest_columns(path)
    column = wanted or next((c for c in PATH_COLUMNS if c in columns), None)
    if column not in columns:
        named = f"column {wanted!r}" if wanted else f"a column named {' or '.join(PATH_COLUMNS)}"
        raise InvalidInputError(f"{path}: no {named} (columns: {', '.join(columns) or 'none'}); "
                                f"name the one holding paths with --path-column")
    return column


def _manifest_columns(path: Path) -> list[str]:
    """Column names from the file's schema or header line, without reading its rows."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    import pyarrow.csv as pcsv

    with pcsv.open_csv(path) as reader:
        return list(reader.schema.names)


def _manifest_rows(path: Path) -> Optional[int]:
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return None  # a CSV's rows are known only by reading it


def _manifest_rows_to_items(table, column: str, base: str, shared: dict[str, str]):
    """Manifest rows -> {source, uri, metadata}: the path column, the other columns as metadata."""
    import pyarrow as pa

    paths = table.column(column).to_pylist()
    others = {name: table.column(name).to_pylist() for name in table.column_names if name != column}
    sources, uris, metadata = [], [], []
    for i, entry in enumerate(paths):
        entry = "" if entry is None else str(entry).strip()
        own = {name: _text(values[i]) for name, values in others.items() if _text(values[i]) != ""}
        sources.append(_resolve(entry, Path(base)) if entry else "")
        uris.append(_uri(sources[-1]) if entry else "")
        metadata.append(json.dumps({**shared, **own}))
    return pa.table({"source": pa.array(sources, pa.string()), "uri": pa.array(uris, pa.string()),
                     "metadata": pa.array(metadata, pa.string())})


def _text(value) -> str:
    return "" if value is None else str(value)


# ---------------------------------------------------------------- one item's bytes
def read_source(source: str, max_bytes: int) -> bytes:
    """The bytes `source` names (a path or URI), at most `max_bytes`; ItemFailure says why not."""
    if not source:
        raise ItemFailure("INVALID_ARGUMENT", "empty path")
    if source.startswith(("http://", "https://")):
        raise ItemFailure("INVALID_ARGUMENT", f"{source}: http(s) is not downloaded here; fetch it first "
                                              "(e.g. img2dataset) and index the files")
    try:
        if "://" in source and not source.startswith("file://"):
            return _read_remote(source, max_bytes)
        local = source[len("file://"):] if source.startswith("file://") else source
        with open(local, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise ItemFailure("NOT_FOUND", f"{source}: no such file") from None
    except (OSError, ValueError) as exc:  # permissions, a directory, an unknown URI scheme
        raise ItemFailure("INVALID_ARGUMENT", f"{source}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    return _capped(source, data, max_bytes)


def _read_remote(uri: str, max_bytes: int) -> bytes:
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(uri)
    with filesystem.open_input_stream(path) as stream:
        return _capped(uri, stream.read(max_bytes + 1), max_bytes)


def _capped(source: str, data: bytes, max_bytes: int) -> bytes:
    if not data:
        raise ItemFailure("INVALID_ARGUMENT", f"{source}: empty file (0 bytes)")
    if len(data) > max_bytes:
        raise ItemFailure("RESOURCE_EXHAUSTED", f"{source}: over the image size limit of {max_bytes} bytes")
    return data
