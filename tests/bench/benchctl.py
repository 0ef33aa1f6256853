#!/usr/bin/env python3
"""Small helpers for tests/bench/run.sh (standard library only).

  benchctl.py size 1GiB                 bytes, as robib parses sizes
  benchctl.py ports N                   N distinct free 127.0.0.1 ports (TCP and UDP)
  benchctl.py sample LABEL=PID ...      JSON {label: {cpu_s, hwm_kib, rss_kib, alive}}
  benchctl.py cluster-wait --bin B --sites N --timeout S URL...
                                        waits until every API URL reports the same
                                        non-empty leader and N voters (Leader or
                                        Follower); prints the status JSON seen at
                                        the first URL
  benchctl.py settle --bin B --timeout S URL
                                        waits until the commit index is stable and
                                        every voter has applied it; prints
                                        {"settle_s", "leader", "commit_index", "ok"}
  benchctl.py record --file F --target T --phase P [--before J --after J ...]
                                        appends one JSON line describing a phase
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

UNITS = {"": 1, "b": 1,
         "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20,
         "g": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40,
         "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def cmd_size(a):
    s = a.value.strip()
    i = 0
    while i < len(s) and (s[i].isdigit() or s[i] == "."):
        i += 1
    num, unit = s[:i], s[i:].strip().lower()
    if not num or unit not in UNITS:
        sys.exit("bench: cannot parse size %r" % a.value)
    n = int(float(num) * UNITS[unit])
    if n <= 0 or n % (1 << 20):
        sys.exit("bench: BENCH_SIZE %r = %d bytes must be a positive multiple of 1 MiB" % (a.value, n))
    print(n)


def cmd_ports(a):
    socks, ports = [], []
    while len(ports) < a.n:
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        t.bind(("127.0.0.1", 0))
        port = t.getsockname()[1]
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            u.bind(("127.0.0.1", port))  # memberlist gossip uses UDP too
        except OSError:
            t.close()
            u.close()
            continue
        socks += [t, u]
        ports.append(port)
    for s in socks:
        s.close()
    print(" ".join(map(str, ports)))


def proc_sample(pid):
    tck = os.sysconf("SC_CLK_TCK")
    out = {"pid": pid, "alive": False, "cpu_s": None, "hwm_kib": None, "rss_kib": None,
           "rss_anon_kib": None, "rss_file_kib": None}
    try:
        with open("/proc/%d/stat" % pid) as f:
            st = f.read()
        with open("/proc/%d/status" % pid) as f:
            status = f.read()
    except OSError:
        return out
    rest = st[st.rfind(")") + 2:].split()
    # rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    out["alive"] = rest[0] not in ("Z", "X")
    out["cpu_s"] = (int(rest[11]) + int(rest[12])) / tck
    for line in status.splitlines():
        k, _, v = line.partition(":")
        if k == "VmHWM":
            out["hwm_kib"] = int(v.split()[0])
        elif k == "VmRSS":
            out["rss_kib"] = int(v.split()[0])
        elif k == "RssAnon":
            out["rss_anon_kib"] = int(v.split()[0])
        elif k == "RssFile":  # e.g. bbolt's mmap of the Raft log: page cache, reclaimable
            out["rss_file_kib"] = int(v.split()[0])
    return out


def cmd_sample(a):
    res = {}
    for spec in a.procs:
        label, _, pid = spec.partition("=")
        res[label] = proc_sample(int(pid))
    print(json.dumps(res))


def status(binary, url, timeout=15):
    r = subprocess.run([binary, "--api", url, "cluster", "status", "--json"],
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError("cluster status at %s: %s" % (url, (r.stderr or r.stdout).strip()))
    return json.loads(r.stdout)


def cmd_cluster_wait(a):
    deadline = time.monotonic() + a.timeout
    why = "no answer yet"
    while time.monotonic() < deadline:
        try:
            first, leader = None, None
            for url in a.urls:
                st = status(a.bin, url)
                first = first or st
                if not st.get("leader"):
                    raise RuntimeError("%s knows no leader" % url)
                if leader and st["leader"] != leader:
                    raise RuntimeError("sites disagree on the leader: %s vs %s" % (leader, st["leader"]))
                leader = st["leader"]
                voters = [s for s in st.get("sites", []) if s.get("voter")]
                if len(voters) != a.sites:
                    raise RuntimeError("%s sees %d voters, want %d" % (url, len(voters), a.sites))
                bad = [s["name"] for s in voters if s.get("state") not in ("Leader", "Follower")]
                if bad:
                    raise RuntimeError("%s sees voters %s neither Leader nor Follower" % (url, bad))
            print(json.dumps(first))
            return
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
            why = str(e)
        time.sleep(0.2)
    sys.exit("bench: cluster not ready after %ss: %s" % (a.timeout, why))


def cmd_settle(a):
    """Stable commit index (3 polls, 0.25 s apart), applied everywhere."""
    start = time.monotonic()
    deadline = start + a.timeout
    last, stable, st = None, 0, {}
    while time.monotonic() < deadline:
        try:
            st = status(a.bin, a.url)
        except (RuntimeError, ValueError, subprocess.TimeoutExpired):
            stable, last = 0, None
            time.sleep(0.25)
            continue
        ci = st.get("commit_index")
        voters = [s for s in st.get("sites", []) if s.get("voter")]
        done = bool(st.get("leader")) and voters and all(
            s.get("applied_index") == ci and s.get("commit_index") == ci for s in voters)
        if done and ci == last:
            stable += 1
        else:
            stable = 0
        last = ci
        if stable >= 2:
            print(json.dumps({"settle_s": round(time.monotonic() - start, 2), "leader": st.get("leader"),
                              "commit_index": ci, "ok": True}))
            return
        time.sleep(0.25)
    print(json.dumps({"settle_s": round(time.monotonic() - start, 2), "leader": st.get("leader"),
                      "commit_index": st.get("commit_index"), "ok": False}))


def cmd_record(a):
    with open("/proc/loadavg") as f:
        load1 = float(f.read().split()[0])
    rec = {"target": a.target, "phase": a.phase, "fio_rc": a.fio_rc, "loadavg1_after": load1,
           "elapsed_s": a.elapsed, "attached": a.attached or None,
           "leader_before": a.leader_before or None,
           "before": json.loads(a.before) if a.before else None,
           "after": json.loads(a.after) if a.after else None,
           "settle": json.loads(a.settle) if a.settle else None}
    with open(a.file, "a") as f:
        f.write(json.dumps(rec) + "\n")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("size")
    p.add_argument("value")
    p.set_defaults(fn=cmd_size)
    p = sub.add_parser("ports")
    p.add_argument("n", type=int)
    p.set_defaults(fn=cmd_ports)
    p = sub.add_parser("sample")
    p.add_argument("procs", nargs="*")
    p.set_defaults(fn=cmd_sample)
    p = sub.add_parser("cluster-wait")
    p.add_argument("--bin", required=True)
    p.add_argument("--sites", type=int, required=True)
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("urls", nargs="+")
    p.set_defaults(fn=cmd_cluster_wait)
    p = sub.add_parser("settle")
    p.add_argument("--bin", required=True)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("url")
    p.set_defaults(fn=cmd_settle)
    p = sub.add_parser("record")
    for k in ("file", "target", "phase"):
        p.add_argument("--" + k, required=True)
    p.add_argument("--fio-rc", type=int, default=0)
    p.add_argument("--elapsed", type=float)
    for k in ("attached", "leader-before", "before", "after", "settle"):
        p.add_argument("--" + k, default="")
    p.set_defaults(fn=cmd_record)
    a = ap.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
