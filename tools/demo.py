"""`just demo`: a real pair on 127.0.0.1 (alpha) and 127.0.0.2 (beta), narrated.

It generates keys, derives beta's config from the shipped sbs.ini, starts both nodes, shows
their status and the bus, replicates files, kills the primary and shows the takeover (files
and the sentinel move to beta), brings alpha back as secondary, then stops all it started.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from sbs.node.config import load
from sbs.node.protocol import Bad
from sbs.tools.cli import describe
from sbs.tools.client import request, subscribe

ROOT = Path.cwd()
ALPHA_INI = ROOT / "sbs.ini"
BETA_INI = ROOT / ".sbs" / "beta.ini"
BOLD, DIM, GREEN, RESET = "\033[1m", "\033[2m", "\033[32m", "\033[0m"


def say(text: str) -> None:
    print(f"\n{BOLD}== {text}{RESET}", flush=True)


def run(*args: str) -> None:
    print(f"{DIM}$ {' '.join(args)}{RESET}", flush=True)
    subprocess.run(args, check=False)


def wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := cond():
            return value
        time.sleep(0.05)
    raise SystemExit(f"demo: timed out waiting for {what}")


def state(cfg) -> str:
    reply = request(cfg, "STATUS", timeout=0.5)
    return reply["state"] if reply and reply.get("status") == "ok" else "stopped"


def prepare() -> None:
    keys = ROOT / "keys"
    for name in ("alpha", "beta"):
        if not (keys / f"{name}.key_secret").exists():
            run("sbs-tools", "keygen", "--dir", "keys", "--name", name)
    text = ALPHA_INI.read_text()
    swaps = [
        (r"(?m)^name = alpha", "name = beta"),
        (r"(?m)^local = 127\.0\.0\.1", "local = 127.0.0.2"),
        (r"(?m)^peer = 127\.0\.0\.2", "peer = 127.0.0.1"),
        (r"(?m)^state_dir = \.sbs/alpha", "state_dir = beta"),
        (r"keys/alpha\.key_secret", "../keys/beta.key_secret"),
        (r"keys/beta\.key\b", "../keys/alpha.key"),
        (r"data/alpha/", "../data/beta/"),
    ]
    for pattern, repl in swaps:
        text = re.sub(pattern, repl, text)
    BETA_INI.parent.mkdir(parents=True, exist_ok=True)
    BETA_INI.write_text("; written by `just demo` from sbs.ini: beta, the second node\n" + text)
    for folder in ("settings", "labels"):
        (ROOT / "data" / "alpha" / folder).mkdir(parents=True, exist_ok=True)
        (ROOT / "data" / "beta" / folder).mkdir(parents=True, exist_ok=True)
    (ROOT / "data/alpha/settings/app.conf").write_text("colour = blue\nretries = 3\n")
    (ROOT / "data/alpha/settings/nested/deeper").mkdir(parents=True, exist_ok=True)
    (ROOT / "data/alpha/settings/nested/deeper/notes.txt").write_text("nested file\n")
    (ROOT / "data/alpha/labels/box.lab").write_text("LABEL box\n")
    (ROOT / "data/alpha/labels/ignored.tmp").write_text("not a .lab file: filtered out\n")


def start(ini: Path, log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"{DIM}$ sbs-node start --config {ini.relative_to(ROOT)}   (log: "
          f"{log.relative_to(ROOT)}){RESET}", flush=True)
    return subprocess.Popen(["sbs-node", "start", "--config", str(ini)],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def tail_bus(cfg, stop: threading.Event) -> None:
    shown = 0
    for msg in subscribe(cfg):
        if stop.is_set():
            return
        if isinstance(msg, Bad) or msg.command == "HB":
            continue  # heartbeats every 0.5 s would drown the story
        line = describe(msg.command, msg.body)
        print(f"{GREEN}  bus[alpha] {line}{RESET}", flush=True)
        shown += 1


def main() -> int:
    os.chdir(ROOT)
    # the console scripts and python3 of this environment, even when it is not activated
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]
    say("SBS demo: a hot-standby pair on 127.0.0.1 (alpha) and 127.0.0.2 (beta)")
    shutil.rmtree(ROOT / ".sbs", ignore_errors=True)
    shutil.rmtree(ROOT / "data", ignore_errors=True)
    prepare()
    alpha_cfg, beta_cfg = load(ALPHA_INI), load(BETA_INI)
    procs: list[subprocess.Popen] = []
    stop_tail = threading.Event()
    try:
        say("Start alpha alone: nobody answers its probe, so it becomes primary")
        procs.append(start(ALPHA_INI, ROOT / ".sbs/alpha.log"))
        wait(lambda: state(alpha_cfg) == "primary", 15, "alpha to be primary")
        threading.Thread(target=tail_bus, args=(alpha_cfg, stop_tail), daemon=True).start()

        say("Start beta: it finds a primary and follows it (snapshot, then manifests)")
        procs.append(start(BETA_INI, ROOT / ".sbs/beta.log"))
        wait(lambda: state(beta_cfg) == "secondary", 15, "beta to be secondary")
        wait(lambda: (ROOT / "data/beta/labels/box.lab").exists(), 15, "initial sync")
        run("sbs-tools", "status", "--config", "sbs.ini")
        run("sbs-tools", "status", "--config", ".sbs/beta.ini")

        say("Write on the primary: the watcher sends a manifest, beta fetches and renames")
        t0 = time.monotonic()
        (ROOT / "data/alpha/settings/live.txt").write_text("written at " + time.ctime() + "\n")
        wait(lambda: (ROOT / "data/beta/settings/live.txt").exists(), 10, "live replication")
        print(f"  data/beta/settings/live.txt appeared after {1000 * (time.monotonic() - t0):.0f}"
              " ms; ignored.tmp stays on alpha (filter *.lab):",
              (ROOT / "data/beta/labels/ignored.tmp").exists() is False)
        run("sbs-tools", "verify", "--config", "sbs.ini")

        say("kill -9 the primary: beta hears silence for dead_after (1.5 s) and takes over")
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        t0 = time.monotonic()
        wait(lambda: state(beta_cfg) == "primary", 10, "takeover")
        print(f"  beta is primary {time.monotonic() - t0:.2f}s after the kill; it starts the "
              "sentinel alpha was running (python3 -m http.server 8081)")
        wait(lambda: any(s["pid"] for s in request(beta_cfg, "STATUS")["sentinels"]), 10,
             "the sentinel on beta")
        run("sbs-tools", "status", "--config", ".sbs/beta.ini")

        say("beta is primary now: write there, then bring alpha back; it rejoins as secondary")
        (ROOT / "data/beta/settings/while-alpha-was-down.txt").write_text("beta wrote this\n")
        procs[0] = start(ALPHA_INI, ROOT / ".sbs/alpha.log")
        wait(lambda: state(alpha_cfg) == "secondary", 15, "alpha to rejoin")
        wait(lambda: (ROOT / "data/alpha/settings/while-alpha-was-down.txt").exists(), 15,
             "catch-up")
        print("  alpha caught up: data/alpha/settings/while-alpha-was-down.txt is there")
        run("sbs-tools", "status", "--config", "sbs.ini")

        say("Promote alpha back (a graceful switchover: last sync, then hand-over)")
        run("sbs-tools", "promote", "--config", "sbs.ini")
        say("Done. Stopping both nodes (SIGTERM: graceful).")
    finally:
        stop_tail.set()
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
    print("Logs: .sbs/alpha.log, .sbs/beta.log. Configs: sbs.ini, .sbs/beta.ini.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
