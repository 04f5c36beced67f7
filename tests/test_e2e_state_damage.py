"""A damaged state_dir: a file of the node's own holds JSON of the wrong shape, or a folder
stands where a file should. The node starts and says in its log which file it could not use
and why; it never ends with a traceback (a supervisor would restart it into the same crash)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pair import wait_for
from tests.test_e2e_replication import replication, started, wait_equal, write


def damage(state: Path, name: str, content: str | None) -> None:
    """state/name holds `content`, or is a folder (content None)."""
    state.mkdir(parents=True, exist_ok=True)
    if content is None:
        (state / name).mkdir()
        (state / name / "stray").write_text("a folder where the node keeps a file\n")
    else:
        (state / name).write_text(content)


def no_traceback(node) -> str:
    log = node.log.read_text(errors="replace")
    assert "Traceback" not in log, node.tail_log(40)
    return log


@pytest.mark.parametrize("name, content, said", [
    ("node.json", "[5, 7]", "node.json: a JSON list, not an object"),
    ("pair.json", '["docs"]', "pair.json: a JSON list, not an object"),
    ("pair.json", '{"folders": ["docs"], "sentinels": "idle", "active": 3, "sv": "x"}',
     "pair.json: ignoring folders (not an object), sentinels (not an object), active (not a list)"),
    ("maintenance.json", '{"on": "yes", "at": 1, "by": "alpha"}',
     "maintenance.json: not a maintenance record"),
    ("agreed.jsonl", None, "agreed.jsonl: cannot read it"),
])
def test_a_state_file_of_the_wrong_shape_is_named_and_the_node_runs(make_pair, name, content,
                                                                    said):
    pair = make_pair()
    damage(pair.root / "state" / "alpha", name, content)
    write(pair.folder("alpha") / "f.txt", "replicated all the same\n")
    started(pair)
    wait_equal(pair.folder("alpha"), pair.folder("beta"))
    assert replication(pair.beta)["synced"] is True
    assert said in no_traceback(pair.alpha), pair.alpha.tail_log(40)


def test_a_node_json_with_a_bad_epoch_keeps_the_highest_epoch_it_can_read(make_pair):
    """node.json's epoch is not a number, its max_seen_epoch is: the node's next term is still
    numbered above every primary it has seen (an old primary coming back must lose the rule)."""
    pair = make_pair()
    damage(pair.root / "state" / "alpha", "node.json",
           '{"epoch": "seven", "max_seen_epoch": 7, "last_role": "primary"}')
    pair.alpha.start()
    st = pair.alpha.wait_state("primary")
    assert st["epoch"] == 8, st
    log = no_traceback(pair.alpha)
    assert "node.json: ignoring epoch (not an integer)" in log, pair.alpha.tail_log(40)


def test_an_agreed_journal_that_is_a_folder_is_not_trusted_and_shown(make_pair):
    """agreed.jsonl cannot be read or written (a folder stands there): the node starts with
    an empty journal (more conflict copies, never fewer), keeps it in memory and shows the
    failing write in its status."""
    pair = make_pair()
    damage(pair.root / "state" / "beta", "agreed.jsonl", None)
    started(pair)
    write(pair.folder("alpha") / "f.txt", "replicated all the same\n")
    wait_equal(pair.folder("alpha"), pair.folder("beta"))
    st = wait_for(lambda: (s := pair.beta.status(1.0)) and "agreed.jsonl" in s["state_writes"]
                  and s, 10, "the failing journal in beta's status")
    assert "Is a directory" in st["state_writes"]["agreed.jsonl"]["error"], st
    log = no_traceback(pair.beta)
    assert "agreed.jsonl: cannot read it" in log and "starts empty" in log, pair.beta.tail_log()



@pytest.mark.parametrize("others", [[], [7, "x"]], ids=["clean", "entries_not_objects"])
def test_the_leftover_a_previous_run_recorded_is_killed_at_start(make_pair, others):
    """sentinels.pids.json of this boot names a sentinel a previous run left running (node and
    guard killed together): the node kills it as it starts, or the same service runs twice.
    With entries that are not objects beside it, those are named in the log and skipped."""
    from sbs.node.proctree import boot_id
    from sbs.node.sentinelpids import PIDS_FILE, start_ticks

    pair = make_pair()
    left = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            start_new_session=True)
    try:
        ticks = wait_for(lambda: start_ticks(left.pid), 5, "the leftover's start time")
        good = {"name": "left", "pid": left.pid, "start_ticks": ticks, "group": True}
        damage(pair.root / "state" / "alpha", PIDS_FILE, json.dumps(
            {"node_pid": 1, "boot_id": boot_id(), "children": [*others, good]}))
        pair.alpha.start()
        pair.alpha.wait_state("primary")
        wait_for(lambda: left.poll() is not None, 10, "the leftover to be killed")
    finally:
        left.kill()
        left.wait(5)
    log = no_traceback(pair.alpha)
    assert f"killed leftover sentinel left (pid {left.pid})" in log, pair.alpha.tail_log()
    if others:
        assert f"{PIDS_FILE}: ignoring 2 entries that are not objects" in log, pair.alpha.tail_log()


def test_a_state_dir_that_is_a_file_is_a_configuration_error(make_pair):
    """[node] state_dir names a file: the node cannot keep anything there. It refuses to start
    with exit 2 (a supervisor does not restart it into the same failure) and one line naming
    the file, the section and the key; it used to end with a FileExistsError traceback."""
    pair = make_pair()
    state = pair.root / "state" / "alpha"
    state.parent.mkdir(parents=True)
    state.write_text("a file where the node keeps its state\n")
    pair.alpha.start()
    assert pair.alpha.wait_exit(20) == 2, pair.alpha.tail_log()
    log = no_traceback(pair.alpha)
    assert f"[node] state_dir: {state} is not a folder" in log, log


def primary_with_a_wrong_cached_hash(pair, *, crc_too: bool) -> None:
    """alpha's hash cache (state_dir/hashes/docs.jsonl) holds f.txt with its stat right and
    one digit of its hash wrong: as a bad sector would leave it (its CRC no longer fits), or
    with its CRC made to fit (a hash that is wrong for another reason); alpha is started
    again, then beta."""
    from sbs.node.hashstore import cache_line

    a = pair.folder("alpha")
    write(a / "f.txt", "the real content\n")
    pair.alpha.start()
    pair.alpha.wait_state("primary")
    pair.alpha.stop()
    cache = pair.root / "state" / "alpha" / "hashes" / "docs.jsonl"
    head, line = wait_for(lambda: cache.exists() and cache.read_text().splitlines(), 10,
                          "alpha's saved hash cache")
    crc, body = line.split(" ", 1)
    row = json.loads(body)
    assert row[0] == "f.txt", row
    row[4] = ("1" if row[4][0] == "0" else "0") + row[4][1:]
    body = json.dumps(row, separators=(",", ":"))
    line = cache_line(body.encode()).decode() if crc_too else f"{crc} {body}"
    cache.write_text(f"{head}\n{line}\n")
    pair.alpha.start()
    pair.alpha.wait_state("primary")
    pair.beta.start()
    pair.beta.wait_state("secondary")


def test_a_file_whose_content_never_matches_the_primarys_hash_is_said(make_pair):
    """The primary's manifest gives a hash its file does not have: every fetch fails the
    check. The secondary keeps its copy as it was and says which file and why in its status
    and its log, instead of fetching it again every 0.3 s with no error at all."""
    pair = make_pair(node={"handover_timeout": 2})  # the stops do not wait for beta long
    primary_with_a_wrong_cached_hash(pair, crc_too=True)
    rep = wait_for(lambda: (r := replication(pair.beta)) and "f.txt" in r["error"] and r, 15,
                   "beta's status to name the file that never matches")
    assert "does not match" in rep["error"] and not rep["synced"], rep
    assert not (pair.folder("beta") / "f.txt").exists()
    log = pair.beta.log.read_text()
    assert "docs/f.txt: the content the primary sends never has the hash" in log, log


def test_a_damaged_line_of_the_primarys_hash_cache_is_skipped_and_the_file_replicates(
        make_pair):
    """One digit of a hash in alpha's hash cache changed on disk: the line's CRC no longer
    fits, so alpha skips it (and says so) and hashes the file again. It used to trust the
    line, whose stat still matched, and serve the wrong hash in every manifest: the file
    never reached the secondary."""
    pair = make_pair(node={"handover_timeout": 2})
    primary_with_a_wrong_cached_hash(pair, crc_too=False)
    wait_equal(pair.folder("alpha"), pair.folder("beta"), 10, "f.txt on beta")
    assert "1 line(s) skipped (not a cache entry, or damaged)" in pair.alpha.log.read_text()
