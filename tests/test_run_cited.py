"""bench/run_cited.py: the commands of a cited run, each bench with the run's ID and its name."""
from __future__ import annotations

from bench import run_cited


def test_every_bench_gets_the_run_id_and_a_result_name_tables_py_reads() -> None:
    todo = dict(run_cited.commands("RUN", list(run_cited.BENCHES), 2, quick=False))
    assert list(todo) == ["transport", "takeover", "sentinel_takeover", "never_twice",
                          "replication-1", "replication-2", "idle", "rejoin", "fs_create",
                          "replication-ext4"]
    for name, argv in todo.items():
        assert argv[argv.index("--run-id") + 1] == "RUN"
        assert argv[argv.index("--result") + 1] == f"RUN/{name}"
        assert argv[argv.index("--out") + 1] == f"bench/out/RUN/{name}.json"
    ext4 = todo["replication-ext4"]
    assert ext4[1] == "bench/replication.py"
    assert ext4[ext4.index("--fresh-ext4") + 1] == "8"
    assert ext4[ext4.index("--only") + 1] == "small,tree"
    assert "--fresh-ext4" not in todo["replication-1"]


def test_a_quick_run_keeps_nothing_and_fs_create_runs_small() -> None:
    todo = dict(run_cited.commands("RUN-quick", ["fs_create", "replication_ext4"], 2,
                                   quick=True))
    assert all("--result" not in argv for argv in todo.values())
    assert todo["fs_create"][-4:] == ["--files", "2000", "--reps", "1"]
    assert todo["replication-ext4"][-1] == "--quick"
