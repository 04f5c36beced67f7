"""Own lists versus pushed lists: which folders and sentinels this node runs.

A node has its own lists (sbs.ini's [folders] and [sentinels]) and the pair's lists, kept in
state_dir/pair.json with the sentinel list version `sv` and the stamp of their last edit
(node/listedits.py: an edit of either node's sbs.ini becomes the pair's lists). A node runs the
pair's lists; its own sbs.ini gives the paths of the folders it knows.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from . import persist, protocol
from .config import Config, FolderConfig
from .listedits import stamp_from
from .security import pinned_sentinels
from .sentinels import Sentinels
from .tree import PathError, check_abspath

log = logging.getLogger("sbs.node")

# pair.json's fields and their checks (node/persist.py load_doc): the snapshot's own, and the
# stamp, fingerprint and peer generation of node/listedits.py
PAIR_FIELDS = {
    "folders": protocol.FOLDERS, "paths": protocol.dict_of(protocol.s(4096), 1000),
    "sentinels": protocol.SENTINEL_DEFS, "active": protocol.ACTIVE, "sv": protocol.SEQ,
    "peer_gen": protocol.SEQ, "own_fp": protocol.s(64),
    "lists": lambda v: None if stamp_from(v) else "not a stamp",
}


class PairLists:
    def __init__(self, cfg: Config, sentinels: Sentinels, writes: persist.Guarded):
        self.cfg, self.sentinels, self.writes = cfg, sentinels, writes
        self.path = cfg.state_dir / "pair.json"
        # the pair's folders/sentinels; a field that is not usable is as if never received
        self.pair: dict[str, Any] = persist.load_doc(self.path, PAIR_FIELDS, then=(
            "this node runs its own sbs.ini's lists for what is missing until the pair's "
            "come from the peer"))
        self.sv = self.pair.get("sv", 0)  # sentinel list version

    def own_folders(self) -> dict[str, FolderConfig]:
        return {f.name: f for f in self.cfg.folders}

    def has_pushed(self) -> bool:
        return self.pair.get("folders") is not None

    def pushed_folders(self, lists: dict[str, Any] | None = None) -> dict[str, FolderConfig]:
        """The pair's folder list (or `lists`), with this node's own path for a name it knows
        and the editing node's path otherwise (the manual's same-paths-on-both-servers case)."""
        lists = self.pair if lists is None else lists
        own = self.own_folders()
        paths = lists.get("paths", {})
        table = {}
        for name, filters in lists.get("folders", {}).items():
            if (why := protocol.folder_name_problem(name)) is not None:
                log.error("folder %r from the primary: %s: not replicated", name[:64], why)
                continue
            try:  # a pushed path is held to the rules a path from the wire is (node/tree.py)
                path = own[name].path if name in own else Path(check_abspath(paths.get(name)))
            except PathError as exc:
                log.error("folder %r: no path here and no usable path from the primary (%s):"
                          " not replicated", name[:64], exc)
                continue
            table[name] = FolderConfig(name=name, path=path, filters=tuple(filters))
        return table

    def load_sentinels(self, *, own: bool, new_active: bool = False) -> None:
        """Own config's [sentinels] (before the role is known); the pair's copy as primary.
        `new_active`: a name the sentinels did not have before starts active (an edit)."""
        before = set(self.sentinel_defs())
        pushed = self.pair.get("sentinels")
        if pushed is not None and self.cfg.pin_sentinels:
            pushed = pinned_sentinels(pushed, dict(self.cfg.sentinels))
        if own or pushed is None:
            defs = dict(self.cfg.sentinels)
            if not defs and pushed:
                defs = dict(pushed)
        else:
            defs = dict(pushed)
        active = self.pair.get("active")
        if new_active and active is not None:
            active = [*active, *(n for n in defs if n not in before)]
        self.sentinels.configure(defs)
        self.sentinels.set_active([n for n in active if n in defs] if active is not None
                                  else list(defs))

    def sentinel_defs(self) -> dict[str, str]:
        return {s["name"]: s["command"] for s in self.sentinels.status()}

    def sentinel_fields(self) -> dict[str, Any]:
        """The sentinel list as the bus and a snapshot carry it."""
        return {"sentinels": self.sentinel_defs(), "active": self.sentinels.active, "sv": self.sv}

    @staticmethod
    def folder_fields(folders: dict[str, FolderConfig]) -> dict[str, Any]:
        """The folder list as a snapshot carries it."""
        return {"folders": {n: list(f.filters) for n, f in folders.items()},
                "paths": {n: str(f.path) for n, f in folders.items()}}

    def record_primary(self, folders: dict[str, FolderConfig]) -> None:
        """A primary pushes what it runs: kept as ours too, for a later restart."""
        self.pair.update(self.folder_fields(folders))
        self.pair.update(self.sentinel_fields())
        self.writes.save(self.path, self.pair)

    def take_snapshot(self, body: dict[str, Any]) -> dict[str, FolderConfig]:
        """The lists of a snapshot from the primary: kept, sentinels loaded, folders returned."""
        self.pair.update(folders=body["folders"], paths=body["paths"],
                         sentinels=body["sentinels"], active=body["active"], sv=body["sv"])
        self.sv = body["sv"]
        self.writes.save(self.path, self.pair)
        self.load_sentinels(own=False)
        return self.pushed_folders()

    def take_sentinels(self, body: dict[str, Any]) -> None:
        """A SENTINELS message from the primary."""
        self.sv = body["sv"]
        self.pair.update(sentinels=body["sentinels"], active=body["active"], sv=body["sv"])
        self.writes.save(self.path, self.pair)
        self.load_sentinels(own=False)

    def sentinels_changed(self) -> dict[str, Any]:
        """An operator changed the list here (the primary): a new version, kept; returns it."""
        self.sv += 1
        fields = self.sentinel_fields()
        self.pair.update(fields)
        self.writes.save(self.path, self.pair)
        return fields
