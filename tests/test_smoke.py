from pathlib import Path

from imagechain.address import open_point
from imagechain.engine.backup import backup
from imagechain.engine.restore import restore

from .conftest import write_volume


def test_full_then_incremental_roundtrip(tmp_path: Path, repo: Path) -> None:
    vol = tmp_path / "vol.img"
    first = write_volume(vol, 3 << 20, seed=1)
    r0 = backup(str(vol), str(repo))
    assert r0.kind == "full"
    data = bytearray(first)
    data[70_000:80_000] = b"y" * 10_000
    vol.write_bytes(data)
    r1 = backup(str(vol), str(repo))
    assert r1.kind == "incremental" and r1.changed_blocks == 1
    for sel, want in (("@0", first), ("@latest", bytes(data))):
        res = open_point(f"{repo}::default{sel}")
        out = tmp_path / f"out{sel[1:]}.img"
        restore(res.repo, res.point, str(out))
        assert out.read_bytes() == want
