#!/usr/bin/env python3
"""Prints the rows of the Parquet files a Weir sink committed under a directory, sorted, as
`a|b|c` lines under a header of the column names.

    python3 sql/read_parquet.py /tmp/weir-readings

Only committed files are read: pyarrow's dataset discovery skips the sink's `_weir_staging/`
directory (names starting with `_` are not data), and Hive-style `col=value/` directories
(`partition_by`) become columns. Needs pyarrow (pip install pyarrow).
"""

import sys

import pyarrow.dataset as ds


def main() -> int:
    if len(sys.argv) != 2:
        print(f"usage: {sys.argv[0]} DIRECTORY", file=sys.stderr)
        return 2
    table = ds.dataset(sys.argv[1], format="parquet", partitioning="hive").to_table()
    names = table.column_names
    rows = [tuple(row[name] for name in names) for row in table.to_pylist()]
    rows.sort(key=lambda row: tuple((value is None, value) for value in row))
    print("|".join(names))
    for row in rows:
        print("|".join("" if value is None else str(value) for value in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
