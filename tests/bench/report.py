#!/usr/bin/env python3
"""Turns the fio JSON files of tests/bench/run.sh into side-by-side tables.

Reads DIR/JOB-TARGET.json for every job and target (a missing or broken file
gives n/a cells) and the phase records DIR/phases.jsonl (CPU/RSS samples of
the target's processes around every fio run, settle waits, which site fio was
attached to). Prints markdown to stdout and writes it and a JSON copy of
every number to the given paths:

- one table per metric (bandwidth, IOPS, latency p50/p99, flush latency
  p50/p99, flushes/s), a row per job, a column per target, and ratio
  columns: robib-3site and robib-1site over the better of nbdkit and
  qemu-nbd ("best baseline": the higher value for throughput, the lower for
  latency; the cell names which), and each WAN target and robib-3site-fwd
  over robib-3site;
- the derived 3-site sequential write limit (raw seq-write / 6) and
  robib-3site's fraction of it;
- the WAN summary (seq-write throughput and flush p50 against the delay);
- settle waits and leadership per fio run, per-process peak RSS and CPU per
  GiB written;
- the issue's goals as PASS / FAIL / SKIP lines (see goals()).
"""

import argparse
import json
import os
import re
import sys

GIB = float(1 << 30)
BASELINES = ("nbdkit", "qemu-nbd")  # plain NBD servers, no replication
# Each of three sites writes every byte twice (Raft log, then volume), all
# on the same disk.
THREE_SITE_WRITE_FACTOR = 6


def pct(lat, p):
    """Percentile p (e.g. "99.000000") of a fio lat_ns/clat_ns block, in µs."""
    v = (lat or {}).get("percentile", {}).get(p)
    return None if v is None else v / 1000.0


def metrics(job_name, j):
    """(metric name, value, unit, higher_is_better) for one fio job."""
    direction = "read" if "read" in job_name else "write"
    io = j[direction]
    out = [
        ("bandwidth", io["bw_bytes"] / (1 << 20), "MiB/s", True),
        ("IOPS", io["iops"], "", True),
        ("latency p50", pct(io.get("clat_ns"), "50.000000"), "µs", False),
        ("latency p99", pct(io.get("clat_ns"), "99.000000"), "µs", False),
    ]
    sync = j.get("sync") or {}
    if sync.get("total_ios"):
        lat = sync.get("lat_ns")
        secs = (j.get("job_runtime") or 0) / 1000.0
        out += [
            ("flush latency p50", pct(lat, "50.000000"), "µs", False),
            ("flush latency p99", pct(lat, "99.000000"), "µs", False),
            ("flushes/s", sync["total_ios"] / secs if secs else None, "", True),
        ]
    if j.get("error"):
        out.append(("fio error", j["error"], "", False))
    return out


def load_json(path):
    """A JSON object from path, or None (missing, empty, garbage)."""
    try:
        with open(path) as f:
            v = json.load(f)
    except (OSError, ValueError):
        return None
    return v if isinstance(v, dict) else None


def load_fio(path):
    """The first job of a fio JSON file, or None (missing, empty, garbage)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    # fio may print warnings before the JSON document.
    start = text.find("{")
    if start < 0:
        return None
    try:
        data = json.loads(text[start:])
        return data["jobs"][0]
    except (ValueError, KeyError, IndexError):
        return None


def fmt(v):
    if v is None:
        return "n/a"
    if isinstance(v, int) or float(v).is_integer() and abs(v) >= 1000:
        return "{:,}".format(int(v))
    if abs(v) >= 100:
        return "{:,.0f}".format(v)
    return "{:.2f}".format(v)


def load_phases(path):
    out = []
    try:
        with open(path) as f:
            for line in f:
                if line.strip():
                    out.append(json.loads(line))
    except OSError:
        pass
    return out


def phase_cpu(p):
    """CPU seconds each process used during one phase record."""
    out = {}
    for label, a in (p.get("after") or {}).items():
        b = (p.get("before") or {}).get(label) or {}
        if a.get("cpu_s") is not None and b.get("cpu_s") is not None:
            out[label] = a["cpu_s"] - b["cpu_s"]
    return out


def process_stats(targets, phases, fio_dir):
    """Per process: peak RSS, CPU total, CPU in write phases, GiB written."""
    procs = []
    for t in targets:
        recs = [p for p in phases if p["target"] == t]
        end = next((p for p in recs if p["phase"] == "end"), None)
        if not end or not end.get("after"):
            continue
        written = 0
        write_cpu = {}
        for p in recs:
            ph = p["phase"]
            if ph == "end" or not (ph == "prefill" or "write" in ph):
                continue
            j = load_fio(os.path.join(fio_dir, "%s-%s.json" % (ph, t)))
            if j:
                written += j["write"].get("io_bytes", 0)
            for label, c in phase_cpu(p).items():
                write_cpu[label] = write_cpu.get(label, 0.0) + c
        attached = sorted({p["attached"] for p in recs if p.get("attached") and p["phase"] != "end"})
        leader_end = end.get("leader_before")
        for label, s in end["after"].items():
            role = ""
            if t.startswith("robib"):
                role = "leader" if label == leader_end else "follower"
                if label in attached:
                    role += ", fio attached"
            else:
                role = "reference"
            wc = write_cpu.get(label)
            procs.append({
                "target": t, "process": label, "role": role, "pid": s.get("pid"),
                "alive_at_end": s.get("alive"),
                "peak_rss_mib": s["hwm_kib"] / 1024.0 if s.get("hwm_kib") is not None else None,
                "rss_anon_mib_end": s["rss_anon_kib"] / 1024.0 if s.get("rss_anon_kib") is not None else None,
                "rss_file_mib_end": s["rss_file_kib"] / 1024.0 if s.get("rss_file_kib") is not None else None,
                "cpu_s_total": s.get("cpu_s"),
                "cpu_s_write_phases": wc,
                "gib_written": written / GIB,
                "cpu_s_per_gib_written": wc / (written / GIB) if wc is not None and written else None,
            })
    return procs


def wan_delay_ms(target):
    """One-way link delay of a robib-3site-wanNms target, else None."""
    m = re.fullmatch(r"robib-3site-wan(\d+)ms", target)
    return int(m.group(1)) if m else None


def variant(target):
    """A robib-3site variant that runs some jobs only (the WAN targets,
    robib-3site-fwd and robib-3site-tls) and is compared with robib-3site."""
    return wan_delay_ms(target) is not None or target in ("robib-3site-fwd", "robib-3site-tls")


def best_baseline(values, targets, higher_is_better):
    """(target, value) of the better of the baselines that have a value."""
    have = [(t, values.get(t)) for t in BASELINES if t in targets and values.get(t) is not None]
    if not have:
        return None, None
    pick = max if higher_is_better else min
    return pick(have, key=lambda tv: tv[1])


def ratio_columns(targets):
    """[(key, header, numerator, denominator or None = best baseline)]."""
    bases = [t for t in BASELINES if t in targets]
    cols = []
    if bases:
        best = "best(%s)" % ", ".join(bases) if len(bases) > 1 else bases[0]
        for a in ("robib-3site", "robib-1site"):
            if a in targets:
                cols.append(("%s/best-baseline" % a, "%s / %s" % (a, best), a, None))
    if "robib-3site" in targets:
        for t in targets:
            if variant(t):
                cols.append(("%s/robib-3site" % t, "%s / robib-3site" % t, t, "robib-3site"))
    if "nbdkit-tls" in targets and "nbdkit" in targets:
        cols.append(("nbdkit-tls/nbdkit", "nbdkit-tls / nbdkit", "nbdkit-tls", "nbdkit"))
    return cols


def fio_raw(j):
    """The raw fio numbers of one job worth keeping: per direction (and
    sync) the I/O count and bytes, bandwidth, IOPS and the latency
    percentiles, plus runtime and error."""
    out = {"job_runtime_ms": j.get("job_runtime"), "error": j.get("error"),
           "usr_cpu": j.get("usr_cpu"), "sys_cpu": j.get("sys_cpu")}
    for d in ("read", "write", "trim"):
        io = j.get(d) or {}
        if io.get("total_ios"):
            out[d] = {k: io.get(k) for k in ("total_ios", "io_bytes", "bw_bytes", "iops", "runtime")}
            for lat in ("clat_ns", "lat_ns"):
                if io.get(lat):
                    out[d][lat] = {k: io[lat].get(k) for k in ("min", "max", "mean", "stddev", "percentile")}
    sync = j.get("sync") or {}
    if sync.get("total_ios"):
        out["sync"] = {"total_ios": sync["total_ios"],
                       "lat_ns": {k: (sync.get("lat_ns") or {}).get(k)
                                  for k in ("min", "max", "mean", "stddev", "percentile")}}
    return out


def collect_raw(fio_dir, targets, jobs):
    """{job: {target: fio_raw}} for every fio result there is."""
    raw = {}
    for job in ["prefill"] + jobs + ["seq-write-1M-direct"]:
        for t in targets:
            j = load_fio(os.path.join(fio_dir, "%s-%s.json" % (job, t)))
            if j:
                raw.setdefault(job, {})[t] = fio_raw(j)
    return raw


def collect_rows(args, targets, jobs, problems):
    rows = []
    for job in jobs:
        per = {}
        for t in targets:
            j = load_fio(os.path.join(args.dir, "%s-%s.json" % (job, t)))
            per[t] = {m[0]: m for m in metrics(job, j)} if j else {}
            if j is None and not (variant(t) and job not in args.wan_jobs.split()):
                problems.append("%s on %s: no fio result" % (job, t))
        names = []
        for t in targets:
            for name in per[t]:
                if name not in names:
                    names.append(name)
        for name in names:
            unit, better = next((per[t][name][2], per[t][name][3]) for t in targets if name in per[t])
            values = {t: per[t].get(name, (None, None))[1] for t in targets}
            rows.append({"job": job, "metric": name, "unit": unit, "higher_is_better": better,
                         "values": values})
    for r in rows:
        if r["metric"] == "fio error":
            r["ratios"], r["best_baseline"] = {}, None
            continue
        bname, bval = best_baseline(r["values"], targets, r["higher_is_better"])
        r["best_baseline"] = bname
        rr = {}
        for key, _, num, den in ratio_columns(targets):
            va = r["values"].get(num)
            vb = bval if den is None else r["values"].get(den)
            rr[key] = va / vb if va is not None and vb else None
        r["ratios"] = rr
    return rows


def metric_tables(rows, targets):
    """One markdown table per metric: a row per job."""
    cols = ratio_columns(targets)
    out = []
    metrics_seen = []
    for r in rows:
        if r["metric"] not in metrics_seen:
            metrics_seen.append(r["metric"])
    for name in metrics_seen:
        rs = [r for r in rows if r["metric"] == name]
        unit, better = rs[0]["unit"], rs[0]["higher_is_better"]
        title = name + (" (%s)" % unit if unit else "")
        if name == "fio error":
            hint = ""
        elif better:
            hint = " — higher is better; a ratio above 1 means robib is faster"
        else:
            hint = " — lower is better; a ratio below 1 means robib is faster"
        out += ["", "### %s%s" % (title, hint), "",
                "| job | " + " | ".join(targets) + "".join(" | %s" % c[1] for c in cols) + " |",
                "| --- |" + " ---: |" * (len(targets) + len(cols))]
        for r in rs:
            cells = [fmt(r["values"][t]) for t in targets]
            for key, _, _, den in cols:
                v = r["ratios"].get(key)
                cell = "n/a" if v is None else "%.2f" % v
                if v is not None and den is None and len([t for t in BASELINES if t in targets]) > 1:
                    cell += " (%s)" % r["best_baseline"]
                cells.append(cell)
            out.append("| %s | %s |" % (r["job"], " | ".join(cells)))
    return out


def goals(value, targets, derived):
    """The issue's goals: a list of {goal, status, text}. Each needs the
    targets it compares; without them it is SKIP."""
    res = []

    def add(goal, ok, text):
        status = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
        res.append({"goal": goal, "status": status, "text": text})

    def need(*ts):
        return [t for t in ts if t not in targets]

    # (1) 4 KiB random writes at queue depth 32.
    g = "(1) rand-write-4k-qd32 IOPS: robib-3site >= best of nbdkit/qemu-nbd"
    v3 = value("rand-write-4k-qd32", "IOPS", "robib-3site")
    bname, bval = best_baseline({t: value("rand-write-4k-qd32", "IOPS", t) for t in BASELINES},
                                targets, True)
    if v3 is None or bval is None:
        add(g, None, "needs robib-3site and nbdkit or qemu-nbd results for rand-write-4k-qd32")
    else:
        add(g, v3 >= bval, "robib-3site %s vs %s %s: ratio %.2f" % (fmt(v3), bname, fmt(bval), v3 / bval))

    # (2) sequential writes against the 3-site limit.
    g = "(2) seq-write-1M: robib-3site >= 0.8 x 3-site write limit (raw / 6)"
    r3 = derived.get("robib_3site_seq_write_mib_s")
    limit = derived.get("three_site_seq_write_limit_direct_mib_s")
    src = "raw seq-write-1M-direct (O_DIRECT, the disk)"
    if limit is None:
        limit = derived.get("three_site_seq_write_limit_mib_s")
        src = "raw seq-write-1M"
    if r3 is None or limit is None:
        add(g, None, "needs robib-3site and raw results for seq-write-1M")
    else:
        text = "robib-3site %s MiB/s vs 0.8 x %s MiB/s (%s / 6) = %s MiB/s: %.2f of the limit" % (
            fmt(r3), fmt(limit), src, fmt(0.8 * limit), r3 / limit)
        buffered = derived.get("three_site_seq_write_limit_mib_s")
        if buffered is not None and limit != buffered:
            text += "; against the page-cache raw figure (%s MiB/s limit) it is %.2f" % (
                fmt(buffered), r3 / buffered)
        add(g, r3 >= 0.8 * limit, text)

    # (3) flush latency and rate against nbdkit.
    g = "(3) rand-write-4k-flush: robib-3site flushes/s >= 0.5 x nbdkit"
    f3 = value("rand-write-4k-flush", "flush latency p50", "robib-3site")
    fk = value("rand-write-4k-flush", "flush latency p50", "nbdkit")
    r3s = value("rand-write-4k-flush", "flushes/s", "robib-3site")
    rks = value("rand-write-4k-flush", "flushes/s", "nbdkit")
    if None in (f3, fk, r3s) or not rks:
        add(g, None, "needs robib-3site and nbdkit results for rand-write-4k-flush")
    else:
        add(g, r3s / rks >= 0.5, "flushes/s robib-3site %s vs nbdkit %s: ratio %.2f" % (fmt(r3s), fmt(rks), r3s / rks))
    g = "(3) rand-write-4k-flush: robib-3site flush p50 <= nbdkit p50 + one replicated commit (p50)"
    c3 = ((derived.get("commit_latency_us") or {}).get("robib-3site") or {}).get("p50")
    if None in (f3, fk, c3):
        add(g, None, "needs robib-3site (with its `volume stats` sample) and nbdkit results for rand-write-4k-flush")
    else:
        add(g, f3 <= fk + c3, "flush p50 robib-3site %s µs vs nbdkit %s µs + commit p50 %s µs = %s µs" % (
            fmt(f3), fmt(fk), fmt(c3), fmt(fk + c3)))

    # (12) flush p50 against nbdkit and the raw floor (raw's
    # rand-write-4k-flush: pwrite + fdatasync over written blocks).
    g = "(12) rand-write-4k-flush: robib-3site flush p50 <= nbdkit p50 + 2 x raw floor p50 + 150 µs"
    fr = value("rand-write-4k-flush", "flush latency p50", "raw")
    if None in (f3, fk, fr):
        add(g, None, "needs robib-3site, nbdkit and raw results for rand-write-4k-flush")
    else:
        bound = fk + 2 * fr + 150
        add(g, f3 <= bound, "flush p50 robib-3site %s µs vs %s + 2 x %s + 150 = %s µs" % (
            fmt(f3), fmt(fk), fmt(fr), fmt(bound)))
    g = "(12) seq-write-1M: CPU per GiB written <= 3 CPU-s per robib-3site agent"
    per = derived.get("seq_write_cpu_s_per_gib")
    if not per:
        add(g, None, "needs robib-3site's seq-write-1M phase record")
    else:
        add(g, max(per.values()) <= 3.0, ", ".join("%s %.2f" % (k, v) for k, v in sorted(per.items())))

    # (14) TLS on every link costs at most 10%: flushes (p50, as a rate:
    # insecure p50 / TLS p50) and QD32 IOPS at least 0.9 x robib-3site
    # (--insecure) in the same run. Where NBD over TLS costs a mature
    # server more than that on this machine (nbdkit-tls / nbdkit: the
    # clients' own encryption shares the CPUs), that ratio is the floor the
    # goal is held to, and the line says so.
    for job, metric, higher in (("rand-write-4k-flush", "flush latency p50", False),
                                ("rand-write-4k-qd32", "IOPS", True)):
        g = "(14) TLS: %s %s >= 0.9 x robib-3site (--insecure)" % (job, metric)
        vt = value(job, metric, "robib-3site-tls")
        vi = value(job, metric, "robib-3site")
        if vt is None or vi is None:
            add(g, None, "needs %s on robib-3site and robib-3site-tls" % job)
            continue
        r = vt / vi if higher else vi / vt
        kt, kp = value(job, metric, "nbdkit-tls"), value(job, metric, "nbdkit")
        floor = None
        if kt and kp:
            floor = kt / kp if higher else kp / kt
        text = "robib-3site-tls %s vs robib-3site %s: %.2f" % (fmt(vt), fmt(vi), r)
        if floor is not None:
            text += "; nbdkit-tls / nbdkit %s / %s = %.2f" % (fmt(kt), fmt(kp), floor)
        if floor is not None and floor < 0.9 and r < 0.9:
            add(g + " (or the NBD-over-TLS floor nbdkit-tls / nbdkit)", r >= floor, text + " (the floor)")
        else:
            add(g, r >= 0.9, text)

    # (4) WAN: every robib-3site-wanNms target; the 10 ms one is the goal,
    # others are information.
    base_p50 = value("rand-write-4k-flush", "flush latency p50", "robib-3site")
    base_bw = value("seq-write-1M", "bandwidth", "robib-3site")
    wans = sorted((wan_delay_ms(t), t) for t in targets if wan_delay_ms(t) is not None)
    if not any(d == 10 for d, _ in wans):
        add("(4) WAN 10 ms (robib-3site-wan10ms)", None, "robib-3site-wan10ms was not run")
    for d, t in wans:
        tag = "(4)" if d == 10 else "(info)"
        rtt_us = 2 * d * 1000.0
        p50 = value("rand-write-4k-flush", "flush latency p50", t)
        g = "%s WAN %d ms flush p50 <= 1.25 x (%d ms + robib-3site flush p50)" % (tag, d, 2 * d)
        if p50 is None or base_p50 is None:
            add(g, None, "needs rand-write-4k-flush on robib-3site and %s" % t)
        else:
            bound = 1.25 * (rtt_us + base_p50)
            add(g, p50 <= bound, "%s flush p50 %s µs vs bound 1.25 x (%s + %s) = %s µs" % (
                t, fmt(p50), fmt(rtt_us), fmt(base_p50), fmt(bound)))
        bw = value("seq-write-1M", "bandwidth", t)
        g = "%s WAN %d ms seq-write-1M >= 0.5 x robib-3site (0 ms)" % (tag, d)
        if bw is None or not base_bw:
            add(g, None, "needs seq-write-1M on robib-3site and %s" % t)
        else:
            add(g, bw >= 0.5 * base_bw, "%s %s MiB/s vs robib-3site %s MiB/s: ratio %.2f" % (
                t, fmt(bw), fmt(base_bw), bw / base_bw))
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--jobs", required=True)
    ap.add_argument("--wan-jobs", default="", help="jobs the WAN targets ran (missing others are not problems)")
    ap.add_argument("--targets", default="robib-3site robib-1site nbdkit qemu-nbd raw")
    ap.add_argument("--phases")
    ap.add_argument("--meta", default="{}")
    ap.add_argument("--markdown")
    ap.add_argument("--json")
    args = ap.parse_args()
    targets = args.targets.split()
    meta = json.loads(args.meta)
    phases = load_phases(args.phases) if args.phases else []

    problems = []
    rows = collect_rows(args, targets, args.jobs.split(), problems)

    def value(job, metric, target):
        for r in rows:
            if r["job"] == job and r["metric"] == metric:
                return r["values"].get(target)
        return None

    lines = [
        "robib benchmark: %s — fio, %ss per job, %s-byte volume, %s CPUs, %s, git %s"
        % (", ".join(targets), meta.get("runtime_s", "?"), meta.get("size_bytes", "?"), meta.get("host_cpus", "?"),
           meta.get("filesystem", "?"), meta.get("git", "?")),
    ]
    if meta.get("skipped"):
        lines += ["", "**Skipped targets:** " + meta["skipped"].strip("; ")]
    lines += metric_tables(rows, targets)

    notes = ["",
             "NBD targets: fio --ioengine=nbd, one connection per fio job (multi-conn: 4 jobs, 4 connections), "
             "iodepth 8 (seq-write-1M, seq-read-1M, write-64k-flush-1M, multi-conn: each), 32 (rand-write-4k-qd32, "
             "rand-read-4k), 1 (rand-write-4k-qd1, rand-write-4k-flush). robib-3site and its WAN variants: "
             "the write jobs run at one site (a follower when the target started; with --leader-follows-writes "
             "the leader has moved there before the first job: see the table of runs), the read jobs at a site "
             "that is not the leader. robib-3site-fwd: --leader-follows-writes=false, fio at a follower, so "
             "every write is forwarded to a remote leader. "
             "raw: fio on a plain file, psync (iodepth 1) for the 1 MiB and the iodepth-1 jobs, libaio for the "
             "others, %s, --invalidate=0. Flush latency = fio's sync latency (an NBD FLUSH; fsync(2) on raw)."
             % ("O_DIRECT" if meta.get("raw_direct") == "1" else "through the page cache")]
    if any(wan_delay_ms(t) is not None for t in targets):
        notes.append("robib-3site-wanNms: agents started with --link-delay Nms (one-way, on every site-to-site "
                     "connection; a round trip costs 2N ms); jobs: %s." % (args.wan_jobs or "?"))

    derived = {}
    raw_bw = value("seq-write-1M", "bandwidth", "raw")
    r3 = value("seq-write-1M", "bandwidth", "robib-3site")
    derived["robib_3site_seq_write_mib_s"] = r3
    if raw_bw:
        limit = raw_bw / THREE_SITE_WRITE_FACTOR
        derived["three_site_seq_write_limit_mib_s"] = limit
        derived["robib_3site_seq_write_over_limit"] = r3 / limit if r3 is not None else None
        notes += ["",
                  "**3-site sequential write limit** = raw seq-write bandwidth / %d (each of 3 sites writes "
                  "every byte twice, Raft log then volume, all on this one disk) = %s / %d = **%s MiB/s**; "
                  "robib-3site seq-write = %s MiB/s = **%s** of that limit."
                  % (THREE_SITE_WRITE_FACTOR, fmt(raw_bw), THREE_SITE_WRITE_FACTOR, fmt(limit), fmt(r3),
                     "n/a" if r3 is None else "%.2f" % (r3 / limit))]
    jd = load_fio(os.path.join(args.dir, "seq-write-1M-direct-raw.json"))
    if jd and jd["write"].get("bw_bytes"):
        dbw = jd["write"]["bw_bytes"] / (1 << 20)
        dlimit = dbw / THREE_SITE_WRITE_FACTOR
        derived["raw_seq_write_direct_mib_s"] = dbw
        derived["three_site_seq_write_limit_direct_mib_s"] = dlimit
        derived["robib_3site_seq_write_over_limit_direct"] = r3 / dlimit if r3 is not None else None
        notes += ["",
                  "The raw seq-write above goes through the page cache and, as the file fits in the dirty "
                  "cache, measures memory more than the disk. The same job with O_DIRECT (the disk itself): "
                  "%s MiB/s, so the limit from the disk is %s / %d = **%s MiB/s**, and robib-3site reaches "
                  "**%s** of it."
                  % (fmt(dbw), fmt(dbw), THREE_SITE_WRITE_FACTOR, fmt(dlimit),
                     "n/a" if r3 is None else "%.2f" % (r3 / dlimit))]

    # WAN summary: what the delay costs.
    wans = sorted((wan_delay_ms(t), t) for t in targets if wan_delay_ms(t) is not None)
    if wans and "robib-3site" in targets:
        derived["wan"] = []
        notes += ["", "**WAN emulation** (robib-3site at 0 ms and with a one-way link delay; flush bound = "
                  "1.25 × (round trip + the 0 ms flush p50)):", "",
                  "| target | one-way delay (ms) | seq-write-1M (MiB/s) | ÷ 0 ms | flush p50 (µs) | flush bound (µs) "
                  "| flushes/s | write-64k-flush-1M (MiB/s) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        base_bw = r3
        base_p50 = value("rand-write-4k-flush", "flush latency p50", "robib-3site")
        for d, t in [(0, "robib-3site")] + wans:
            bw = value("seq-write-1M", "bandwidth", t)
            p50 = value("rand-write-4k-flush", "flush latency p50", t)
            bound = 1.25 * (2000.0 * d + base_p50) if base_p50 is not None else None
            fps = value("rand-write-4k-flush", "flushes/s", t)
            w64 = value("write-64k-flush-1M", "bandwidth", t)
            derived["wan"].append({"target": t, "one_way_delay_ms": d, "seq_write_mib_s": bw,
                                   "seq_write_over_0ms": bw / base_bw if bw is not None and base_bw else None,
                                   "flush_p50_us": p50, "flush_p50_bound_us": bound, "flushes_per_s": fps,
                                   "write_64k_flush_1m_mib_s": w64})
            notes.append("| %s | %d | %s | %s | %s | %s | %s | %s |" % (
                t, d, fmt(bw), "n/a" if bw is None or not base_bw else "%.2f" % (bw / base_bw), fmt(p50),
                fmt(bound), fmt(fps), fmt(w64)))

    # Settle waits, machine load and leadership per phase.
    phase_rows = [p for p in phases if p["target"] in targets and p["phase"] != "end"]
    if phase_rows:
        notes += ["", "Per fio run: wall time of fio; for robib the wait until the cluster had settled "
                  "(write-back drained, every site applied the commit index); the 1-minute load average "
                  "after it (this machine has %s CPUs: much more means something else was running); for "
                  "the 3-site targets the site fio used and the leader before the run and after the settle."
                  % meta.get("host_cpus", "?"), "",
                  "| target | phase | fio (s) | settle (s) | load | attached | leader before → after |",
                  "| --- | --- | ---: | ---: | ---: | --- | --- |"]
        for p in phase_rows:
            st = p.get("settle") or {}
            settle = "" if not st else fmt(st.get("settle_s")) + ("" if st.get("ok", True) else " (NOT settled)")
            leaders = ""
            three = p["target"].startswith("robib-3site")
            if three:
                lb, la = p.get("leader_before") or "?", st.get("leader") or "?"
                leaders = lb + (" → " + la + " (CHANGED)" if la != lb else "")
            notes.append("| %s | %s | %s | %s | %s | %s | %s |" % (
                p["target"], p["phase"], fmt(p.get("elapsed_s")), settle, fmt(p.get("loadavg1_after")),
                p.get("attached") or "", leaders))
            if p.get("fio_rc"):
                problems.append("%s on %s: fio exited %s" % (p["phase"], p["target"], p["fio_rc"]))
            if st and not st.get("ok", True):
                problems.append("%s on %s: the cluster did not settle" % (p["phase"], p["target"]))
            att = p.get("attached")
            follows = three and p["target"] != "robib-3site-fwd"
            if not att or not three or p["phase"] == "prefill" and follows:
                pass
            elif follows and "read" not in p["phase"]:
                # Writes at the writer site, where the leader should have moved.
                if att != p.get("leader_before"):
                    problems.append("%s on %s: the leader (%s) was not the writer site %s: writes were forwarded" % (
                        p["phase"], p["target"], p.get("leader_before"), att))
            elif att in (p.get("leader_before"), st.get("leader")):
                problems.append("%s on %s: attached site %s was the leader" % (p["phase"], p["target"], att))

    procs = process_stats(targets, phases, args.dir)
    if procs:
        notes += ["", "Processes (peak RSS = VmHWM when the target was stopped; RSS anon / file = RssAnon and "
                  "RssFile then (file = mapped page cache, e.g. bbolt's mmap of the Raft log); CPU = "
                  "utime+stime; write phases = prefill and write jobs, each with its settle wait; GiB written "
                  "= what fio wrote to the target in those phases):", "",
                  "| target | process | role | peak RSS (MiB) | RSS anon / file at end (MiB) | CPU s total "
                  "| CPU s in write phases | GiB written | CPU s per GiB written |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for p in procs:
            notes.append("| %s | %s | %s | %s | %s / %s | %s | %s | %s | %s |" % (
                p["target"], p["process"], p["role"], fmt(p["peak_rss_mib"]), fmt(p["rss_anon_mib_end"]),
                fmt(p["rss_file_mib_end"]), fmt(p["cpu_s_total"]),
                fmt(p["cpu_s_write_phases"]), fmt(p["gib_written"]), fmt(p["cpu_s_per_gib_written"])))
            if p["alive_at_end"] is False:
                problems.append("%s %s was not running at the end" % (p["target"], p["process"]))

    if meta.get("server_logs"):
        notes += ["", "Server logs (kept in %s): %s." % (meta.get("server_logs_dir") or "?",
                                                        meta["server_logs"].strip("; "))]
        for name, n in re.findall(r"([^;:]+): (\d+) ERROR", meta["server_logs"]):
            if int(n):
                problems.append("%s logged %s ERROR line(s) while running" % (name.strip(), n))
    if meta.get("failures"):
        problems.append(meta["failures"].strip("; "))
    if problems:
        notes += ["", "**Problems:** " + "; ".join(problems)]

    # The write-back stage's commit latency during rand-write-4k-flush
    # (robib volume stats, sampled at the attached site before fio ended).
    stage_rows = []
    for t in targets:
        if not t.startswith("robib-"):
            continue
        st = load_json(os.path.join(args.dir, "stage-rand-write-4k-flush-%s.json" % t))
        if st and st.get("commits"):
            derived.setdefault("commit_latency_us", {})[t] = {
                "p50": st.get("commit_p50_us"), "p99": st.get("commit_p99_us"), "mean": st.get("commit_mean_us"),
                "commits": st.get("commits"), "site": st.get("site")}
            stage_rows.append("| %s | %s | %s | %s | %s | %s |" % (
                t, st.get("site"), fmt(st.get("commits")), fmt(st.get("commit_p50_us")),
                fmt(st.get("commit_p99_us")), fmt(value("rand-write-4k-flush", "flush latency p50", t))))
    # Where the flush's time went, stage by stage at every site (the
    # breakdown of the same `volume stats` sample; cluster/stages.go).
    breakdown_rows = []
    for t in targets:
        st = load_json(os.path.join(args.dir, "stage-rand-write-4k-flush-%s.json" % t)) if t.startswith("robib-") else None
        for x in (st or {}).get("breakdown") or []:
            derived.setdefault("breakdown_us", {}).setdefault(t, []).append(x)
            breakdown_rows.append("| %s | %s | %s | %s | %s | %s |" % (
                t, x.get("site"), x.get("stage"), fmt(x.get("p50_us")), fmt(x.get("p99_us")), fmt(x.get("count"))))
    if breakdown_rows:
        notes += ["", "Where the time of rand-write-4k-flush went, stage by stage at every site "
                  "(`robib volume stats`, newest 1,024 of each stage; NBD stages other than nbd.flush "
                  "sample one request in 16):", "",
                  "| target | site | stage | p50 (µs) | p99 (µs) | count |",
                  "| --- | --- | --- | ---: | ---: | ---: |"] + breakdown_rows
    if stage_rows:
        notes += ["", "One replicated commit, as the write-back stage at the attached site timed it during "
                  "rand-write-4k-flush (`robib volume stats`, newest 1,024 commits; a FLUSH waits for one), "
                  "next to fio's flush p50:", "",
                  "| target | site | commits | commit p50 (µs) | commit p99 (µs) | fio flush p50 (µs) |",
                  "| --- | --- | ---: | ---: | ---: | ---: |"] + stage_rows

    # CPU per GiB of the robib-3site agents in seq-write-1M alone (issue 12).
    seq = next((p for p in phases if p["target"] == "robib-3site" and p["phase"] == "seq-write-1M"), None)
    js = load_fio(os.path.join(args.dir, "seq-write-1M-robib-3site.json"))
    if seq and js and js["write"].get("io_bytes"):
        gib = js["write"]["io_bytes"] / GIB
        derived["seq_write_cpu_s_per_gib"] = {label: c / gib for label, c in phase_cpu(seq).items()}

    gl = goals(value, targets, derived)
    notes += ["", "**Goals** (issues 5 and 12; informational, they do not set the exit code):", ""]
    notes += ["- %s %s: %s" % (g["status"], g["goal"], g["text"]) for g in gl]

    if meta.get("elapsed_s"):
        notes += ["", "The run took %s s (estimated %s s); load average %s at the start, %s at the end%s." % (
            meta["elapsed_s"], meta.get("estimate_s", "?"), meta.get("loadavg_start", "?"),
            meta.get("loadavg_end", "?"),
            "" if meta.get("other_robib_processes", "0") in ("0", "") else
            "; **%s robib processes this benchmark did not start were running when it began**"
            % meta["other_robib_processes"])]

    md = "\n".join(lines + notes) + "\n"
    sys.stdout.write(md)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "targets": targets, "jobs": args.jobs.split(),
                       "ratio_columns": [{"key": k, "header": h, "numerator": n,
                                          "denominator": d or "best of %s" % "/".join(
                                              t for t in BASELINES if t in targets)}
                                         for k, h, n, d in ratio_columns(targets)],
                       "rows": rows, "derived": derived, "goals": gl,
                       "fio": collect_raw(args.dir, targets, args.jobs.split()),
                       "processes": procs, "phases": phases, "problems": problems}, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
