#!/usr/bin/env python3
"""Helpers for tests/bench/pgbench.sh (standard library only).

  pgbench_report.py parse --stdout F --stderr F [--set K=V ...]
        reads one pgbench run's output (stdout: the summary; stderr: the
        -P 1 progress lines) and prints one JSON object: tps, latency
        average/stddev, transactions, failures, and from the progress lines
        the slowest second and how many seconds had no commit at all
  pgbench_report.py log-scan FILE...
        counts WARN/ERROR lines of robib agent logs (text or JSON format)
        and prints {"file": {"warn": n, "error": n, "last": [...]}}
  pgbench_report.py note --file F.jsonl SETUP KEY VALUE
        appends {"setup": SETUP, KEY: VALUE} (VALUE parsed as JSON if it is)
  pgbench_report.py report --runs F.jsonl --setups F.jsonl --meta JSON --markdown F --json F
        builds the markdown table (printed, and written to --markdown) and
        its JSON copy (--json) from the runs recorded by pgbench.sh
"""

import argparse
import json
import os
import re
import sys

SETUP_TITLES = {
    "nbd": "(1) no backup: nbdkit file",
    "robib": "(2) block-level backup: robib, 3 sites",
    "pgsync": "(3) application-level backup: PG synchronous replication",
}
SETUP_ORDER = ["nbd", "robib", "pgsync"]


def num(pattern, text, cast=float):
    m = re.search(pattern, text, re.M)
    return cast(m.group(1)) if m else None


def cmd_parse(a):
    with open(a.stdout, errors="replace") as f:
        out = f.read()
    try:
        with open(a.stderr, errors="replace") as f:
            err = f.read()
    except OSError:
        err = ""
    res = {
        "tps": num(r"^tps = ([0-9.]+) \(without initial connection time\)", out),
        "latency_avg_ms": num(r"^latency average = ([0-9.]+) ms", out),
        "latency_stddev_ms": num(r"^latency stddev = ([0-9.]+) ms", out),
        "initial_connection_ms": num(r"^initial connection time = ([0-9.]+) ms", out),
        "transactions": num(r"^number of transactions actually processed: ([0-9]+)", out, int),
        "failed": num(r"^number of failed transactions: ([0-9]+)", out, int),
        "clients_reported": num(r"^number of clients: ([0-9]+)", out, int),
    }
    # progress: 3.0 s, 512.0 tps, lat 1.950 ms stddev 0.410, 0 failed
    prog = [(float(m.group(1)), float(m.group(2)))
            for m in re.finditer(r"^progress: ([0-9.]+) s, ([0-9.]+) tps", err, re.M)]
    rates = [t for _, t in prog]
    res["progress_seconds"] = len(rates)
    res["progress_min_tps"] = min(rates) if rates else None
    res["progress_max_tps"] = max(rates) if rates else None
    res["seconds_without_commit"] = sum(1 for t in rates if t == 0)
    # pgbench's own error lines (a failed flush shows up as a PANIC of the
    # server and "server closed the connection" here).
    res["errors"] = [l for l in (out + err).splitlines()
                     if re.search(r"error|fatal|panic|abort", l, re.I)][:10]
    for kv in a.set or []:
        k, _, v = kv.partition("=")
        try:
            res[k] = json.loads(v)
        except ValueError:
            res[k] = v
    print(json.dumps(res))


LEVEL = re.compile(r'level=(WARN|ERROR)|"level":\s*"(WARN|ERROR)"')


def cmd_log_scan(a):
    res = {}
    for path in a.files:
        c = {"warn": 0, "error": 0, "last": []}
        try:
            with open(path, errors="replace") as f:
                for line in f:
                    m = LEVEL.search(line)
                    if not m:
                        continue
                    lvl = (m.group(1) or m.group(2)).lower()
                    c[lvl] += 1
                    c["last"].append(line.rstrip()[:400])
                    c["last"] = c["last"][-5:]
        except OSError as e:
            c["unreadable"] = str(e)
        res[os.path.basename(path)] = c
    print(json.dumps(res))


def server_cpu(r):
    """CPU seconds the setup's NBD servers (nbdkit or robib agents) used in a run."""
    b, a = r.get("servers_before") or {}, r.get("servers_after") or {}
    tot = 0.0
    for k, v in a.items():
        if k in b and v.get("cpu_s") is not None and b[k].get("cpu_s") is not None:
            tot += v["cpu_s"] - b[k]["cpu_s"]
    return tot if a else None


def fmt(v, nd=1):
    if v is None:
        return "n/a"
    return ("%%.%df" % nd) % v


def ratio(a, b):
    if a is None or b in (None, 0):
        return None
    return a / b


def cmd_report(a):
    meta = json.loads(a.meta)
    runs = []
    with open(a.runs) as f:
        for line in f:
            line = line.strip()
            if line:
                runs.append(json.loads(line))
    info_by = {}
    if a.setups:
        try:
            with open(a.setups) as f:
                for line in f:
                    line = line.strip()
                    if line:
                        d = json.loads(line)
                        info_by.setdefault(d.pop("setup"), {}).update(d)
        except FileNotFoundError:
            pass
    meta["setups"] = info_by
    by = {(r["setup"], r["clients"]): r for r in runs}
    setups = [s for s in SETUP_ORDER if any(r["setup"] == s for r in runs)]
    clients = []
    for r in runs:
        if r["clients"] not in clients:
            clients.append(r["clients"])

    md = []
    md.append("# pgbench on ext4: no backup vs robib vs PostgreSQL synchronous replication")
    md.append("")
    md.append("%s, scale %s, %s s per run, git %s, %s CPUs, load average %s at start, %s at end." % (
        meta.get("date"), meta.get("scale"), meta.get("time_s"), meta.get("git"),
        meta.get("host_cpus"), meta.get("loadavg_start"), meta.get("loadavg_end")))
    md.append("")
    md.append("| setup | clients | TPS | avg latency ms | TPS vs (1) | latency vs (1) | slowest 1 s (TPS) "
              "| s without commit | NBD servers' CPU s | load avg 1m |")
    md.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for s in setups:
        for c in clients:
            r = by.get((s, c))
            if r is None:
                continue
            base = by.get(("nbd", c))
            tps, lat = r.get("tps"), r.get("latency_avg_ms")
            bt = base.get("tps") if base else None
            bl = base.get("latency_avg_ms") if base else None
            flag = "" if r.get("rc", 0) == 0 and not r.get("failed") else " (FAILED, see JSON)"
            r["servers_cpu_s"] = server_cpu(r)
            md.append("| %s%s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                SETUP_TITLES.get(s, s), flag, c, fmt(tps), fmt(lat, 2),
                fmt(ratio(tps, bt), 2), fmt(ratio(lat, bl), 2),
                fmt(r.get("progress_min_tps")), r.get("seconds_without_commit", "n/a"),
                fmt(r["servers_cpu_s"]), r.get("loadavg1_after", "n/a")))
    if "robib" in setups and "pgsync" in setups:
        md.append("")
        md.append("robib (block-level) vs PostgreSQL synchronous replication (application-level):")
        md.append("")
        md.append("| clients | TPS robib / PG sync | latency robib / PG sync |")
        md.append("| ---: | ---: | ---: |")
        for c in clients:
            r, p = by.get(("robib", c)), by.get(("pgsync", c))
            if not r or not p:
                continue
            md.append("| %s | %s | %s |" % (c, fmt(ratio(r.get("tps"), p.get("tps")), 2),
                                          fmt(ratio(r.get("latency_avg_ms"), p.get("latency_avg_ms")), 2)))
    md.append("")
    md.append("Setups (the client path is the same in each: ext4 on a loop device on an nbdfuse file):")
    md.append("")
    for s in setups:
        info = meta.get("setups", {}).get(s, {})
        extra = []
        if info.get("init_s") is not None:
            extra.append("pgbench -i took %s s" % info["init_s"])
        if info.get("attached"):
            extra.append("attached at %s, a follower at attach (leader %s at attach, %s at the end: "
                         "with --leader-follows-writes the leader moves to the writing site)" % (
                info["attached"], info.get("leader_at_attach"), info.get("leader_at_end")))
        if info.get("sync_state"):
            extra.append("standby %s sync_state=%s" % (info.get("standby_name"), info["sync_state"]))
        if info.get("agent_log"):
            w = sum(v.get("warn", 0) for v in info["agent_log"].values())
            e = sum(v.get("error", 0) for v in info["agent_log"].values())
            extra.append("agent logs: %d WARN, %d ERROR lines" % (w, e))
        if info.get("pg_log_problems"):
            extra.append("PostgreSQL logs: %s" % info["pg_log_problems"])
        if info.get("kernel_io_errors"):
            extra.append("kernel: %d I/O or ext4 error lines (see JSON)" % len(info["kernel_io_errors"]))
        md.append("- %s: %s%s" % (SETUP_TITLES.get(s, s), info.get("description", ""),
                                  (" — " + "; ".join(extra)) if extra else ""))
    md.append("")
    md.append("PostgreSQL %s: fsync=on, synchronous_commit=on, full_page_writes=on, the same postgresql.conf "
              "everywhere (replication settings only in setup 3). Before each timed run: VACUUM of "
              "pgbench_branches/pgbench_tellers, TRUNCATE pgbench_history, CHECKPOINT on every instance, "
              "sync(1)%s; pgbench -n -c N -j min(N,4) -T %s -P 1 over the Unix socket. "
              "\"slowest 1 s\" is the lowest per-second TPS of pgbench -P 1; \"NBD servers' CPU s\" is the "
              "CPU time of nbdkit or of the three robib agents during the run." % (
                  meta.get("pg_version"), meta.get("quiesce_note", ""), meta.get("time_s")))
    if meta.get("failures"):
        md.append("")
        md.append("FAILURES: %s" % meta["failures"])
    text = "\n".join(md) + "\n"
    with open(a.markdown, "w") as f:
        f.write(text)
    with open(a.json, "w") as f:
        json.dump({"meta": meta, "runs": runs}, f, indent=2)
        f.write("\n")
    sys.stdout.write(text)


def cmd_note(a):
    try:
        v = json.loads(a.value)
    except ValueError:
        v = a.value
    with open(a.file, "a") as f:
        f.write(json.dumps({"setup": a.setup, a.key: v}) + "\n")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("parse")
    p.add_argument("--stdout", required=True)
    p.add_argument("--stderr", required=True)
    p.add_argument("--set", action="append")
    p.set_defaults(fn=cmd_parse)
    p = sub.add_parser("log-scan")
    p.add_argument("files", nargs="*")
    p.set_defaults(fn=cmd_log_scan)
    p = sub.add_parser("note")
    p.add_argument("--file", required=True)
    p.add_argument("setup")
    p.add_argument("key")
    p.add_argument("value")
    p.set_defaults(fn=cmd_note)
    p = sub.add_parser("report")
    p.add_argument("--runs", required=True)
    p.add_argument("--meta", required=True)
    p.add_argument("--setups", help="JSON lines {setup, key: value}, merged per setup")
    p.add_argument("--markdown", required=True)
    p.add_argument("--json", required=True)
    p.set_defaults(fn=cmd_report)
    a = ap.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
