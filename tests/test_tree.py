"""node/tree.py: the one walk (no recursion, no link followed) and the path rules."""
from __future__ import annotations

import os
import subprocess

import pytest
from sbs.node import tree


def _chain(root, depth: int) -> None:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = sub
    os.close(fd)


def test_walk_and_rmtree_go_deeper_than_the_recursion_limit_and_never_follow_a_link(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "keep.txt").write_text("not ours\n")
    _chain(root, 3000)
    os.symlink(outside, root / "link")
    (root / "f.txt").write_text("x")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        seen = [(rel, sorted(dirs), sorted(others)) for rel, _, dirs, others in tree.walk(fd)]
        assert len(seen) == 3001 and seen[0] == ("", ["d"], ["f.txt", "link"])
        assert seen[-1][0] == "/".join(["d"] * 3000)
        pruned = [rel for rel, _, dirs, _ in tree.walk(fd) if dirs.clear() is None]
        assert pruned == [""]  # a name taken out of dirs is not entered
        tree.rmtree(fd, "d")
        tree.rmtree(fd, "link")  # the link goes, not what it points at
        assert sorted(os.listdir(fd)) == ["f.txt"]
    finally:
        os.close(fd)
        # pytest removes old temp folders with shutil.rmtree, which recurses: never leave this
        subprocess.run(["rm", "-rf", str(root)], check=False, timeout=60)
    assert (outside / "keep.txt").read_text() == "not ours\n"
    assert len(os.listdir(f"/proc/{os.getpid()}/fd")) < 100  # every level's fd was closed


@pytest.mark.parametrize("path, problem", [
    ("rel/dir", "not an absolute"), ("/a\x00b", "NUL"), ("/a/../b", "'..'"),
    ("/a/./b", "'..'"), ("//a", "empty"), ("/a//b", "empty"), ("/" + "x" * 256, "longer"),
    ("/" + "x/" * 2100, "longer"), ("/\ud800", "not a byte of a name"), (None, "not a string"),
])
def test_check_abspath_refuses_what_a_pushed_folder_path_must_not_be(path, problem):
    with pytest.raises(tree.PathError, match=problem):
        tree.check_abspath(path)


def test_check_abspath_takes_a_plain_absolute_path():
    assert tree.check_abspath("/srv/data/docs") == "/srv/data/docs"
    assert tree.check_abspath("/srv/data/docs/") == "/srv/data/docs/"
