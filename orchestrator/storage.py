"""Files in a sweep's storage, wherever it is: a local folder or a URI that pyarrow opens (s3://,
gs://, file://), as Ray's own storage is. A location is the storage joined with a path inside it;
a URI keeps its query (`s3://bucket/runs?endpoint_override=...`), which pyarrow reads as options."""

from __future__ import annotations

import os


def join(storage: str, *parts: str) -> str:
    """<storage>/<parts...>: an absolute local path, or the URI with the parts before its query."""
    if "://" not in storage:
        return os.path.join(os.path.abspath(os.path.expanduser(storage)), *parts)
    base, sep, query = storage.partition("?")
    return "/".join([base.rstrip("/"), *parts]) + sep + query


def filesystem(location: str):
    """(pyarrow filesystem, path in it) for a local path or a URI."""
    import pyarrow.fs

    if "://" not in location:
        return pyarrow.fs.LocalFileSystem(), os.path.abspath(location)
    return pyarrow.fs.FileSystem.from_uri(location)


def write_bytes(location: str, data: bytes) -> None:
    """Write the file, creating its folders."""
    fs, path = filesystem(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def read_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def delete(location: str) -> None:
    """Remove the file if it is there."""
    import pyarrow.fs

    fs, path = filesystem(location)
    if fs.get_file_info(path).type == pyarrow.fs.FileType.File:
        fs.delete_file(path)
