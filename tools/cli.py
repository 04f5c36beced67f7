"""sbs-tools: the operator's commands. Each is a thin client of a node's control socket."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import orjson
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sbs.node.config import Config, ConfigError, load
from sbs.node.names import for_people, shown

from .client import request, subscribe

app = typer.Typer(add_completion=False, help="SBS operator commands.", no_args_is_help=True)
sentinel_app = typer.Typer(help="List, start or stop sentinels (on the primary).")
app.add_typer(sentinel_app, name="sentinel")
out = Console()
err = Console(stderr=True)

ConfigOpt = typer.Option(Path("sbs.ini"), "--config", "-c", help="path to sbs.ini")
JsonOpt = typer.Option(False, "--json", help="machine-readable output")


def _cfg(path: Path) -> Config:
    try:
        return load(path)
    except ConfigError as exc:
        err.print(f"[red]configuration error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None


def _ask(cfg: Config, command: str, body: dict[str, Any] | None = None, *,
         timeout: float = 3.0, peer: bool = False) -> dict[str, Any]:
    reply = for_people(request(cfg, command, body, timeout=timeout, peer=peer))
    if reply is None:
        where = f"{cfg.peer}:{cfg.port}" if peer else f"{cfg.local}:{cfg.port}"
        err.print(f"no answer from the node at {where}: stopped", highlight=False)
        raise typer.Exit(3)
    if reply["status"] != "ok":
        err.print(f"[red]refused:[/red] {escape(str(reply.get('reason')))}", highlight=False)
        raise typer.Exit(1)
    return reply


@app.command()
def status(config: Path = ConfigOpt, as_json: bool = JsonOpt) -> None:
    """State, epoch, peer, replication and sentinels of the local node (exit 3 if stopped)."""
    cfg = _cfg(config)
    reply = for_people(request(cfg, "STATUS", timeout=2.0))
    if reply is None or reply.get("status") != "ok":
        if as_json:
            print(orjson.dumps({"state": "stopped", "name": cfg.name}).decode())
        else:
            out.print("stopped")
        raise typer.Exit(3)
    reply.pop("status", None)
    if as_json:
        print(orjson.dumps(reply).decode())
        return
    st = reply
    say = out.print
    if st.get("maintenance"):
        # every line says so: an operator who reads one line must not miss it
        def say(text: Any, **kw: Any) -> None:
            tag = "[reverse yellow]MAINTENANCE[/reverse yellow]"
            if isinstance(text, str):
                out.print(f"{tag} {text}", **kw)
            else:  # a table: each of its lines too
                with out.capture() as cap:
                    out.print(text, **kw)
                for line in cap.get().splitlines():
                    out.print(f"{tag} {escape(line)}", highlight=False)

    _print_status(st, say)


def _print_status(st: dict[str, Any], say: Any) -> None:
    flag = " [yellow](restricted: backup role started alone)[/yellow]" if st["restricted"] else ""
    say(f"[bold]{st['name']}[/bold] is [bold]{st['state']}[/bold]{flag}  "
              f"epoch {st['epoch']}  role {st['role']}  pid {st['pid']}")
    if st.get("maintenance"):
        m = st.get("maintenance_switch") or {}
        say(f"maintenance mode ON (switched on {escape(str(m.get('by')))} at "
                  f"{_clock(m.get('at'))}): no takeover, no automatic hand-over")
    peer = st["peer"]
    heard = "never" if peer["last_heard"] is None else f"{peer['last_heard']:.1f}s ago"
    say(f"peer {peer['name']} ({peer['address']}): {st['peer_state']}, "
              f"epoch {peer['epoch']}, heard {heard}")
    if st.get("lease"):
        out.print(_lease_line(st["lease"]))
    r = st["replication"]
    if r["direction"] == "outgoing" and r["pending_files"] is None:
        say(f"replication: primary, manifest {r['seq']}, folders {r['folders']}, "
                  "no secondary connected")
    elif r["direction"] == "outgoing" and r["peer_applied"] is None:
        say(f"replication: primary, manifest {r['seq']}, folders {r['folders']}, "
                  "secondary taking a new snapshot")
    elif r["direction"] == "outgoing":
        say(f"replication: primary, manifest {r['seq']}, folders {r['folders']}, "
                  f"secondary applied {r['peer_applied']} (lag {r['lag_manifests']} manifests), "
                  f"pending {r['pending_files']} files / {r['pending_bytes']} bytes, "
                  f"last in sync {_clock(r.get('peer_last_sync'))}"
                  + (f", [red]{escape(r['peer_error'])}[/red]" if r["peer_error"] else "")
                  + (f" [red](cannot apply by waiting: {escape(r['peer_stuck'])})[/red]"
                     if r.get("peer_stuck") else ""))
    else:
        say(f"replication: applied {r['applied']}/{r['primary_seq']}, "
                  f"lag {r['lag_seconds']}s, pending {r['pending_files']} files / "
                  f"{r['pending_bytes']} bytes, last sync {_clock(r['last_sync'])}"
                  + (f", [red]{escape(r['error'])}[/red]" if r["error"] else ""))
        if r.get("stalled"):
            say(f"[red]replication stalled for {r['stalled_for']:.1f}s: "
                f"{escape(r['stalled'])}[/red]")
    if u := r.get("unreplicable"):
        names = ", ".join(escape(n) for n in u["names"])
        say(f"[red]not replicated: {u['count']}{' or more' if u.get('capped') else ''} "
            f"object(s) {'here' if r['direction'] == 'outgoing' else 'on the primary'} that "
            f"cannot travel (only regular files, folders and links replicate; a FIFO, "
            f"socket or device does not): {names}"
            f"{', ...' if u['count'] > len(u['names']) else ''}[/red]")
    table = Table("sentinel", "active", "state", "pid", "restarts", "command")
    for s in st["sentinels"]:
        table.add_row(s["name"], "yes" if s["active"] else "no", s["state"],
                      _pids(s), str(s["restarts"]), escape(s["command"]))
    if st["sentinels"]:
        say(table)
    for path, failed in (st.get("state_writes") or {}).items():
        say(f"[red]cannot write {escape(path)}: {escape(failed['error'])} "
            "(kept in memory, retried)[/red]")
    kept = st.get("conflicts") or {}
    if kept.get("count"):
        say(f"[yellow]{kept['count']} conflict copies under {escape(kept['where'])} "
            f"(latest {kept['latest']}): see 'sbs-tools conflicts'[/yellow]")
    lists = st.get("lists")
    if lists:
        origin = (f"edited on {escape(lists['by'])} at {_clock(lists['at'])}" if lists["by"]
                  else "as first configured")
        say(f"lists: generation {lists['gen']}, {origin}")
    for alert in st.get("alerts", []):
        say(f"[red]alert:[/red] {escape(alert['subject'])} (since {_clock(alert['since'])})")
    mail = st["email"]
    if mail.get("last_error"):
        say(f"[red]email: last error: {escape(mail['last_error'])}[/red]")


def _lease_line(lease: dict[str, Any]) -> str:
    etcd = ("reachable" if lease["reachable"]
            else f"[red]unreachable[/red] ({escape(lease['error'])})")
    left = "" if lease.get("time_left") is None else f", {lease['time_left']:.1f}s left"
    line = (f"lease {escape(lease['key'])}: holder {escape(str(lease['holder'] or 'nobody'))}, "
            f"term {lease['term']}{left}, etcd {etcd}")
    if lease.get("why_no_takeover"):
        line += f"\n[yellow]{escape(lease['why_no_takeover'])}[/yellow]"
    return line


def _clock(wall: float | None) -> str:
    return "never" if not wall else time.strftime("%H:%M:%S", time.localtime(wall))


@app.command()
def tail(config: Path = ConfigOpt, as_json: bool = JsonOpt) -> None:
    """Print every message on the local node's bus until Ctrl-C."""
    cfg = _cfg(config)
    try:
        for msg in subscribe(cfg):
            if not msg:
                err.print(f"bad bus message: {msg.reason}", markup=False, highlight=False)
                continue
            body = for_people(msg.body)
            if as_json:
                print(orjson.dumps({"type": msg.command.lower(), **body}).decode(), flush=True)
            else:
                print(describe(msg.command, body), flush=True)
    except KeyboardInterrupt:
        pass


def describe(command: str, b: dict[str, Any]) -> str:
    """One readable line per bus message."""
    stamp = time.strftime("%H:%M:%S")
    who = b.get("name", "?")
    if command == "HB":
        text = f"heartbeat {b['state']} epoch {b['epoch']} manifest {b['seq']}"
        if b.get("maintenance"):
            text += " MAINTENANCE"
        if isinstance(lease := b.get("lease"), dict):
            left = lease.get("time_left")
            text += (f" lease {lease.get('holder') or 'nobody'} term {lease.get('term')}"
                     + ("" if left is None else f" {left}s left")
                     + ("" if lease.get("reachable") else " etcd unreachable"))
    elif command == "MANIFEST":
        counts = {f: len(es) for f, es in b["entries"].items()}
        dels = sum(1 for es in b["entries"].values() for e in es if e.get("deleted"))
        text = f"manifest {b['seq']}: {counts} ({dels} deleted)"
    elif command == "SENTINELS":
        text = f"sentinel list v{b['sv']}: active {b['active']}"
    else:
        rest = {k: v for k, v in b.items() if k not in ("name", "event", "at")}
        text = f"{b.get('event')} " + " ".join(
            f"{k}={', '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in rest.items())
    return f"{stamp} {who:>8} {command.lower():9} {text}"


@app.command()
def promote(config: Path = ConfigOpt,
            force: bool = typer.Option(False, "--force", help="even if the peer is unreachable"),
            timeout: float = typer.Option(0.0, help="seconds to wait for the new roles")) -> None:
    """Switch roles: the secondary becomes primary after the primary's last sync."""
    cfg = _cfg(config)
    before = _ask(cfg, "STATUS")
    _ask(cfg, "PROMOTE", {"force": force})
    want_local = "secondary" if before["state"] == "primary" else "primary"
    deadline = time.monotonic() + (timeout or cfg.handover_timeout + 3 * cfg.dead_after + 5)
    while time.monotonic() < deadline:
        now = request(cfg, "STATUS", timeout=1.0)
        if now and now.get("state") == want_local:
            peer_ok = force or now["peer_state"] in ("primary", "secondary") and (
                now["peer_state"] != want_local)
            if peer_ok:
                out.print(f"{now['name']}: {now['state']} (epoch {now['epoch']}); "
                          f"{now['peer']['name']}: {now['peer_state']}")
                return
        time.sleep(0.1)  # polling an operator-facing deadline, not synchronising a test
    err.print(f"[red]roles not confirmed within the deadline[/red] (local: "
              f"{(now or {}).get('state', 'no answer')})")
    raise typer.Exit(1)


@app.command()
def reload(config: Path = ConfigOpt) -> None:
    """Re-read sbs.ini on the running node (as SIGHUP does): an edit of \\[folders] or
    \\[sentinels] becomes the pair's lists; a key that needs a restart is refused by name."""
    cfg = _cfg(config)
    reply = _ask(cfg, "RELOAD", timeout=10.0)
    out.print(reply.get("result", "reloaded"), markup=False, highlight=False)


@app.command()
def maintenance(state: str = typer.Argument(None, help="on | off (none: show)"),
                config: Path = ConfigOpt, as_json: bool = JsonOpt) -> None:
    """Pair-wide maintenance mode: no takeover, no automatic hand-over; replication goes on."""
    if state not in (None, "on", "off"):
        err.print("maintenance: say on or off", highlight=False)
        raise typer.Exit(2)
    cfg = _cfg(config)
    reply = _ask(cfg, "MAINTENANCE", {} if state is None else {"on": state == "on"})
    m = reply["maintenance"]
    if as_json:
        print(orjson.dumps(m).decode())
        return
    out.print(f"maintenance {'ON' if m['on'] else 'off'}"
              + (f" (switched by {m['by']} at {_clock(m['at'])})" if m["by"] else ""),
              markup=False, highlight=False)


@app.command()
def keygen(directory: Path = typer.Option(..., "--dir", help="where to write the keys"),
           name: str = typer.Option(..., "--name", help="node name")) -> None:
    """Write NAME.key and NAME.key_secret (ZeroMQ CURVE certificates)."""
    from sbs.node.security import keygen as make

    public, secret = make(directory, name)
    out.print(f"wrote {public} and {secret}", markup=False)


@app.command("test-email")
def test_email(config: Path = ConfigOpt) -> None:
    """Send a test notification with the \\[email] settings and say whether it was delivered."""
    from sbs.node.notify import Notifier

    cfg = _cfg(config)
    notifier = Notifier(cfg.email)
    try:
        ok, message = notifier.send_now(
            f"SBS test message from {cfg.name}",
            f"This is a test notification from SBS node {cfg.name} ({cfg.local}).\n")
    finally:
        notifier.close()
    (out if ok else err).print(("delivered: " if ok else "NOT delivered: ") + message,
                               highlight=False)
    raise typer.Exit(0 if ok else 1)


@sentinel_app.command("list")
def sentinel_list(config: Path = ConfigOpt, as_json: bool = JsonOpt) -> None:
    """Show the sentinels and which are active."""
    _sentinel(config, "list", None, as_json)


@sentinel_app.command("start")
def sentinel_start(name: str, config: Path = ConfigOpt, as_json: bool = JsonOpt) -> None:
    """Activate a sentinel (starts it now on the primary)."""
    _sentinel(config, "start", name, as_json)


@sentinel_app.command("stop")
def sentinel_stop(name: str, config: Path = ConfigOpt, as_json: bool = JsonOpt) -> None:
    """Deactivate a sentinel (stops it now; a takeover will not start it)."""
    _sentinel(config, "stop", name, as_json)


def _pids(sentinel: dict) -> str:
    """Its pid, and those of what it moved out of its process group (a daemon): "12 +15"."""
    outside = "".join(f" +{pid}" for pid in sentinel.get("outside_group") or ())
    return f"{sentinel['pid'] or '-'}{outside}"


def _sentinel(config: Path, action: str, name: str | None, as_json: bool) -> None:
    cfg = _cfg(config)
    body = {"action": action, **({"name": name} if name else {})}
    reply = _ask(cfg, "SENTINEL", body)
    if as_json:
        print(orjson.dumps({"active": reply["active"], "sentinels": reply["sentinels"]}).decode())
        return
    table = Table("sentinel", "active", "state", "pid", "restarts")
    for s in reply["sentinels"]:
        table.add_row(s["name"], "yes" if s["active"] else "no", s["state"],
                      _pids(s), str(s["restarts"]))
    out.print(table)


# verify: 0 identical, 1 differs, 2 bad config, and this when it could not compare at all (a
# node that does not answer or refuses), the code every sbs-tools command uses for "not reachable"
CANNOT_VERIFY = 3
VERIFY_TIMEOUT = 600.0  # hashing every folder afresh takes time on a big tree


def _verify_tokens(cfg: Config, *, peer: bool) -> dict[str, dict[str, Any]]:
    """One node's {folder: {path: token}}, or exit CANNOT_VERIFY with a one-line reason."""
    where = (f"peer at {cfg.peer}:{cfg.port}" if peer else f"local node at {cfg.local}:{cfg.port}")

    def cannot(reason: str) -> typer.Exit:
        err.print(f"cannot verify: {reason}", markup=False, highlight=False, soft_wrap=True)
        return typer.Exit(CANNOT_VERIFY)

    # a quick STATUS first: a stopped node must not keep the operator waiting VERIFY_TIMEOUT.
    # The peer is asked through the local node (VERIFY with peer): operator commands need the
    # node's own key, and this host holds only its own node's, not the peer's.
    st = request(cfg, "STATUS", timeout=3.0)
    if st is None or peer and st.get("peer_state") == "unreachable":
        raise cannot(f"no answer from the {where} (stopped or unreachable)")
    reply = request(cfg, "VERIFY", {"peer": True} if peer else {}, timeout=VERIFY_TIMEOUT)
    if reply is None:
        raise cannot(f"the {where} did not answer VERIFY within {VERIFY_TIMEOUT:.0f}s")
    if reply.get("status") != "ok":
        raise cannot(f"the {where} refused VERIFY: {reply.get('reason')}")
    folders = reply.get("folders")
    if not isinstance(folders, dict):
        raise cannot(f"the {where} sent a VERIFY reply without folders")
    return folders


@app.command()
def verify(config: Path = ConfigOpt, as_json: bool = JsonOpt) -> None:
    """Compare content hashes of both nodes' folders; exit 0 when identical, 1 when not.

    Exit 2 on a bad config, 3 when either node cannot be asked (nothing was compared).
    """
    cfg = _cfg(config)
    mine = _verify_tokens(cfg, peer=False)
    theirs = _verify_tokens(cfg, peer=True)
    diffs = []
    for folder in sorted(set(mine) | set(theirs)):
        a, b = mine.get(folder, {}), theirs.get(folder, {})
        for path in sorted(set(a) | set(b)):
            if a.get(path) != b.get(path):
                what = ("only on peer" if path not in a else "only here" if path not in b
                        else "content differs")
                # compared as the names are, printed so that two never look alike
                diffs.append({"folder": folder, "path": shown(path), "difference": what})
    if as_json:
        print(orjson.dumps({"identical": not diffs, "differences": diffs}).decode())
    else:
        for d in diffs:
            out.print(f"{d['folder']}/{d['path']}: {d['difference']}", markup=False,
                      highlight=False)
        files = sum(len(v) for v in mine.values())
        out.print("identical" if not diffs else f"{len(diffs)} difference(s)",
                  f"({files} objects here)")
    raise typer.Exit(0 if not diffs else 1)


@app.command()
def conflicts(config: Path = ConfigOpt, as_json: bool = JsonOpt) -> None:
    """List what this node kept under state_dir/conflicts/ (its own changes that were replaced
    or set aside when it fell in line with its peer), newest first. Read from disk: works with
    the node stopped too."""
    from sbs.node.conflicts import listing

    cfg = _cfg(config)
    kept = [{**k, "path": shown(k["path"]), "kept": shown(k["kept"])}
            for k in listing(cfg.state_dir)]
    if as_json:
        print(orjson.dumps({"where": str(cfg.state_dir / "conflicts"), "files": kept}).decode())
        return
    for k in kept:
        out.print(f"{k['time']}  {k['folder']}/{k['path']}  ({k['size']} bytes)  {k['kept']}",
                  markup=False, highlight=False)
    out.print(f"{len(kept)} file(s) kept under {cfg.state_dir / 'conflicts'}", markup=False,
              highlight=False)


@app.command("confirm-deletions")
def confirm_deletions(folder: str = typer.Argument(None, help="folder name (default: all)"),
                      config: Path = ConfigOpt) -> None:
    """On the secondary: allow the strict deletions that the guard holds (once); refused
    when it holds none there."""
    cfg = _cfg(config)
    _ask(cfg, "CONFIRM", {"folder": folder} if folder else {})
    out.print("confirmed: the deletions the strict guard held" +
              (f" in {folder}" if folder else "") + " go ahead", markup=False)


def main() -> None:
    try:
        app()
    except BrokenPipeError:
        sys.exit(0)


if __name__ == "__main__":
    main()
