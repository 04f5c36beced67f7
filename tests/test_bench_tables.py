"""bench/tables.py renders the READMEs' tables from a run's JSON, and only from it.

The fixture is a real `python bench/run_cited.py --quick` run, trimmed of the per-rep detail the
tables do not read (tests/data/bench_run_quick/)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import tables

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "data" / "bench_run_quick"
RUN_ID = "20261204T195033Z-6675bfe262-quick"


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / RUN_ID
    shutil.copytree(FIXTURE, d)
    return d


def edit(path: Path, change) -> None:
    j = json.loads(path.read_text())
    change(j)
    path.write_text(json.dumps(j))


def test_the_tables_carry_the_run_id_the_command_and_the_json_figures(run_dir: Path) -> None:
    out, run = tables.render(run_dir)
    assert run.missing == [] and run.json.keys() >= {"takeover", "replication-2"}
    takeover = json.loads((run_dir / "takeover.json").read_text())
    for name in ("failover", "replication", "takeover", "sentinel", "transport"):
        assert out[name] is not None and f"run `{RUN_ID}`" in out[name], name
    assert takeover["provenance"]["command"] in out["failover"]
    p50 = takeover["takeover"]["default"]["takeover"]["p50"]
    assert f"| {p50:.3f} s |" in out["takeover"]
    # run 1 / run 2 side by side, each from its own file
    r1, r2 = (json.loads((run_dir / f"replication-{i}.json").read_text()) for i in (1, 2))
    ours = [r["small"]["summary"]["seconds"]["sbs"]["median"] for r in (r1, r2)]
    assert f"{ours[0]:.2f} s (n=1) / {ours[1]:.2f} s (n=1)" in out["replication"]


def test_a_changed_value_in_the_json_is_the_value_in_the_table(run_dir: Path) -> None:
    def slower(j: dict) -> None:
        j["takeover"]["aggressive"]["takeover"].update(min=0.111, p50=0.222, max=0.999)

    def small(j: dict) -> None:
        j["small"]["summary"]["seconds"]["sbs"].update(n=5, median=7.77, min=6.66, max=8.88)

    edit(run_dir / "takeover.json", slower)
    edit(run_dir / "replication-2.json", small)
    out, _ = tables.render(run_dir)
    assert "0.22 s (0.11–1.00, n=" in out["failover"]
    assert "| 0.111 s | 0.222 s |" in out["takeover"]
    assert "/ 7.77 s (6.66–8.88, n=5)" in out["replication"]


def test_target_verdicts_come_from_the_json_targets(run_dir: Path) -> None:
    before, _ = tables.render(run_dir)
    row = next(r for r in before["replication"].splitlines() if "near-empty tree" in r)
    assert row.endswith("p50 < 25, p99 < 100 ms: met |")
    # the same latencies against a tighter target of the bench's own: not met, in run 1 only
    edit(run_dir / "replication-1.json", lambda j: j["targets"].update(latency_p50_ms=1))
    after, _ = tables.render(run_dir)
    row = next(r for r in after["replication"].splitlines() if "near-empty tree" in r)
    assert row.endswith("p50 < 1, p99 < 100 ms: **not met** / met |")
    # a verdict the bench itself wrote (small files against rsync) is shown as written
    row = next(r for r in after["replication"].splitlines() if "× 4 KiB" in r)
    assert "≤ 1: **not met**;" in row
    edit(run_dir / "replication-2.json",
         lambda j: j["small"]["summary"].update(target_met=True))
    again, _ = tables.render(run_dir)
    row = next(r for r in again["replication"].splitlines() if "× 4 KiB" in r)
    assert "≤ 1: **not met** / met;" in row


def test_a_missing_json_is_reported_and_its_rows_listed(run_dir: Path) -> None:
    (run_dir / "sentinel_takeover.json").unlink()
    (run_dir / "replication-2.json").unlink()
    done = subprocess.run([sys.executable, "bench/tables.py", str(run_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "missing JSON" in done.stdout
    assert "sentinel_takeover.json, replication-2.json" in done.stdout
    assert "- sentinel_takeover: the table (no sentinel_takeover.json)" in done.stdout
    # the failover rows that only sentinel_takeover.json has are gone, and said to be
    rows = [r for r in done.stdout.splitlines() if r.startswith("| `kill -9`")]
    assert rows and not any("its sentinel answers" in r for r in rows)
    assert "failover: `kill -9` of the primary → its sentinel answers" in done.stdout
    assert "`replication-2.json`" not in done.stdout


def test_write_replaces_only_the_text_between_the_markers(run_dir: Path,
                                                          tmp_path: Path) -> None:
    root = tmp_path / "repo"
    (root / "bench").mkdir(parents=True)
    for rel in ("README.md", "bench/README.md"):
        shutil.copyfile(REPO / rel, root / rel)
    start, end = "<!-- tables:failover:start -->", "<!-- tables:failover:end -->"
    text = (root / "README.md").read_text()
    # whatever the README holds today, an older table stands between the markers
    before, rest = text.split(start)
    (root / "README.md").write_text(before + start + "\n| an older table | 1.05 s |\n"
                                    + end + rest.split(end)[1])
    old = (root / "README.md").read_text()
    out, _ = tables.render(run_dir)
    tables.write(out, root)
    new = (root / "README.md").read_text()
    assert new.split(start)[0] == old.split(start)[0]
    assert new.split(end)[1].split("<!-- tables:replication:start -->")[0] == \
        old.split(end)[1].split("<!-- tables:replication:start -->")[0]
    assert out["failover"] in new.split(start)[1].split(end)[0]
    assert "an older table" in old and "an older table" not in new
    tables.write(out, root)  # a second write changes nothing
    assert (root / "README.md").read_text() == new
    # a file without its markers: an error, and no file written
    bench_before = (root / "bench" / "README.md").read_text()
    (root / "README.md").write_text(new.replace(end, ""))
    with pytest.raises(ValueError, match="tables:failover"):
        tables.write(out, root)
    assert (root / "bench" / "README.md").read_text() == bench_before


def test_write_refuses_a_quick_run_unless_forced(run_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "repo"
    (root / "bench").mkdir(parents=True)
    for rel in ("README.md", "bench/README.md"):
        shutil.copyfile(REPO / rel, root / rel)
    old = (root / "README.md").read_text()
    assert tables.main([str(run_dir), "--write", "--root", str(root)]) == 2
    assert (root / "README.md").read_text() == old
    assert tables.main([str(run_dir), "--write", "--force", "--root", str(root)]) == 0
    assert f"run `{RUN_ID}`" in (root / "README.md").read_text()


def test_never_twice_and_idle_runs_kept_beside_the_run_fill_their_rows(run_dir: Path) -> None:
    out, run = tables.render(run_dir)
    assert "two-node:" not in out["failover"] and "idle.json" not in out["replication"]
    assert any("etcd lease" in r for r in run.not_in_run)
    prov = {"command": "python bench/never_twice.py", "run_id": RUN_ID,
            "git": {"commit": "6675bfe262", "dirty": False}}
    never = {"provenance": prov, "takeover": {
        "two-node": {"cluster": None, "failures": 0, "overlaps": 0,
                     "kill_to_sentinel": {"n": 5, "min": 1.4, "p50": 1.49, "max": 1.54}},
        "lease-default": {"cluster": {"ttl": 10, "loop_wait": 2}, "failures": 1, "overlaps": 0,
                          "kill_to_sentinel": {"n": 4, "min": 8.9, "p50": 10.42, "max": 10.7}}},
        "false_stops": {"guard": {"seconds": 60.0, "hogs": 2, "false_stops": 0, "overlaps": 0},
                        "lease": {"seconds": 60.0, "hogs": 2, "false_stops": 3,
                                  "overlaps": 0}}}
    (run_dir / "never_twice.json").write_text(json.dumps(never))
    # idle.py's JSON as it was first written: the provenance keys flat at the top
    idle = {"files": 100_000, "idle_seconds": 240.1, "primary": "beta",
            "pct_of_one_core": {"alpha": 0.37, "beta": 0.81}, **prov}
    (run_dir / "idle.json").write_text(json.dumps(idle))
    out, run = tables.render(run_dir)
    assert "two-node: 1.49 s (1.40–1.54, n=5), 0 overlaps" in out["failover"]
    assert "ttl 10 / loop_wait 2 s: 10.42 s (8.90–10.70, n=4), 1 failed" in out["failover"]
    assert "guard: 0 in 60 s (2 busy loops, 0 overlaps); lease: 3 in 60 s" in out["failover"]
    assert "`never_twice.json`: `python bench/never_twice.py`" in out["failover"]
    row = next(r for r in out["replication"].splitlines() if r.startswith("|") and "idle.json" in r)
    assert "100,000 files, 240.1 s window" in row
    assert "0.81 % of one core (primary; secondary 0.37 %)" in row and row.endswith("met |")
    assert "`idle.json`: `python bench/never_twice.py`" in out["replication"]  # its command
    # a dirty idle run is not citable, flat provenance or not
    idle["git"] = {"commit": "6675bfe262", "dirty": True}
    (run_dir / "idle.json").write_text(json.dumps(idle))
    _, run = tables.render(run_dir)
    assert "idle.json ran on uncommitted code" in run.not_citable()
    # the files it lists are named, where the run is cited and where it is refused
    idle["git"] = {"commit": "6675bfe262", "dirty": True,
                   "dirty_files": [f"tests/t{i}.py" for i in range(5)]}
    (run_dir / "idle.json").write_text(json.dumps(idle))
    out, run = tables.render(run_dir)
    named = "uncommitted code: tests/t0.py, tests/t1.py, tests/t2.py and 2 more"
    assert f"`idle.json` ({named})" in out["replication"]
    assert f"idle.json ran on {named}" in run.not_citable()


def test_the_rejoin_table_is_made_from_rejoin_json_and_says_what_each_read(run_dir: Path
                                                                           ) -> None:
    """bench/rejoin.py's run (a real one, kept in bench/results/) in a cited run's folder: the
    failover cycle's table, cached against uncached, the files each read, rsync beside."""
    out, run = tables.render(run_dir)
    assert out["rejoin"] is None and any(x.startswith("rejoin:") for x in run.not_in_run)
    kept = REPO / "bench/results/20261206T194136Z-0416597e6e/rejoin.json"
    shutil.copyfile(kept, run_dir / "rejoin.json")

    def changed(j: dict) -> None:
        j["summary"]["ready_s"]["cached"].update(median=1.234, min=1.111, max=2.222)
        j["sbs_uncached"][0]["rejoin_read"] = 99_000
        j["replicas_identical"] = False

    out, _ = tables.render(run_dir)
    assert "20261206T194136Z-0416597e6e" in out["rejoin"] and "replicas identical" in out["rejoin"]
    assert "files read 0 |" in out["rejoin"] and "files read 100,000 |" in out["rejoin"]
    assert "`rsync -a` (size and mtime) 0.43 s" in out["rejoin"]
    edit(run_dir / "rejoin.json", changed)
    out, _ = tables.render(run_dir)
    assert "| 1.23 s (1.11–2.22, n=5) |" in out["rejoin"]
    assert "files read 99,000–100,000" in out["rejoin"] and "afterwards: NO" in out["rejoin"]


def test_the_heading_says_where_the_copies_were_written(run_dir: Path) -> None:
    out, _ = tables.render(run_dir)
    assert "copies written to" not in out["replication"]  # the fixture's runs did not record it
    edit(run_dir / "replication-1.json", lambda j: j.update(copies_fs={
        "type": "ext4", "journal": False, "device": "/dev/vda", "mount_point": "/"}))
    edit(run_dir / "replication-2.json", lambda j: j.update(copies_fs={
        "made": "fresh ext4 on a loop device (--fresh-ext4)", "type": "ext4", "journal": True}))
    out, _ = tables.render(run_dir)
    assert "copies written to ext4 without a journal" in out["replication"]
    assert "copies written to a fresh ext4 with its journal" in out["replication"]


def test_the_tree_row_against_rsync_fsync_comes_from_the_json(run_dir: Path) -> None:
    files = json.loads((run_dir / "replication-1.json").read_text())["tree"]["files"]
    label = f"the {files:,} files against `rsync --fsync` (as durable as SBS)"
    out, _ = tables.render(run_dir)
    assert f"| {label} |" not in out["replication"] and label in out["replication"]  # left out

    def add(j: dict) -> None:
        j["tree"]["summary"]["seconds"]["rsync_fsync"] = {
            "n": 1, "median": 61.25, "min": 61.25, "max": 61.25, "values": [61.25]}
        j["tree"]["summary"]["vs"]["sbs / rsync_fsync (seconds)"] = {
            "of": "seconds", "ratio_of_medians": 0.163, "per_rep": [0.163]}
    for i in (1, 2):
        edit(run_dir / f"replication-{i}.json", add)
    out, _ = tables.render(run_dir)
    row = next(line for line in out["replication"].splitlines() if line.startswith(f"| {label}"))
    assert "61.25 s (n=1) / 61.25 s (n=1)" in row and "| 0.16 / 0.16 |" in row


def test_the_fresh_ext4_table_is_made_from_its_own_json_and_left_alone_by_other_runs(
        run_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "repo"
    (root / "bench").mkdir(parents=True)
    for rel in ("README.md", "bench/README.md"):
        shutil.copyfile(REPO / rel, root / rel)
    start, end = "<!-- tables:ext4:start -->", "<!-- tables:ext4:end -->"
    out, _ = tables.render(run_dir)  # the cited kind of run: no replication-ext4.json
    assert out["ext4"] is None
    before = (root / "README.md").read_text().split(start)[1].split(end)[0]
    tables.write(out, root)
    assert (root / "README.md").read_text().split(start)[1].split(end)[0] == before

    ext4 = tmp_path / "ext4-run"
    ext4.mkdir()
    j = json.loads((run_dir / "replication-1.json").read_text())
    j["copies_fs"] = {"made": "fresh ext4 on a loop device (--fresh-ext4)", "type": "ext4",
                      "journal": True}
    j["tree"]["summary"]["seconds"]["rsync_fsync"] = {
        "n": 1, "median": 59.88, "min": 59.88, "max": 59.88, "values": [59.88]}
    j["tree"]["summary"]["vs"]["sbs / rsync_fsync (seconds)"] = {
        "of": "seconds", "ratio_of_medians": 0.157, "per_rep": [0.157]}
    j["tree"]["rsync"][0].update(client_sys_s=1.82, client_cpu_s=2.14)
    (ext4 / "replication-ext4.json").write_text(json.dumps(j))
    out, _ = tables.render(ext4)
    body = out["ext4"]
    assert body is not None and "copies written to a fresh ext4 with its journal" in body
    tree_row = next(x for x in body.splitlines() if x.startswith("| initial sync, 5,000"))
    sbs_tree = j["tree"]["summary"]["seconds"]["sbs"]["median"]
    assert f"{sbs_tree:.2f} s" in tree_row and "59.88 s" in tree_row and "| 0.16 |" in tree_row
    kernel = next(x for x in body.splitlines() if x.startswith("| kernel CPU-s") and "5,000" in x)
    assert "1.82 s" in kernel
    user = next(x for x in body.splitlines() if x.startswith("| user CPU-s") and "5,000" in x)
    assert "0.32 s" in user
    tables.write(out, root)
    assert body in (root / "README.md").read_text().split(start)[1].split(end)[0]
    for name in ("failover", "replication"):  # the other tables are not this run's to write
        assert out[name] is None
