"""node.drift on real files: what the rolling check of the secondary's copy calls changed by
hand (kind, size, mtime past a coarse filesystem's slack, a link's target, gone), and that it
judges only what the pair agreed on, a slice at a time, round every folder."""
from __future__ import annotations

import os

from sbs.node.drift import MTIME_SLACK_NS, DriftCheck, drifted
from sbs.node.filters import Filter
from sbs.node.index import HashCache, scan_folder
from sbs.node.journal import Agreed


def tree(root):
    (root / "d").mkdir()
    (root / "d" / "f.txt").write_text("the primary's\n")
    (root / "g.txt").write_text("another\n")
    os.symlink("g.txt", root / "link")
    return scan_folder(str(root), Filter(), HashCache())


def test_what_counts_as_changed_here(tmp_path):
    index = tree(tmp_path)
    root = str(tmp_path)
    assert not any(drifted(root, e) for e in index.values())
    f = tmp_path / "d" / "f.txt"
    mtime = index["d/f.txt"]["mtime_ns"]
    os.utime(f, ns=(mtime, mtime + MTIME_SLACK_NS // 2))  # a coarser clock's rounding
    assert not drifted(root, index["d/f.txt"])
    os.utime(f, ns=(mtime, mtime + 10 * 10**9))  # touched by hand
    assert drifted(root, index["d/f.txt"])
    os.utime(f, ns=(mtime, mtime))
    f.write_text("edited by hand, longer\n")
    os.utime(f, ns=(mtime, mtime))  # even with its mtime put back: the size
    assert drifted(root, index["d/f.txt"])
    (tmp_path / "link").unlink()
    os.symlink("d", tmp_path / "link")
    assert drifted(root, index["link"])
    (tmp_path / "g.txt").unlink()
    assert drifted(root, index["g.txt"])
    f.unlink()
    (tmp_path / "d").rmdir()
    (tmp_path / "d").write_text("a file where the folder was\n")
    assert drifted(root, index["d"]) and drifted(root, index["d/f.txt"])


def test_only_what_was_agreed_is_judged_a_slice_at_a_time(tmp_path):
    index = tree(tmp_path)
    agreed = Agreed(tmp_path.parent / f"{tmp_path.name}-agreed.jsonl")
    agreed.update([("docs", p, Agreed.token(e)) for p, e in index.items() if p != "g.txt"])
    (tmp_path / "g.txt").unlink()  # never agreed (pending, in flight, refused): not judged
    (tmp_path / "d" / "f.txt").unlink()
    check = DriftCheck()
    seen = []
    for _ in range(len(index)):  # one object a look
        found = check.look({"docs": index}, {"docs": str(tmp_path)}, agreed.get, Agreed.token,
                           budget=1)
        seen += [e["path"] for e in found.get("docs", [])]
    assert seen == ["d/f.txt"]
    assert check.look({"docs": index}, {}, agreed.get, Agreed.token) == {}
    assert check.order == {}  # a folder no longer looked at is forgotten
