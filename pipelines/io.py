"""The one place that touches storage: filesystems, JSON, Parquet, and staged publishing.

Every job writes its output through ``staged_output``: everything goes to a hidden staging
directory next to the destination, which is moved into place only when the body finished
without error, and ``_SUCCESS`` is written last. Readers trust a directory only when
``is_complete`` says so. Paths may be local or any URI pyarrow's filesystems accept.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

SUCCESS_MARKER = "_SUCCESS"


class OutputExistsError(FileExistsError):
    """The destination already holds a complete output and overwrite was not asked for."""


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    if "://" in str(path):
        return pafs.FileSystem.from_uri(str(path))
    return pafs.LocalFileSystem(), os.path.abspath(os.fspath(path))


def join(base: str, *parts: str) -> str:
    if "://" in str(base):
        return posixpath.join(str(base), *parts)
    return os.path.join(os.fspath(base), *parts)


def exists(path: str) -> bool:
    fs, inner = resolve(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def is_complete(path: str) -> bool:
    """True when ``path`` is a published output (its ``_SUCCESS`` marker exists)."""
    return exists(join(path, SUCCESS_MARKER))


def remove(path: str) -> None:
    fs, inner = resolve(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(inner)
    elif info.type == pafs.FileType.File:
        fs.delete_file(inner)


def makedirs(path: str) -> None:
    fs, inner = resolve(path)
    fs.create_dir(inner, recursive=True)


def write_text(path: str, text: str) -> None:
    fs, inner = resolve(path)
    parent = posixpath.dirname(inner) if "://" in str(path) else os.path.dirname(inner)
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(inner) as stream:
        stream.write(text.encode())


def read_text(path: str) -> str:
    fs, inner = resolve(path)
    with fs.open_input_stream(inner) as stream:
        return stream.read().decode()


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str) -> Any:
    return json.loads(read_text(path))


def write_table(path: str, table: pa.Table) -> None:
    """Write one Parquet file (parents created)."""
    fs, inner = resolve(path)
    parent = posixpath.dirname(inner) if "://" in str(path) else os.path.dirname(inner)
    if parent:
        fs.create_dir(parent, recursive=True)
    pq.write_table(table, inner, filesystem=fs)


def read_table(path: str, *, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file or a directory of Parquet files (hive partitions allowed)."""
    fs, inner = resolve(path)
    return pq.read_table(inner, filesystem=fs, columns=columns, partitioning="hive")


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _staging_path(out: str) -> str:
    out = str(out).rstrip("/")
    parent, name = posixpath.split(out) if "://" in out else os.path.split(os.path.abspath(out))
    return join(parent, f".{name}._staging-{uuid.uuid4().hex[:12]}")


def is_empty_directory(path: str) -> bool:
    fs, inner = resolve(path)
    if fs.get_file_info(inner).type != pafs.FileType.Directory:
        return False
    return not fs.get_file_info(pafs.FileSelector(inner, recursive=False))


def check_writable(out: str, *, overwrite: bool, replace_incomplete: bool = False) -> None:
    """Refuse an existing output unless overwrite; call before any work starts.

    An empty directory (a freshly mounted volume) counts as none. ``overwrite`` replaces only a
    published output (one with ``_SUCCESS``): ``--out ~ --overwrite`` must not delete a home
    directory. ``replace_incomplete`` also replaces a dir without the marker (a writer that died
    between its move and the marker); only callers that own the path (nightly, study) pass it.
    """
    if not exists(out) or is_empty_directory(out):
        return
    complete = is_complete(out)
    if not overwrite:
        state = "complete" if complete else "incomplete"
        raise OutputExistsError(
            f"output {out} already exists ({state}); pass --overwrite to replace it"
        )
    if not complete and not replace_incomplete:
        raise OutputExistsError(
            f"refusing to replace {out}: it has no {SUCCESS_MARKER} marker, so it is not a "
            "published twotower output (or its writer died before finishing); --overwrite "
            "only replaces published outputs: remove it yourself or choose another path"
        )


@contextlib.contextmanager
def staged_output(
    out: str, *, overwrite: bool = False, replace_incomplete: bool = False
) -> Iterator[str]:
    """Yield a staging directory; on clean exit move it to ``out`` and write ``_SUCCESS`` last.

    On an exception the staging directory is removed and ``out`` is left as it was, so a
    failed run never leaves a visible partial output. Local moves are ``os.rename`` (atomic on
    one filesystem); on object stores the ``_SUCCESS`` marker is what readers check.
    """
    check_writable(out, overwrite=overwrite, replace_incomplete=replace_incomplete)
    staging = _staging_path(out)
    makedirs(staging)
    try:
        yield staging
    except BaseException:
        with contextlib.suppress(Exception):
            remove(staging)
        raise
    publish_directory(staging, out)


def publish_directory(staging: str, out: str) -> None:
    """Move a finished staging directory to ``out`` (replacing it) and write ``_SUCCESS`` last."""
    fs, staging_inner = resolve(staging)
    _, out_inner = resolve(out)
    trash = None
    if exists(out):
        trash = _staging_path(out).replace("._staging-", "._replaced-")
        fs.move(out_inner, resolve(trash)[1])
    fs.move(staging_inner, out_inner)
    write_text(join(out, SUCCESS_MARKER), utc_now() + "\n")
    if trash is not None:
        remove(trash)


def replace_file_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old or the new content, never a mix."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    write_text(tmp, text)
    fs, tmp_inner = resolve(tmp)
    fs.move(tmp_inner, resolve(path)[1])


def save_torch(path: str, obj: Any) -> None:
    """``torch.save`` to a local path or URI (written to a temp name, then moved)."""
    import io as _io

    import torch

    buffer = _io.BytesIO()
    torch.save(obj, buffer)
    fs, inner = resolve(path)
    parent = posixpath.dirname(inner) if "://" in str(path) else os.path.dirname(inner)
    if parent:
        fs.create_dir(parent, recursive=True)
    tmp = f"{inner}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as stream:
        stream.write(buffer.getvalue())
    fs.move(tmp, inner)


def load_torch(path: str) -> Any:
    import io as _io

    import torch

    fs, inner = resolve(path)
    with fs.open_input_stream(inner) as stream:
        data = stream.read()
    return torch.load(_io.BytesIO(data), map_location="cpu", weights_only=False)


def copy_tree(source: str, destination: str) -> None:
    """Copy a directory (local or URI) recursively."""
    src_fs, src_inner = resolve(source)
    dst_fs, dst_inner = resolve(destination)
    pafs.copy_files(src_inner, dst_inner, source_filesystem=src_fs, destination_filesystem=dst_fs)


def count_rows(path: str) -> int:
    """Rows in a Parquet file or directory, from the footers (no data read)."""
    import pyarrow.dataset as pads

    fs, inner = resolve(path)
    return pads.dataset(inner, filesystem=fs, format="parquet", partitioning="hive").count_rows()


def list_files(path: str) -> list[str]:
    """Files under a directory, recursively, sorted; a file itself gives ``[path]``.

    Names starting with ``_`` or ``.`` anywhere below ``path`` (``_SUCCESS``, staging dirs,
    ``.crc`` files) are skipped, as Parquet readers skip them. URIs stay URIs.
    """
    fs, inner = resolve(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.File:
        return [str(path)]
    if info.type != pafs.FileType.Directory:
        return []
    found = []
    for entry in fs.get_file_info(pafs.FileSelector(inner, recursive=True)):
        if entry.type != pafs.FileType.File:
            continue
        relative = entry.path[len(inner) :].lstrip("/")
        if any(part.startswith(("_", ".")) for part in relative.split("/")):
            continue
        found.append(join(str(path), relative) if "://" in str(path) else entry.path)
    return sorted(found)


def read_parquet_metadata(path: str) -> pq.FileMetaData:
    """The footer of one Parquet file (schema, row groups, column statistics); no data read."""
    fs, inner = resolve(path)
    with fs.open_input_file(inner) as stream:
        return pq.read_metadata(stream)


def read_parquet_row_groups(
    path: str, row_groups: list[int], *, columns: list[str] | None = None
) -> pa.Table:
    """Some row groups of one Parquet file (the unit of work of a read task)."""
    fs, inner = resolve(path)
    with fs.open_input_file(inner) as stream:
        return pq.ParquetFile(stream).read_row_groups(row_groups, columns=columns)


def ray_read_parquet(path: str, *, columns: list[str] | None = None):
    """A Ray Dataset over a Parquet file or directory (the embed and train jobs' reads).

    Read with Ray Data's V1 Parquet path: the V2 path (the default in Ray 2.60) adds a
    listing task whose latency was a fixed ~2 s per read here (a 4,096-row file: 2.4 s end to
    end against 0.3 s), which is most of an embed job on a small table. The flag only picks
    the read path of the Dataset being built, so the context is restored right after.
    """
    import ray.data

    with data_context(use_datasource_v2=False):
        return ray.data.read_parquet(path, columns=columns)


@contextlib.contextmanager
def data_context(**settings: Any) -> Iterator[None]:
    """Ray Data context values for the Datasets made inside, restored on exit.

    A Dataset keeps a copy of the context it was made under, so the process-wide context
    (and every other Dataset) is left as it was.
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    previous = {name: getattr(context, name) for name in settings}
    for name, value in settings.items():
        setattr(context, name, value)
    try:
        yield
    finally:
        for name, value in previous.items():
            setattr(context, name, value)


def absolute(path: str | None) -> str | None:
    """A local path made absolute (URIs and ``None`` unchanged).

    Jobs resolve their paths once, on the driver: Ray Train refuses a relative storage path,
    and Ray workers need not share the driver's working directory.
    """
    if path is None or "://" in str(path):
        return path
    return os.path.abspath(os.fspath(path))
