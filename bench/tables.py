"""The READMEs' figure tables, rendered from one cited run's JSON files.

    python bench/tables.py bench/results/<run ID>            # print the tables (Markdown)
    python bench/tables.py bench/results/<run ID> --write    # and put them into the READMEs

Every figure in the output is read from the run's JSON (bench/run_cited.py writes them): the
median with its min-max range across reps, and run 1 / run 2 side by side for the replication
runs. A table is headed by the run ID and the command line of each JSON it uses; a target
verdict is computed from the bench's own `targets` in the JSON, never typed in. A row whose
figure is in no JSON of the run is left out and named at the end ("not in this run").

`--write` replaces the text between `<!-- tables:NAME:start -->` and `<!-- tables:NAME:end -->`
in README.md and bench/README.md; a table this run cannot fill leaves its old text in place.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# what bench/run_cited.py makes by default; a manifest in the run folder overrides it
EXPECTED = ("transport", "takeover", "sentinel_takeover", "replication-1", "replication-2")
SETTINGS = ("default", "aggressive")


class Run:
    """The JSON files of one run folder, and what was expected there but is missing."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.json: dict[str, dict[str, Any]] = {}
        self.unreadable: dict[str, str] = {}
        for path in sorted(folder.glob("*.json")):
            if path.name == "manifest.json":
                continue
            try:
                j = json.loads(path.read_text())
                if isinstance(j, dict) and "provenance" not in j and "git" in j:
                    # bench/idle.py before it nested its provenance: the same keys, flat
                    j["provenance"] = {k: j[k] for k in ("command", "git", "run_id",
                                                          "started_utc", "loadavg_at_start")
                                       if k in j}
                self.json[path.stem] = j
            except (OSError, ValueError) as e:
                self.unreadable[path.name] = str(e)
        expected = list(EXPECTED)
        self.failed: dict[str, Any] = {}  # name -> exit code, from the manifest
        manifest = folder / "manifest.json"
        if manifest.exists():
            try:
                runs = json.loads(manifest.read_text())["runs"]
                expected += [r["name"] for r in runs if r["name"] not in expected]
                self.failed = {r["name"]: r.get("exit_code") for r in runs
                               if r.get("exit_code") != 0}
            except (OSError, ValueError, KeyError, TypeError) as e:
                self.unreadable["manifest.json"] = str(e)
        self.missing = [n for n in expected if n not in self.json]
        self.not_in_run: list[str] = []  # rows left out, "table: row"

    def get(self, name: str) -> dict[str, Any] | None:
        return self.json.get(name)

    def replications(self) -> list[tuple[str, dict[str, Any]]]:
        names = sorted((n for n in self.json if re.fullmatch(r"replication-\d+", n)),
                       key=lambda n: int(n.split("-")[1]))
        return [(n, self.json[n]) for n in names]

    def not_citable(self) -> list[str]:
        """Why these figures may not go into a README: a --quick run or uncommitted code."""
        why = []
        for name, j in self.json.items():
            if j.get("quick") or dig(j, "args", "quick"):
                why.append(f"{name}.json is a --quick run")
            if dig(j, "provenance", "git", "dirty"):
                why.append(f"{name}.json ran on uncommitted code{uncommitted(j)}")
        return why

    def run_id(self) -> str:
        for j in self.json.values():
            if rid := j.get("provenance", {}).get("run_id"):
                return rid
        return self.folder.name


# ------------------------------------------------------------------------------ formatting


def dig(obj: Any, *keys: Any) -> Any:
    """obj[k1][k2]..., or None where any step is missing."""
    for k in keys:
        if isinstance(obj, dict) and k in obj:
            obj = obj[k]
        elif isinstance(obj, list) and isinstance(k, int) and -len(obj) <= k < len(obj):
            obj = obj[k]
        else:
            return None
    return obj


def num(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "?"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def med(s: dict[str, Any] | None, unit: str = "", digits: int = 2, scale: float = 1.0,
        key: str = "median") -> str | None:
    """'1.39 s (1.05–1.50, n=20)' from a spread (median/min/max/n), or None without one."""
    if not s or s.get(key) is None:
        return None
    value = f"{num(s[key] * scale, digits)}{unit}"
    if s.get("n") == 1:
        return f"{value} (n=1)"
    n = f", n={s['n']}" if s.get("n") is not None else ""
    if s.get("min") is None or s.get("max") is None:
        return f"{value} ({n[2:]})" if n else value
    lo, hi = num(s["min"] * scale, digits), num(s["max"] * scale, digits)
    # a dash between two numbers reads as a minus when the first is negative
    sep = " to " if s["min"] < 0 else "–"
    return f"{value} ({lo}{sep}{hi}{n})"


def per_run(cells: list[str | None]) -> str | None:
    """Run 1 / run 2 side by side; a run without the figure shows '–'."""
    if all(c is None for c in cells):
        return None
    return " / ".join(c if c is not None else "–" for c in cells)


def verdict(flags: list[bool | None]) -> str | None:
    """'met', 'not met' or 'met / not met' over the runs; None when no run has a verdict."""
    if all(f is None for f in flags):
        return None
    words = ["–" if f is None else ("met" if f else "**not met**") for f in flags]
    return words[0] if len(set(words)) == 1 else " / ".join(words)


def copies_on(fs: dict[str, Any] | None) -> str | None:
    """Where a run wrote its copies, as the table's heading says it (runs before 2026-12-07
    did not record it: they wrote to the data folder's filesystem)."""
    if not fs or not fs.get("type"):
        return None
    journal = {True: " with its journal", False: " without a journal"}.get(fs.get("journal"), "")
    made = "a fresh " if fs.get("made") else ""
    return f"copies written to {made}{fs['type']}{journal}"


def uncommitted(j: dict[str, Any]) -> str:
    """What a run's provenance says of its uncommitted files: ": a, b" (the first three, and
    how many more), or "" when it does not list them."""
    files = dig(j, "provenance", "git", "dirty_files") or []
    more = f" and {len(files) - 3} more" if len(files) > 3 else ""
    return f": {', '.join(files[:3])}{more}" if files else ""


def header(title: str, sources: list[tuple[str, dict[str, Any]]]) -> str:
    lines = [title]
    for name, j in sources:
        prov = j.get("provenance", {})
        dirty = f" (uncommitted code{uncommitted(j)})" if dig(prov, "git", "dirty") else ""
        host = j.get("host") or j.get("machine") or {}
        where = [f"{host['cpus']} CPUs" if host.get("cpus") else None,
                 f"Python {host['python']}" if host.get("python") else None,
                 f"pyzmq {host['pyzmq']} / libzmq {host.get('libzmq')}"
                 if host.get("pyzmq") else None,
                 " ".join(host["rsync"].split()[:3]) if host.get("rsync") else None,
                 (f"load average {prov['loadavg_at_start'][0]:.1f} at the start"
                  if prov.get("loadavg_at_start") else None),
                 copies_on(j.get("copies_fs"))]
        said = ", ".join(w for w in where if w)
        lines.append(f"- run `{prov.get('run_id', '?')}`, `{name}.json`{dirty}: "
                     f"`{prov.get('command', '(no command recorded)')}`"
                     + (f" ({said})" if said else ""))
    return "\n".join(lines)


class Table:
    """A Markdown table whose rows without a figure are left out and remembered."""

    def __init__(self, run: Run, name: str, columns: list[str]) -> None:
        self.run, self.name, self.columns = run, name, columns
        self.rows: list[list[str]] = []

    def row(self, label: str, *cells: str | None) -> None:
        if all(c is None for c in cells):
            self.run.not_in_run.append(f"{self.name}: {label}")
            return
        self.rows.append([label, *("" if c is None else c for c in cells)])

    def markdown(self) -> str | None:
        if not self.rows:
            return None
        out = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        out += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(out)


# ------------------------------------------------------------------------------ failover


def _sentinel(st: dict[str, Any] | None, setting: str, how: str) -> dict[str, Any] | None:
    for r in (st or {}).get("results", []):
        if r.get("setting") == setting and r.get("how") == how:
            return r
    return None


def _setting_label(j: dict[str, Any] | None, setting: str) -> str:
    hb, da = dig(j, "takeover", setting, "heartbeat"), dig(j, "takeover", setting, "dead_after")
    return f"{setting} {hb:g} / {da:g} s" if hb is not None and da is not None else setting


def failover(run: Run) -> str | None:
    """README.md's Failover table: takeover.json and sentinel_takeover.json."""
    tk, st = run.get("takeover"), run.get("sentinel_takeover")
    if tk is None and st is None:
        run.not_in_run.append("failover: the whole table (no takeover.json, "
                              "no sentinel_takeover.json)")
        return None
    cols = [""]
    for s in SETTINGS:
        r = _sentinel(st, s, "kill")
        hb = dig(tk, "takeover", s, "heartbeat") or (r or {}).get("heartbeat")
        da = dig(tk, "takeover", s, "dead_after") or (r or {}).get("dead_after")
        cols.append(f"{s}: heartbeat {hb:g} s, dead_after {da:g} s" if hb and da else s)
    t = Table(run, "failover", cols)

    def takeover_cell(s: str) -> str | None:
        tt = dig(tk, "takeover", s)
        if not tt or not tt.get("takeover"):
            return None
        failed = f", {tt['failures']} failed" if tt.get("failures") else ""
        return med(tt["takeover"], " s", key="p50") + failed

    t.row("`kill -9` of the primary → the other says `primary`, median (min–max, kills)",
          *(takeover_cell(s) for s in SETTINGS))

    def sentinel_cell(s: str, how: str, fig: str, digits: int = 0) -> str | None:
        return med(dig(_sentinel(st, s, how), "summary_ms", fig), " ms", digits)

    t.row("`kill -9` of the primary → its sentinel answers on the new primary",
          *(sentinel_cell(s, "kill", "to_new_sentinel_ms") for s in SETTINGS))
    for how, what in (("term", "SIGTERM"), ("promote", "`promote`")):
        t.row(f"{what} → the other is primary, after the old primary's sentinel stopped",
              *(sentinel_cell(s, how, "old_sentinel_gone_to_peer_primary_ms", 1)
                for s in SETTINGS))
        t.row(f"{what} → the other is primary, from the {'signal' if how == 'term' else 'request'}",
              *(sentinel_cell(s, how, "to_peer_primary_ms", 1) for s in SETTINGS))
        t.row(f"{what} → its sentinel answers on the new primary",
              *(sentinel_cell(s, how, "to_new_sentinel_ms") for s in SETTINGS))
    nt = run.get("never_twice")

    def lease_cell() -> str | None:
        tk_nt = dig(nt, "takeover")
        if not tk_nt:
            return None
        parts = []
        for c in tk_nt.values():
            k = c.get("kill_to_sentinel")
            if not k:
                continue
            how = (f"ttl {c['cluster']['ttl']:g} / loop_wait {c['cluster']['loop_wait']:g} s"
                   if c.get("cluster") else "two-node")
            parts.append(f"{how}: {med(k, ' s', key='p50')}"
                         + (f", {c['failures']} failed" if c.get("failures") else "")
                         + f", {c.get('overlaps', '?')} overlaps")
        return "; ".join(parts) or None

    t.row("`kill -9` of the primary → its sentinel starts on the peer (recorded by the sentinel), "
          "two-node and with the etcd lease, median (min–max, kills)", lease_cell(), None)

    def stops_cell() -> str | None:
        fs = dig(nt, "false_stops")
        if not fs:
            return None
        return "; ".join(f"{mode}: {r.get('false_stops', '?')} in {r.get('seconds', 0):g} s "
                         f"({r.get('hogs', '?')} busy loops, {r.get('overlaps', '?')} overlaps)"
                         for mode, r in fs.items())

    t.row("false stops of the sentinel under load (guard; etcd lease), defaults",
          stops_cell(), None)

    def false_cell(s: str) -> str | None:
        ft = dig(tk, "false_takeover", s)
        if not ft:
            return None
        share = ""
        if ft.get("max_silence") is not None and ft.get("dead_after"):
            share = (f" (longest silence {ft['max_silence']:.2f} s = "
                     f"{100 * ft['max_silence'] / ft['dead_after']:.0f} % of dead_after)")
        return f"{ft.get('takeovers', '?')}{share}"

    secs = dig(tk, "false_takeover", "default", "seconds")
    t.row(f"false takeovers, both cores at 100 % for {secs:g} s" if secs else "false takeovers",
          *(false_cell(s) for s in SETTINGS))
    body = t.markdown()
    if body is None:
        return None
    used = [(n, j) for n, j in (("takeover", tk), ("sentinel_takeover", st),
                                ("never_twice", nt)) if j]
    return header("**Failover**", used) + "\n\n" + body


# ------------------------------------------------------------------------------ bench/README


def takeover_tables(run: Run) -> str | None:
    """bench/README.md's takeover.py tables: takeover time, then false takeovers under load."""
    tk = run.get("takeover")
    if tk is None:
        run.not_in_run.append("takeover: both tables (no takeover.json)")
        return None
    t1 = Table(run, "takeover", ["setting", "kills", "min", "p50", "p90", "max",
                                 "p50 / max ÷ dead_after", "rejoin p50 (min–max)"])
    for s in SETTINGS:
        tt = dig(tk, "takeover", s)
        if not tt or not dig(tt, "takeover", "n"):
            t1.row(s, None)
            continue
        x, ratio = tt["takeover"], tt.get("ratio") or {}
        t1.row(_setting_label(tk, s), f"{x['n']}, {tt.get('failures', '?')} failed",
               f"{num(x['min'], 3)} s", f"{num(x['p50'], 3)} s", f"{num(x['p90'], 3)} s",
               f"{num(x['max'], 3)} s", f"{num(ratio.get('p50'))} / {num(ratio.get('max'))}",
               med(tt.get("rejoin"), " s", key="p50"))
    secs = dig(tk, "false_takeover", "default", "seconds")
    t2 = Table(run, "takeover", [f"setting, {secs:g} s at 100 % CPU" if secs else "setting",
                                 "takeovers", "role changes", "two primaries", "missed status",
                                 "max silence", "status p90 (worse node)"])
    for s in SETTINGS:
        ft = dig(tk, "false_takeover", s)
        if not ft:
            t2.row(f"false takeovers, {s}", None)
            continue
        nodes = (ft.get("nodes") or {}).values()
        asked = sum(n.get("answers", 0) + n.get("missed", 0) for n in nodes)
        p90 = [dig(n, "status_latency", "p90") for n in nodes]
        p90 = [p for p in p90 if p is not None]
        t2.row(_setting_label(tk, s), str(ft.get("takeovers", "?")),
               str(ft.get("role_changes", "?")), str(ft.get("dual_primary_samples", "?")),
               f"{ft.get('missed', '?')} / {asked}", f"{num(ft.get('max_silence'), 3)} s",
               f"{max(p90) * 1e3:.0f} ms" if p90 else "?")
    parts = [p for p in (t1.markdown(), t2.markdown()) if p]
    if not parts:
        return None
    return header("takeover.py", [("takeover", tk)]) + "\n\n" + "\n\n".join(parts)


def sentinel_table(run: Run) -> str | None:
    """bench/README.md's sentinel_takeover.py table: every figure, per setting and way."""
    st = run.get("sentinel_takeover")
    if st is None:
        run.not_in_run.append("sentinel_takeover: the table (no sentinel_takeover.json)")
        return None
    figs = (("to_new_sentinel_ms", "→ new sentinel answers", 0),
            ("to_peer_primary_ms", "→ peer primary", 1),
            ("to_old_sentinel_gone_ms", "→ old sentinel gone", 1),
            ("old_sentinel_gone_to_peer_primary_ms", "old sentinel gone → peer primary", 1),
            ("peer_primary_to_new_sentinel_ms", "peer primary → new sentinel", 1))
    t = Table(run, "sentinel_takeover",
              ["setting", "how", *(f"{label}, ms" for _, label, _ in figs)])
    for r in st.get("results", []):
        label = f"{r.get('setting')} {r.get('heartbeat', 0):g} / {r.get('dead_after', 0):g} s"
        t.row(label, r.get("how"),
              *(med(dig(r, "summary_ms", key), "", d) for key, _, d in figs))
    body = t.markdown()
    if body is None:
        return None
    return (header("sentinel_takeover.py (median, min–max, runs; from the signal or request "
                   "unless said)", [("sentinel_takeover", st)]) + "\n\n" + body)


def transport_table(run: Run) -> str | None:
    """bench/README.md's transport.py table (MB/s, the best rep; every rep's range beside)."""
    tr = run.get("transport")
    if tr is None:
        run.not_in_run.append("transport: the table (no transport.json)")
        return None
    cases = [("256 KiB plain", 256, False), ("1 MiB plain", 1024, False),
             ("256 KiB CURVE", 256, True), ("1 MiB CURVE", 1024, True)]
    t = Table(run, "transport", ["pattern", *(c[0] for c in cases)])
    rows: dict[tuple[str, int, bool], dict[tuple[int, bool], dict[str, Any]]] = {}
    for x in tr.get("throughput", []):
        key = (x.get("pattern", "?"), x.get("window", 0), bool(x.get("copy")))
        rows.setdefault(key, {})[(x.get("chunk_kib"), bool(x.get("curve")))] = x

    def cell(x: dict[str, Any] | None) -> str | None:
        if not x or x.get("MBps") is None:
            return None
        reps = x.get("every_rep_MBps") or []
        rng = f" (reps {num(min(reps), 0)}–{num(max(reps), 0)})" if len(reps) > 1 else ""
        return f"{num(x['MBps'], 0)}{rng}"

    for (pattern, window, copy), by_case in rows.items():
        label = f"{pattern}, {window} in flight" + (", copying receive" if copy else "")
        t.row(label, *(cell(by_case.get((kib, curve))) for _, kib, curve in cases))
    body = t.markdown()
    if body is None:
        return None
    extra = []
    cf = tr.get("cipher_floor") or {}
    if cf.get("encrypt_cpu_s_per_GiB") is not None:
        extra.append(f"CURVE's cipher alone (`cipher_floor`, {cf.get('chunk_kib', '?')} KiB "
                     f"messages): {num(cf['encrypt_cpu_s_per_GiB'])} CPU-s per GiB to encrypt, "
                     f"{num(cf.get('decrypt_cpu_s_per_GiB'))} to decrypt.")
    else:
        run.not_in_run.append("transport: CURVE's cipher alone")
    for rt in tr.get("round_trip", []):
        extra.append(f"Round trip of a {rt.get('bytes')}-byte request, "
                     f"{'CURVE' if rt.get('curve') else 'plain'}: p50 {rt.get('p50_ms')} ms, "
                     f"p99 {rt.get('p99_ms')} ms ({rt.get('samples')} samples).")
    return (header("transport.py (MB/s, the best rep of each case, the others' range beside)",
                   [("transport", tr)]) + "\n\n" + body
            + ("\n\n" + "\n".join(extra) if extra else ""))


# ------------------------------------------------------------------------------ replication


def _vs(j: dict[str, Any], scenario: str, label: str) -> str | None:
    """A ratio of medians with the per-rep range: '0.63 (0.51–0.71)'."""
    c = dig(j, scenario, "summary", "vs", label)
    if not c or c.get("ratio_of_medians") is None:
        return None
    s = c.get("per_rep_spread") or {}
    rng = f" ({num(s['min'])}–{num(s['max'])})" if s.get("n", 0) > 1 else ""
    return f"{num(c['ratio_of_medians'])}{rng}"


def _of(n: int | None) -> str:
    """'median of 5, ' for a row's label; nothing when the JSON does not say."""
    return f"median of {n}, " if n else ""


def _below(x: float | None, limit: float | None) -> bool | None:
    return None if x is None or limit is None else x < limit


def replication(run: Run) -> str | None:
    """README.md's Replication table: every replication-N.json, run 1 / run 2 side by side."""
    reps = run.replications()
    if not reps:
        run.not_in_run.append("replication: the whole table (no replication-N.json)")
        return None
    js = [j for _, j in reps]
    t = Table(run, "replication", ["", "SBS", "rsync daemon", "SBS / rsync", "target"])

    def each(f: Any) -> str | None:
        return per_run([f(j) for j in js])

    def spread_of(*keys: Any, unit: str = "", digits: int = 2) -> str | None:
        return each(lambda j: med(dig(j, *keys), unit, digits))

    def target(*keys: Any) -> str | None:
        return verdict([dig(j, *keys) for j in js])

    j0 = js[0]
    files, size = dig(j0, "small", "files"), dig(j0, "small", "file_bytes")
    what = f"{files:,} × {size // 1024} KiB" if files and size else "small files"
    n = _of(dig(j0, "small", "summary", "seconds", "sbs", "n"))
    not_slower = each(lambda j: (f"{dig(j, 'small', 'summary', 'reps_sbs_not_slower')} of "
                                 f"{dig(j, 'small', 'summary', 'seconds', 'sbs', 'n')}")
                      if dig(j, "small", "summary", "reps_sbs_not_slower") is not None else None)
    small_target = target("small", "summary", "target_met")
    t.row(f"initial sync, {what} ({n}min–max)",
          spread_of("small", "summary", "seconds", "sbs", unit=" s"),
          spread_of("small", "summary", "seconds", "rsync", unit=" s"),
          each(lambda j: _vs(j, "small", "sbs / rsync (seconds)")),
          (f"≤ 1: {small_target}" + (f"; reps SBS not slower {not_slower}" if not_slower
                                      else "")) if small_target else None)
    t.row("the same against `rsync --fsync` (as durable as SBS)", None,
          spread_of("small", "summary", "seconds", "rsync_fsync", unit=" s"),
          each(lambda j: _vs(j, "small", "sbs / rsync_fsync (seconds)")), None)
    mib = dig(j0, "big", "bytes")
    big = f"{mib / (1 << 30):g} GiB" if mib and mib >= 1 << 30 else (
        f"{mib // (1 << 20)} MiB" if mib else "big")
    nb = _of(dig(j0, "big", "summary", "MBps", "sbs_live", "n"))
    t.row(f"one {big} file appearing in a running pair, CURVE ({nb}min–max), MB/s",
          spread_of("big", "summary", "MBps", "sbs_live", digits=0),
          spread_of("big", "summary", "MBps", "rsync", digits=0),
          each(lambda j: _vs(j, "big", "sbs_live / rsync (MB/s)")),
          (f"> 1: {v}" if (v := target("big", "summary", "target_met", "live")) else None))
    t.row("the same over plain TCP (rsync's daemon is plaintext too), MB/s",
          spread_of("big", "summary", "MBps", "sbs_live_plain", digits=0), None,
          each(lambda j: _vs(j, "big", "sbs_live_plain / rsync (MB/s)")), None)
    peers = sorted({k for j in js for k in (dig(j, "big", "summary", "MBps") or {})
                    if k.startswith("rsync_ssh_")})
    for peer in peers:
        t.row(f"the same, CURVE, against rsync over ssh ({peer[len('rsync_ssh_'):]}), MB/s",
              None, spread_of("big", "summary", "MBps", peer, digits=0),
              each(lambda j, p=peer: _vs(j, "big", f"sbs_live / {p} (MB/s)")), None)

    def cpu(j: dict[str, Any]) -> str | None:
        c = dig(j, "big", "cpu_s_per_GiB") or {}
        parts = [f"{label} {med(c.get(k), '', 2)}" for k, label in
                 (("sbs_live", "CURVE"), ("sbs_live_plain", "plain TCP")) if c.get(k)]
        return ", ".join(parts) or None

    t.row("CPU-s per GiB of that transfer, both ends (whole processes)", each(cpu),
          spread_of("big", "cpu_s_per_GiB", "rsync"), None, None)
    t.row("CURVE's cipher alone, both ends (libsodium, called directly), CPU-s per GiB",
          each(lambda j: (num(v) if (v := dig(j, "big", "cpu_s_per_GiB",
                                                "curve_cipher_both_sides")) is not None
                          else None)), None, None, None)
    t.row(f"one {big} file, initial sync including starting the secondary, CURVE, MB/s",
          spread_of("big", "summary", "MBps", "sbs_initial", digits=0), None,
          each(lambda j: _vs(j, "big", "sbs_initial / rsync (MB/s)")),
          (f"> 1: {v}" if (v := target("big", "summary", "target_met", "initial_sync"))
           else None))

    def rsync_mem(j: dict[str, Any]) -> str | None:
        xs = dig(j, "big", "rsync") or []
        cl = [x["client_peak_mb"] for x in xs if x.get("client_peak_mb") is not None]
        dm = [x["daemon_peak_mb_sampled"] for x in xs
              if x.get("daemon_peak_mb_sampled") is not None]
        return (f"{max(cl):.0f} MB client, {max(dm):.0f} MB daemon" if cl and dm else None)

    limit = dig(j0, "targets", "big_memory_mb")
    t.row(f"peak memory per node, {big} file (the larger node, all reps)",
          each(lambda j: (f"{v:.0f} MB" if (v := dig(j, "big", "summary", "peak_node_mb"))
                          is not None else None)),
          each(rsync_mem), None,
          (f"< {limit} MB: {v}" if (v := verdict([
              _below(dig(j, "big", "summary", "peak_node_mb"), dig(j, "targets", "big_memory_mb"))
              for j in js])) else None))

    def lat(j: dict[str, Any], *keys: str) -> str | None:
        x = dig(j, *keys)
        if not x or x.get("p50_ms") is None:
            return None
        return (f"p50 {num(x['p50_ms'], 1)}, p99 {num(x['p99_ms'], 1)}, max "
                f"{num(x['max_ms'], 0)} ms ({x.get('samples')} samples, "
                f"{x.get('timed_out')} timed out)")

    def trigger(j: dict[str, Any], *keys: str) -> str | None:
        x = dig(j, *keys)
        if not x or x.get("p50_ms") is None:
            return None
        return (f"p50 {num(x['p50_ms'], 0)} ms ({num(x.get('min_ms'), 0)}–"
                f"{num(x.get('max_ms'), 0)}) per whole-tree run")

    def lat_ok(j: dict[str, Any], *keys: str) -> bool | None:
        x, tg = dig(j, *keys), j.get("targets") or {}
        if not x or x.get("p50_ms") is None or "latency_p50_ms" not in tg:
            return None
        return (x["p50_ms"] < tg["latency_p50_ms"] and x["p99_ms"] < tg["latency_p99_ms"]
                and not x.get("timed_out"))

    p50, p99 = dig(j0, "targets", "latency_p50_ms"), dig(j0, "targets", "latency_p99_ms")
    for label, keys, rkeys, rat in (
            ("change → replica latency, small file, near-empty tree", ("latency", "sbs"),
             ("latency", "rsync_trigger_per_change"),
             ("latency", "ratio_sbs_p50_over_rsync_trigger_p50")),
            (f"the same in a {dig(j0, 'tree', 'files') or '?':,}-file tree",
             ("tree", "sbs_latency"), ("tree", "rsync_trigger_per_change"),
             ("tree", "ratio_latency_sbs_p50_over_rsync_trigger_p50"))):
        ok = verdict([lat_ok(j, *keys) for j in js])
        t.row(label, each(lambda j, k=keys: lat(j, *k)),
              each(lambda j, k=rkeys: trigger(j, *k)),
              (f"{r} (a trigger, not a watcher: not like for like)"
               if (r := each(lambda j, k=rat: (num(v, 3) if (v := dig(j, *k)) is not None
                                               else None))) else None),
              f"p50 < {p50}, p99 < {p99} ms: {ok}" if ok else None)
    tf = dig(j0, "tree", "files")
    nt = _of(dig(j0, "tree", "summary", "seconds", "sbs", "n"))
    t.row(f"initial sync, {tf or '?':,} × 1 KiB ({nt}min–max)",
          spread_of("tree", "summary", "seconds", "sbs", unit=" s"),
          spread_of("tree", "summary", "seconds", "rsync", unit=" s"),
          each(lambda j: _vs(j, "tree", "sbs / rsync (seconds)")),
          f"≤ 0.8: {v}" if (v := verdict([
              None if (r := dig(j, "tree", "summary", "vs", "sbs / rsync (seconds)",
                                "ratio_of_medians")) is None else r <= 0.8
              for j in js])) else None)
    t.row(f"the {tf or '?':,} files against `rsync --fsync` (as durable as SBS)", None,
          spread_of("tree", "summary", "seconds", "rsync_fsync", unit=" s"),
          each(lambda j: _vs(j, "tree", "sbs / rsync_fsync (seconds)")), None)
    if any(dig(j, "tree", "summary", "seconds", "sbs_together") for j in js):
        t.row("the same, both nodes started at once (no lone wait for the peer)",
              spread_of("tree", "summary", "seconds", "sbs_together", unit=" s"),
              spread_of("tree", "summary", "seconds", "rsync", unit=" s"),
              each(lambda j: _vs(j, "tree", "sbs_together / rsync (seconds)")), None)
    t.row(f"peak memory, {tf or '?':,} files (alpha; beta), MB",
          each(lambda j: (f"{med(a, '', 0)}; {med(b, '', 0)}"
                          if (a := dig(j, "tree", "summary", "peak_mb", "alpha"))
                          and (b := dig(j, "tree", "summary", "peak_mb", "beta")) else None)),
          None, None,
          f"< 100 MB each: {v}" if (v := verdict([
              None if not (pk := dig(j, "tree", "summary", "peak_mb")) else
              all((pk.get(n) or {}).get("max", 1e9) < 100 for n in ("alpha", "beta"))
              for j in js])) else None)

    def idle(j: dict[str, Any]) -> str | None:
        x = dig(j, "tree", "idle_cpu_pct_of_one_core")
        if not x or x.get("primary") not in x:
            return None
        other = "beta" if x["primary"] == "alpha" else "alpha"
        return (f"{num(x[x['primary']], 1)} % of one core (primary; secondary "
                f"{num(x.get(other), 1)} %, over {x.get('seconds')} s)")

    t.row(f"idle pair watching {tf or '?':,} files", each(idle), None, None, None)
    idle_run = run.get("idle")  # bench/idle.py, a longer window than the tree scenario's 30 s
    if idle_run and idle_run.get("pct_of_one_core"):
        pct, primary = idle_run["pct_of_one_core"], idle_run.get("primary")
        other = [n for n in pct if n != primary]
        t.row(f"idle pair watching {idle_run.get('files', 0):,} files, "
              f"{idle_run.get('idle_seconds', 0):g} s window (`idle.json`)",
              f"{num(pct.get(primary), 2)} % of one core (primary; secondary "
              f"{num(pct.get(other[0]) if other else None, 2)} %)", None, None,
              "< 1 %: " + ("met" if (pct.get(primary) or 100) < 1 else "**not met**"))
    t.row("pyzmq limit on loopback, 1 MiB chunks, 8 in flight (same run), MB/s",
          each(lambda j: (f"CURVE {num(c, 0)}, plain {num(p, 0)}"
                          if (c := dig(j, "big", "transport_limit", "curve_MBps")) is not None
                          and (p := dig(j, "big", "transport_limit", "plain_MBps")) is not None
                          else None)), None, None, None)
    body = t.markdown()
    if body is None:
        return None
    title = ("**Replication** (" + " / ".join(n for n, _ in reps)
             + " side by side; median (min–max) over the reps of each run)")
    sources = reps + ([("idle", idle_run)] if idle_run and idle_run.get("pct_of_one_core")
                      else [])
    return header(title, sources) + "\n\n" + body


# ------------------------------------------------------------------------------ rejoin


def rejoin_table(run: Run) -> str | None:
    """README.md's failover cycle over a big tree (bench/rejoin.py): with the hash cache on
    disk, without it, and rsync confirming the same unchanged tree."""
    j = run.get("rejoin")
    if j is None:
        run.not_in_run.append("rejoin: the table (no rejoin.json)")
        return None
    summ = j.get("summary", {})

    def reads(kind: str, key: str) -> str | None:
        counts = [x.get(key) for x in j.get(f"sbs_{kind}", []) if x.get(key) is not None]
        if not counts:
            return None
        lo, hi = min(counts), max(counts)
        return f"{lo:,}" if lo == hi else f"{lo:,}–{hi:,}"

    def both(key: str, unit: str, digits: int = 2, read: str | None = None
             ) -> tuple[str | None, str | None]:
        out = []
        for kind in ("cached", "uncached"):
            cell = med(dig(summ, key, kind), unit, digits)
            if cell is not None and read and (r := reads(kind, read)) is not None:
                cell += f"; files read {r}"
            out.append(cell)
        return out[0], out[1]

    def ratio(key: str) -> str | None:
        x = dig(summ, key, "cached_over_uncached")
        return None if x is None else f"{x:.2f}"

    files = j.get("files")
    t = Table(run, "rejoin", ["", "with the hash cache", "without it (hashes removed)",
                              "cached / uncached (medians)"])
    t.row("`kill -9` of the primary → the survivor is primary with its first scan done",
          *both("ready_s", " s"), ratio("ready_s"))
    t.row("that first scan, after it became primary",
          *both("scan_s", " s", read="scan_read"), ratio("scan_s"))
    t.row("the survivor's CPU from the kill to ready, CPU-s",
          *both("takeover_cpu_s", ""), ratio("takeover_cpu_s"))
    t.row("the old primary started again → a synced secondary",
          *both("rejoin_s", " s", read="rejoin_read"), ratio("rejoin_s"))
    t.row("its CPU for that, CPU-s", *both("rejoin_cpu_s", ""), ratio("rejoin_cpu_s"))
    rs = summ.get("rsync") or {}
    t.row("the peer: rsync confirming the same unchanged tree from its daemon",
          (f"`rsync -a` (size and mtime) {m}" if (m := med(rs.get("quick_s"), " s"))
           else None),
          (f"`rsync -ac` (reads every file) {m}" if (m := med(rs.get("checksum_s"), " s"))
           else None), None)
    body = t.markdown()
    if body is None:
        return None
    title = (f"**A failover cycle over {files or '?':,} files** (median (min–max) over the reps; "
             f"replicas identical afterwards: {'yes' if j.get('replicas_identical') else 'NO'})")
    return header(title, [("rejoin", j)]) + "\n\n" + body


# ------------------------------------------------------------------------------ output

def _cpu(results: list[dict[str, Any]] | None, *keys: str) -> dict[str, Any] | None:
    """The spread of one CPU figure over a copier's reps, or None when the JSON lacks it."""
    vals = [v for r in results or [] if (v := dig(r, *keys)) is not None]
    if not vals:
        return None
    return {"n": len(vals), "median": statistics.median(vals), "min": min(vals),
            "max": max(vals)}


def ext4_table(run: Run) -> str | None:
    """README.md's replication on a fresh journalled ext4 (`replication.py --fresh-ext4`):
    the same scenarios as the Replication table, with the copies on a filesystem like a
    production server's rather than this VM's root filesystem. None when the run has no
    `replication-ext4.json` (the README's table is then left as it is)."""
    j = run.get("replication-ext4")
    if j is None:
        return None
    t = Table(run, "ext4", ["", "SBS", "rsync daemon", "SBS / rsync",
                            "`rsync --fsync`", "SBS / `rsync --fsync`"])

    def spread(scenario: str, copier: str) -> str | None:
        return med(dig(j, scenario, "summary", "seconds", copier), " s")

    for scenario in ("small", "tree"):
        files = dig(j, scenario, "files")
        size = dig(j, scenario, "file_bytes") or (1024 if scenario == "tree" else None)
        if files is None:
            continue
        n = _of(dig(j, scenario, "summary", "seconds", "sbs", "n"))
        what = f"{files:,} × {size // 1024} KiB" if size else f"{files:,} files"
        t.row(f"initial sync, {what} ({n}min–max)", spread(scenario, "sbs"),
              spread(scenario, "rsync"), _vs(j, scenario, "sbs / rsync (seconds)"),
              spread(scenario, "rsync_fsync"), _vs(j, scenario, "sbs / rsync_fsync (seconds)"))
        if dig(j, scenario, "summary", "seconds", "sbs_together"):
            t.row("the same, both nodes started at once", spread(scenario, "sbs_together"),
                  None, _vs(j, scenario, "sbs_together / rsync (seconds)"), None, None)
        t.row(f"kernel CPU-s of the receiving side, {what} (SBS's secondary; rsync's client)",
              med(_cpu(dig(j, scenario, "sbs"), "cpu_s", "beta", "process sys"), " s"),
              med(_cpu(dig(j, scenario, "rsync"), "client_sys_s"), " s"), None,
              med(_cpu(dig(j, scenario, "rsync_fsync"), "client_sys_s"), " s"), None)
        t.row(f"user CPU-s of the receiving side, {what}",
              med(_cpu(dig(j, scenario, "sbs"), "cpu_s", "beta", "process user"), " s"),
              med(_cpu([{"u": r["client_cpu_s"] - r["client_sys_s"]}
                        for r in dig(j, scenario, "rsync") or []
                        if "client_cpu_s" in r and "client_sys_s" in r], "u"), " s"),
              None, None, None)
    body = t.markdown()
    if body is None:
        run.not_in_run.append("ext4: the table (no initial syncs in replication-ext4.json)")
        return None
    return (header("**Replication with the copies on a fresh ext4 with its journal** "
                   "(median (min–max) over the reps)", [("replication-ext4", j)])
            + "\n\n" + body)


# marker name -> (file, renderer)
SECTIONS = {
    "failover": ("README.md", failover),
    "replication": ("README.md", replication),
    "rejoin": ("README.md", rejoin_table),
    "ext4": ("README.md", ext4_table),
    "takeover": ("bench/README.md", takeover_tables),
    "sentinel": ("bench/README.md", sentinel_table),
    "transport": ("bench/README.md", transport_table),
}


def render(folder: Path) -> tuple[dict[str, str | None], Run]:
    """Every section's Markdown (None where the run has none of its figures), and the run."""
    run = Run(folder)
    tables: dict[str, str | None] = {}
    for name, (_, fn) in SECTIONS.items():
        before = len(run.not_in_run)
        body = fn(run)
        left_out = [x.split(": ", 1)[1] for x in run.not_in_run[before:]]
        if body is not None and left_out:
            # said in the README too, so a row that disappears is not silently dropped
            body += f"\n\nNot in run `{run.run_id()}`: {'; '.join(left_out)}."
        tables[name] = body
    return tables, run


def report(run: Run) -> str:
    lines = []
    if run.missing:
        lines.append(f"missing JSON in {run.folder}: {', '.join(f'{n}.json' for n in run.missing)}")
    for name, code in run.failed.items():
        lines.append(f"{name}: the bench exited with {code} (manifest.json; see {name}.log)")
    for name, why in run.unreadable.items():
        lines.append(f"unreadable JSON: {name}: {why}")
    if run.not_in_run:
        lines.append("not in this run:")
        lines += [f"- {x}" for x in run.not_in_run]
    return "\n".join(lines)


def replace_between(text: str, name: str, body: str) -> str:
    start, end = f"<!-- tables:{name}:start -->", f"<!-- tables:{name}:end -->"
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"markers {start} ... {end} not found")
    # a blank line before the end marker: a table must end before the comment starts
    return text[:i + len(start)] + "\n" + body.strip() + "\n\n" + text[j:]


def write(tables: dict[str, str | None], root: Path = REPO) -> list[str]:
    """Put each rendered table between its markers; a table not rendered keeps its old text.
    Every file is checked before any is written, so a missing marker changes nothing."""
    texts: dict[str, str] = {}
    done = []
    for name, (rel, _) in SECTIONS.items():
        body = tables.get(name)
        if body is None:
            continue
        texts[rel] = replace_between(texts.get(rel) or (root / rel).read_text(), name, body)
        done.append(f"{rel}: {name}")
    for rel, text in texts.items():
        (root / rel).write_text(text)
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="bench/results/<run ID> (or bench/out/<run ID>)")
    ap.add_argument("--write", action="store_true",
                    help="replace the tables between the marker comments in README.md and "
                         "bench/README.md")
    ap.add_argument("--force", action="store_true",
                    help="--write even a --quick run or one of uncommitted code")
    ap.add_argument("--root", type=Path, default=REPO, help=argparse.SUPPRESS)  # for the tests
    args = ap.parse_args(argv)
    if not args.run_dir.is_dir():
        print(f"{args.run_dir}: not a folder", file=sys.stderr)
        return 2
    tables, run = render(args.run_dir)
    if not run.json:
        print(f"{args.run_dir}: no bench JSON in it", file=sys.stderr)
        return 2
    for name, body in tables.items():
        if body is not None:
            print(f"<!-- {name} ({SECTIONS[name][0]}) -->\n{body}\n")
    print(report(run))
    if args.write:
        if (why := run.not_citable()) and not args.force:
            print(f"nothing written: {'; '.join(why)} (a README cites full runs of committed "
                  f"code; --force to write anyway)", file=sys.stderr)
            return 2
        try:
            done = write(tables, args.root)
        except ValueError as e:
            print(f"nothing written: {e}", file=sys.stderr)
            return 2
        print("written: " + ("; ".join(done) if done else "nothing"), file=sys.stderr)
    return 1 if run.missing or run.unreadable or run.failed else 0


if __name__ == "__main__":
    sys.exit(main())
