"""sbs.ini: defaults, relative paths, and bad values that end `sbs-node start` with exit 2."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sbs.node.config import ConfigError, load

from tests.pair import make_keys

BASE = """[node]
name = alpha
local = 127.0.0.1
peer = 127.0.0.2
state_dir = st
[security]
secret_key = keys/alpha.key_secret
peer_public_key = keys/beta.key
[folders]
docs = data/docs
labels = "data/my labels" *.lab **/keep/*.txt
[sentinels]
web = python3 -m http.server 8081
"""


@pytest.fixture
def ini(tmp_path):
    make_keys(tmp_path / "keys")

    def write(text: str = BASE) -> str:
        p = tmp_path / "sbs.ini"
        p.write_text(text)
        return str(p)

    return write


def test_defaults_and_relative_paths(ini, tmp_path):
    cfg = load(ini())
    assert (cfg.port, cfg.period, cfg.heartbeat, cfg.dead_after) == (4445, 5.0, 0.5, 1.5)
    assert cfg.rescan_cycle == 300.0
    assert (cfg.role, cfg.strict, cfg.curve, cfg.trash_days) == ("main", False, True, 7.0)
    assert cfg.state_dir == tmp_path / "st"
    assert cfg.secret_key == tmp_path / "keys/alpha.key_secret"
    assert [(f.name, f.path, f.filters) for f in cfg.folders] == [
        ("docs", tmp_path / "data/docs", ("*",)),
        ("labels", tmp_path / "data/my labels", ("*.lab", "**/keep/*.txt")),
    ]
    assert cfg.sentinels == (("web", "python3 -m http.server 8081"),)
    assert (cfg.bus_port, cfg.blob_port) == (4446, 4447)


def test_the_shipped_example_loads(tmp_path):
    make_keys(tmp_path / "keys")
    shipped = Path(__file__).parent.parent / "sbs.ini"
    (tmp_path / "sbs.ini").write_text(shipped.read_text())
    cfg = load(tmp_path / "sbs.ini")
    assert (cfg.name, cfg.local, cfg.peer, cfg.port) == ("alpha", "127.0.0.1", "127.0.0.2", 4445)
    assert [f.name for f in cfg.folders] == ["settings", "labels"]
    assert dict(cfg.sentinels)["printer"].startswith("python3 -m http.server")


BAD = [
    ("peer = 127.0.0.2\n", "", "[node] peer: is required"),
    ("[node]\n", "[node]\nport = http\n", "[node] port: 'http' is not a whole number"),
    ("[node]\n", "[node]\nport = 70000\n", "[node] port: 70000 is out of range"),
    ("[node]\n", "[node]\nrole = leader\n", "[node] role: 'leader' is not one of main, backup"),
    ("[node]\n", "[node]\nstrict = maybe\n", "[node] strict: 'maybe' is not true or false"),
    ("[node]\n", "[node]\nheartbeat = 1\ndead_after = 1.5\n", "[node] dead_after:"),
    ("[node]\n", "[node]\ncolour = blue\n", "[node] colour: unknown key"),
    ("keys/beta.key", "keys/gamma.key", "[security] peer_public_key: key file"),
    ("secret_key = keys/alpha.key_secret", "secret_key = keys/beta.key",
     "[security] secret_key: "),
    ("docs = data/docs", "docs = ", "[folders] docs: needs a path"),
    ("docs = data/docs", "docs = data/docs\nsub = data/docs/sub", "[folders] "),
    ("web = python3", "web = 'unclosed", "[sentinels] web: cannot parse command"),
    ("[folders]", "[mystery]\n[folders]", "[mystery]: unknown section"),
    ("web = python3", "web server = python3", "[sentinels] web server: a sentinel name"),
    ("web = python3", "../web = python3", "[sentinels] ../web: a sentinel name"),
    ("web = python3", ".web = python3", "[sentinels] .web: a sentinel name"),
    ("web = python3", "w" * 252 + " = python3", "w" * 252 + ": a sentinel name is 1-251"),
    ("docs = data/docs", "docs = d *.[z-a]", "[folders] docs: bad filter"),
    ("docs = data/docs", "docs = d *.lab [b-a]/x", "[folders] docs: bad filter"),
    ("docs = data/docs", "my.docs = data/docs", "[folders] my.docs: a folder name uses"),
    ("docs = data/docs", "x" * 65 + " = data/docs", "x" * 65 + ": a folder name uses 1-64"),
    ("docs = data/docs", "docs = ~nosuchuser-sbs/docs", "[folders] docs: cannot expand"),
    ("state_dir = st", "state_dir = ~nosuchuser-sbs/st", "[node] state_dir: cannot expand"),
    ("[folders]", "[cluster]\ndcs = http://127.0.0.1:2379\n[folders]",
     "[cluster] dcs: 'http://127.0.0.1:2379': expected etcd://"),
    ("[folders]", "[cluster]\ndcs = etcd://127.0.0.1\n[folders]",
     "[cluster] dcs: '127.0.0.1' is not HOST:PORT"),
    ("[folders]", "[cluster]\ndcs = etcd://a:1,b:99999\n[folders]",
     "[cluster] dcs: 'b:99999' is not HOST:PORT"),
    ("[folders]", "[cluster]\nttl = 5\nloop_wait = 2\nretry_timeout = 2\n[folders]",
     "[cluster] ttl: 5.0 is less than loop_wait + 2 * retry_timeout (2.0 + 2 * 2.0)"),
    ("[folders]", "[cluster]\nkey = sbs\n[folders]", "[cluster] key: 'sbs': an absolute key"),
    ("[folders]", "[cluster]\nquorum = 3\n[folders]", "[cluster] quorum: unknown key"),
    ("[node]\n", "[node]\nrescan_cycle = soon\n", "[node] rescan_cycle: 'soon' is not a number"),
    ("[node]\n", "[node]\nrescan_cycle = 0\n", "[node] rescan_cycle: 0.0 is out of range"),
]


@pytest.mark.parametrize(("old", "new", "message"), BAD)
def test_bad_values_name_file_section_and_key(ini, old, new, message):
    path = ini(BASE.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value).startswith(path)
    assert message in str(info.value)


def test_the_cluster_section(ini):
    assert not load(ini()).cluster.enabled  # no dcs: the two-node mode
    cfg = load(ini(BASE.replace("[folders]", "[cluster]\ndcs = etcd://10.0.0.5:2379, "
                                "etcd.example:2379\nttl = 30\nloop_wait = 10\n"
                                "retry_timeout = 10\n[folders]", 1))).cluster
    assert cfg.enabled and cfg.dcs == (("10.0.0.5", 2379), ("etcd.example", 2379))
    assert (cfg.ttl, cfg.loop_wait, cfg.retry_timeout, cfg.key) == (30, 10, 10, "/sbs/leader")


def test_names_and_filters_that_are_accepted(ini, tmp_path):
    text = BASE.replace("web = python3", "Web_1.a-b = python3", 1).replace(
        "docs = data/docs", "Docs_2-x = data/docs *.[a-z] [!.]*", 1)
    cfg = load(ini(text))
    assert cfg.sentinels[0][0] == "Web_1.a-b"
    assert (cfg.folders[0].name, cfg.folders[0].filters) == ("Docs_2-x", ("*.[a-z]", "[!.]*"))
    # the longest sentinel name whose log file, <name>.log, still fits in a file name
    longest = "w" * 251
    assert load(ini(BASE.replace("web = python3", f"{longest} = python3", 1))).sentinels[0][0] \
        == longest
    (tmp_path / f"{longest}.log").write_text("fits\n")


def test_missing_file():
    with pytest.raises(ConfigError, match="configuration file not found"):
        load("/nonexistent/sbs.ini")


@pytest.mark.parametrize(("old", "new", "message"),
                         [BAD[0], BAD[1], BAD[3], BAD[7], BAD[13], BAD[17], BAD[-1]])
def test_sbs_node_start_exits_2_with_one_line(ini, old, new, message):
    path = ini(BASE.replace(old, new, 1))
    res = subprocess.run([sys.executable, "-m", "sbs.node.cli", "start", "--config", path],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and path in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_name_and_state_dir_default_to_the_host_name(ini, tmp_path):
    import socket

    cfg = load(ini(BASE.replace("name = alpha\n", "", 1).replace("state_dir = st\n", "", 1)))
    assert cfg.name == socket.gethostname()
    assert cfg.state_dir == tmp_path / ".sbs" / socket.gethostname()


def test_the_commands_read_sbs_ini_in_the_working_directory_by_default(ini, tmp_path):
    """Without --config both commands read ./sbs.ini: here one whose peer is missing."""
    ini(BASE.replace("peer = 127.0.0.2\n", "", 1))
    for argv in (["-m", "sbs.node.cli", "start"], ["-m", "sbs.tools.cli", "status"]):
        res = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                             timeout=30, cwd=tmp_path)
        assert res.returncode == 2, (argv, res.stderr)
        assert "sbs.ini" in res.stderr and "[node] peer" in res.stderr, res.stderr


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_sbs_node_keeps_freed_chunk_buffers_in_the_heap():
    """The node tunes glibc's malloc before it starts (node/run.py: tune_malloc); checked in a
    fresh interpreter, with the effect glibc reports: a freed 1 MiB block is reused, not
    unmapped (M_MMAP_THRESHOLD raised above the chunk size)."""
    code = (
        "import ctypes, ctypes.util\n"
        "from sbs.node.run import tune_malloc\n"
        "libc = ctypes.CDLL(ctypes.util.find_library('c'))\n"
        "libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]\n"
        "assert tune_malloc()\n"
        "a = libc.malloc(1 << 20); libc.free(a); b = libc.malloc(1 << 20)\n"
        "print('reused' if a == b else 'fresh')\n"
    )
    assert _fresh_python(code) == "reused"


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_sbs_node_threads_share_one_malloc_arena():
    """tune_malloc leaves one arena for all threads: a block a new thread allocates comes from
    the main arena (the [heap] mapping), where without it glibc gives the thread an arena of
    its own (mapped elsewhere). Both are checked, so the probe itself is shown to tell."""
    code = (
        "import ctypes, ctypes.util, sys, threading\n"
        "from sbs.node.run import tune_malloc\n"
        "libc = ctypes.CDLL(ctypes.util.find_library('c'))\n"
        "libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]\n"
        "if sys.argv[1] == 'tuned':\n"
        "    assert tune_malloc()\n"
        "libc.free(libc.malloc(64))  # the main arena exists\n"
        "got = []\n"
        "t = threading.Thread(target=lambda: got.append(libc.malloc(4000)))\n"
        "t.start(); t.join()\n"
        "lo, hi = next(tuple(int(x, 16) for x in line.split()[0].split('-'))\n"
        "              for line in open('/proc/self/maps') if line.rstrip().endswith('[heap]'))\n"
        "print('main arena' if lo <= got[0] < hi else 'own arena')\n"
    )
    run = [sys.executable, "-c", code]
    for how, want in (("tuned", "main arena"), ("default", "own arena")):
        out = subprocess.run([*run, how], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == want, how


def _fresh_python(code: str) -> str:
    """What `code` prints in a fresh interpreter (which must exit 0), stripped."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_a_node_loads_no_library_it_has_not_needed_yet():
    """What `sbs-node start` imports to run a node: no apprise (loaded with the first
    mail), no HTTP client (loaded with the first etcd call), not typer or pydantic (node/cli.py
    reads a start line without them) and not asyncio or ssl (pyzmq's ZAP authenticator
    brought them; the node's own ZapHandler does not): ~40 MB a node without mail or etcd
    never carries."""
    code = (
        "import sys\n"
        "import sbs.node.cli, sbs.node.run, sbs.node.node\n"
        "print(' '.join(m for m in ('apprise', 'urllib.request', 'typer', 'pydantic',\n"
        "                           'asyncio', 'ssl')\n"
        "               if m in sys.modules))\n"
    )
    assert _fresh_python(code) == ""
