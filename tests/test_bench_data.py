"""The benches' kept data: a folder is reused only when its marker names the size asked for."""
from __future__ import annotations

from pathlib import Path

from bench.replication import KiB, kept_tree


def files_in(root: Path) -> int:
    return sum(1 for p in root.rglob("*") if p.is_file())


def test_a_marker_left_by_another_size_does_not_vouch_for_the_tree(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    assert files_in(kept_tree(data, 300)) == 300  # a "full" run
    assert files_in(kept_tree(data, 120)) == 120  # a smaller (--quick) run in between
    # the full run again: the first run's marker must not make it reuse 120 files
    src = kept_tree(data, 300)
    assert files_in(src) == 300
    assert sorted(p.name for p in data.glob("tree.*.done")) == [f"tree.300x{KiB}.done"]
    (src / "d0000" / "f000000.bin").write_bytes(b"x")  # kept as it is while the marker fits
    assert (kept_tree(data, 300) / "d0000" / "f000000.bin").read_bytes() == b"x"
