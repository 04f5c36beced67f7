"""What a node kept of its own changes before it fell in line with its peer.

A split-brain loser, or a crashed primary that rejoins, may hold changes made during its own
term that never reached the peer. The syncer keeps every file it would overwrite or delete
that differs from what the pair last agreed on (node/journal). Without strict deletions the
files the peer lacks would simply stay in the live folder (and `verify` would differ for
ever): after such a term they are moved out too, into the same place:

    state_dir/conflicts/<UTC time>/<folder>/<path>

This module decides which of those files are the node's own (own_extras) and lists what is
kept (listing), for status and `sbs-tools conflicts`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .journal import Agreed


def own_extras(local: dict[str, dict], remote: dict[str, dict], agreed: Agreed,
               folder: str) -> list[dict]:
    """Local entries the peer lacks that this node made itself and never agreed on (a file
    created or changed during its own term); deepest first, so a folder follows its files.
    What the pair once agreed on and the peer later deleted is not among them: without
    strict deletions that stays, as ever."""
    out = [e for path, e in local.items() if path not in remote
           and Agreed.token(e) != agreed.get(folder, path)]
    return sorted(out, key=lambda e: e["path"], reverse=True)


def listing(state_dir: Path, limit: int = 10_000) -> list[dict[str, Any]]:
    """Every kept copy: {"time", "folder", "path", "size", "kept"}, newest first."""
    root = Path(state_dir) / "conflicts"
    out: list[dict[str, Any]] = []
    try:
        stamps = sorted((p for p in root.iterdir() if p.is_dir()), reverse=True)
    except OSError:
        return out
    for stamp in stamps:
        for folder in sorted(p for p in stamp.iterdir() if p.is_dir()):
            for dirpath, dirnames, filenames in os.walk(folder):
                dirnames.sort()
                for name in sorted(filenames):
                    full = Path(dirpath) / name
                    try:
                        size = full.lstat().st_size
                    except OSError:
                        continue
                    out.append({"time": stamp.name, "folder": folder.name,
                                "path": str(full.relative_to(folder)), "size": size,
                                "kept": str(full)})
                    if len(out) >= limit:
                        return out
    return out
