"""The one I/O module: every stage reads and writes artifacts through fsspec URIs (local path or s3://...)."""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import IO, Any

import fsspec

# Storage options per protocol (e.g. {"s3": {"client_kwargs": {"endpoint_url": ...}}}), set once per process
# from the config so deep helpers need not thread them through every call.
# The env var carries them into Ray workers (init_ray puts it in the job's runtime_env).
STORAGE_ENV = "GEOLOC_STORAGE_OPTIONS"
_STORAGE_OPTIONS: dict[str, dict[str, Any]] = json.loads(os.environ.get(STORAGE_ENV) or "{}")


def set_storage_options(protocol: str, options: dict[str, Any]) -> None:
    _STORAGE_OPTIONS[protocol] = dict(options)
    os.environ[STORAGE_ENV] = json.dumps(_STORAGE_OPTIONS)


def storage_options() -> dict[str, dict[str, Any]]:
    return {k: dict(v) for k, v in _STORAGE_OPTIONS.items()}


def use_storage_options(options: dict[str, dict[str, Any]] | None) -> None:
    """Install options captured in the driver (`storage_options()`) inside a Ray worker."""
    for proto, opts in (options or {}).items():
        set_storage_options(proto, opts)


def protocol_of(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def is_local(uri: str) -> bool:
    return protocol_of(uri) in ("file", "local")


def absolute_if_local(uri: str) -> str:
    """Resolve a relative local path where it is read: Ray workers and replicas run in other folders."""
    return uri if "://" in uri or os.path.isabs(uri) else os.path.abspath(uri)


def filesystem(uri: str) -> fsspec.AbstractFileSystem:
    proto = protocol_of(uri)
    return fsspec.filesystem(proto, **_STORAGE_OPTIONS.get(proto, {}))


def strip_protocol(uri: str) -> str:
    return filesystem(uri)._strip_protocol(uri)


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', keeping the protocol; absolute local parts are left alone by callers."""
    out = base.rstrip("/")
    for p in parts:
        if p:
            out = posixpath.join(out, p.strip("/")) if out else p
    return out


def resolve(base: str, rel: str) -> str:
    """`rel` relative to `base`, unless `rel` is already a URI or an absolute path."""
    if "://" in rel or rel.startswith("/"):
        return rel
    return join(base, rel)


def exists(uri: str) -> bool:
    return filesystem(uri).exists(uri)


def makedirs(uri: str) -> None:
    if is_local(uri):
        filesystem(uri).makedirs(uri, exist_ok=True)


@contextmanager
def open_uri(uri: str, mode: str = "rb") -> Iterator[IO]:
    fs = filesystem(uri)
    if "w" in mode and is_local(uri):
        fs.makedirs(posixpath.dirname(strip_protocol(uri)) or ".", exist_ok=True)
    with fs.open(uri, mode) as f:
        yield f


def read_bytes(uri: str) -> bytes:
    with open_uri(uri, "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    with open_uri(uri, "wb") as f:
        f.write(data)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(uri: str, rows: Iterable[dict]) -> int:
    n = 0
    with open_uri(uri, "wb") as f:
        for row in rows:
            f.write((json.dumps(row, default=str) + "\n").encode("utf-8"))
            n += 1
    return n


def read_jsonl(uri: str) -> list[dict]:
    """Read JSON lines; a malformed line raises naming the file and line number."""
    rows = []
    for lineno, line in enumerate(read_text(uri).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{uri}:{lineno}: malformed JSON line: {exc.msg}") from None
    return rows


def glob(pattern: str) -> list[str]:
    fs = filesystem(pattern)
    proto = protocol_of(pattern)
    found = sorted(fs.glob(pattern))
    return [f"{proto}://{p}" if proto not in ("file", "local") else p for p in found]


def listdir(uri: str) -> list[str]:
    fs = filesystem(uri)
    proto = protocol_of(uri)
    names = sorted(fs.ls(uri, detail=False))
    return [f"{proto}://{p}" if proto not in ("file", "local") else p for p in names]


def remove(uri: str, recursive: bool = True) -> None:
    fs = filesystem(uri)
    if fs.exists(uri):
        fs.rm(uri, recursive=recursive)


def read_parquet(uri: str, columns: list[str] | None = None):
    """Read a parquet file or a directory of parquet parts (as Ray Data writes) into a pandas DataFrame."""
    import pyarrow.parquet as pq

    fs = filesystem(uri)
    table = pq.read_table(strip_protocol(uri), columns=columns, filesystem=fs)
    return table.to_pandas()


def write_parquet(uri: str, df) -> None:
    """Write a pandas DataFrame as one parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs = filesystem(uri)
    if is_local(uri):
        fs.makedirs(posixpath.dirname(strip_protocol(uri)) or ".", exist_ok=True)
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), strip_protocol(uri), filesystem=fs)


def arrow_filesystem(uri: str):
    """A pyarrow filesystem for Ray Data's read/write_* calls (carries our s3 endpoint options)."""
    if is_local(uri):
        return None
    import pyarrow.fs as pafs

    return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem(uri)))


def write_dataset_parquet(ds, uri: str) -> None:
    """Write a Ray Dataset as a parquet folder at `uri`, replacing what was there (a rerun is idempotent)."""
    if exists(uri):
        remove(uri)
    ds.write_parquet(strip_protocol(uri) if not is_local(uri) else uri, filesystem=arrow_filesystem(uri))


def read_dataset_parquet(uri: str, **kwargs):
    """A Ray Dataset over a parquet file or folder, through our fsspec options for remote URIs."""
    import ray.data

    path = strip_protocol(uri) if not is_local(uri) else uri
    return ray.data.read_parquet(path, filesystem=arrow_filesystem(uri), **kwargs)
