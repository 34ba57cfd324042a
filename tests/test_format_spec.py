"""docs/FORMAT.md is the spec: its field tables and constants must match the code's structs."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from imagechain.format import spec

DOC = (Path(__file__).parent.parent / "docs" / "FORMAT.md").read_text()
CODES = {"Q": "u64", "q": "i64", "I": "u32", "H": "u16", "B": "u8", "b": "i8"}


def doc_table(marker: str) -> list[list[str]]:
    m = re.search(rf"<!-- {re.escape(marker)} -->\n((?:\|.*\n)+)", DOC)
    assert m, f"no table marked {marker} in FORMAT.md"
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in m.group(1).splitlines()]
    return rows[2:]  # header and separator


def struct_fields(fmt: str) -> list[tuple[int, str]]:
    out = []
    for count, code in re.findall(r"(\d*)([a-zA-Z])", fmt.lstrip("<")):
        if code == "s":
            out.append((int(count), f"bytes[{count}]"))
        else:
            out.extend([(struct.calcsize("<" + code), CODES[code])] * int(count or 1))
    return out


def check(rows: list[list[str]], fields: list[tuple[int, str]], total: int) -> None:
    offset = 0
    for i, row in enumerate(rows):
        off, size, typ = int(row[0]), int(row[1]), row[2]
        assert off == offset, f"row {row[3]}: documented offset {off}, actual {offset}"
        if i < len(fields):
            assert (size, typ) == fields[i], f"row {row[3]}: documented {size} {typ}, code {fields[i]}"
        offset += size
    assert len(rows) >= len(fields)
    assert offset == total


@pytest.mark.parametrize(
    ("marker", "fmt", "total"),
    [
        ("struct: SEGMENT_HEADER", spec.SEGMENT_HEADER.format, spec.SEGMENT_HEADER_SIZE),
        ("struct: HEADER_FIXED", spec.HEADER_FIXED.format, spec.HEADER_FIXED_SIZE),
        ("struct: FOOTER", spec.FOOTER.format, spec.FOOTER_SIZE),
    ],
)
def test_struct_tables_match_code(marker: str, fmt: str, total: int) -> None:
    check(doc_table(marker), struct_fields(fmt), total)


@pytest.mark.parametrize(("marker", "dtype"), [("struct: INDEX_ENTRY", spec.INDEX_ENTRY),
                                                ("struct: FRAME_ENTRY", spec.FRAME_ENTRY)])  # fmt: skip
def test_entry_tables_match_dtypes(marker: str, dtype: object) -> None:
    import numpy as np

    assert isinstance(dtype, np.dtype)
    rows = doc_table(marker)
    names = dtype.names
    assert names is not None
    assert [r[3] for r in rows] == list(names)
    for row, name in zip(rows, names, strict=True):
        dt, off = dtype.fields[name][:2]  # type: ignore[index]
        assert int(row[0]) == off and int(row[1]) == dt.itemsize, name
    assert sum(int(r[1]) for r in rows) == dtype.itemsize


def test_constants_match_code() -> None:
    rows = doc_table("constants")
    assert len(rows) > 10
    for name, value in ((r[0], r[1]) for r in rows):
        actual = getattr(spec, name)
        if isinstance(actual, bytes):
            assert value == f"`{actual.decode()}`", name
        else:
            assert int(value) == actual, name


def test_header_fields_roundtrip_through_documented_offsets() -> None:
    """Pack a header with the code, read fields back at the offsets the document gives."""
    import uuid

    h = spec.PointHeader(
        point_id=uuid.uuid4(), chain_id=uuid.uuid4(), parent_id=uuid.uuid4(), parent_state=bytes(range(32)),
        host_id=b"H" * 16, source_id=b"S" * 16, sequence=7, block_size=65536, volume_size=123456789,
        created_us=1_700_000_000_000_000, kind=spec.KIND_INCREMENTAL, compression=spec.COMPRESSION_ZSTD,
        compression_level=-3, split_size=4000 << 20, metadata={"chain": "daily"},
    )  # fmt: skip
    raw = h.pack()
    rows = {r[3]: (int(r[0]), int(r[1]), r[2]) for r in doc_table("struct: HEADER_FIXED")}

    def field(name: str) -> object:
        off, size, typ = rows[name]
        if typ.startswith("bytes"):
            return raw[off : off + size]
        code = {v: k for k, v in CODES.items()}[typ]
        return struct.unpack_from("<" + code, raw, off)[0]

    assert field("point_id") == h.point_id.bytes
    assert field("sequence") == 7 and field("block_size") == 65536 and field("volume_size") == 123456789
    assert field("compression_level") == -3 and field("split_size") == 4000 << 20
    assert field("header_length") == len(raw)
    assert raw[-32:] == spec.b3(raw[:-32])
    assert spec.PointHeader.unpack(raw, "x") == h
