#!/usr/bin/env python3
"""Turns the fio JSON files of tests/bench/run.sh into a side-by-side table.

Reads DIR/JOB-TARGET.json for every job and target (a missing or broken file
gives n/a cells) and the phase records DIR/phases.jsonl (CPU/RSS samples of
the target's processes around every fio run, settle waits, which site fio was
attached to), prints a markdown table (one column per target, ratio columns
robib-3site/nbdkit and robib-1site/nbdkit) with a footer (derived 3-site write
limit, settle waits, leadership, per-process peak RSS and CPU per GiB
written) to stdout, and writes it and a JSON copy to the given paths.
"""

import argparse
import json
import os
import sys

GIB = float(1 << 30)
RATIOS = (("robib-3site", "nbdkit"), ("robib-1site", "nbdkit"))
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
            for label, a in (p.get("after") or {}).items():
                b = (p.get("before") or {}).get(label) or {}
                if a.get("cpu_s") is not None and b.get("cpu_s") is not None:
                    write_cpu[label] = write_cpu.get(label, 0.0) + a["cpu_s"] - b["cpu_s"]
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--jobs", required=True)
    ap.add_argument("--targets", default="robib-3site robib-1site nbdkit raw")
    ap.add_argument("--phases")
    ap.add_argument("--meta", default="{}")
    ap.add_argument("--markdown")
    ap.add_argument("--json")
    args = ap.parse_args()
    targets = args.targets.split()
    ratios = [(a, b) for a, b in RATIOS if a in targets and b in targets]
    meta = json.loads(args.meta)
    phases = load_phases(args.phases) if args.phases else []

    rows = []
    fio_errors = []
    for job in args.jobs.split():
        per = {}
        for t in targets:
            j = load_fio(os.path.join(args.dir, "%s-%s.json" % (job, t)))
            per[t] = {m[0]: m for m in metrics(job, j)} if j else {}
            if j is None:
                fio_errors.append("%s on %s: no fio result" % (job, t))
        names = []
        for t in targets:
            for name in per[t]:
                if name not in names:
                    names.append(name)
        for name in names:
            unit, better = next((per[t][name][2], per[t][name][3]) for t in targets if name in per[t])
            values = {t: per[t].get(name, (None, None))[1] for t in targets}
            rr = {}
            for a, b in ratios:
                va, vb = values.get(a), values.get(b)
                rr["%s/%s" % (a, b)] = va / vb if va is not None and vb else None
            rows.append({"job": job, "metric": name, "unit": unit, "higher_is_better": better,
                         "values": values, "ratios": rr})

    def value(job, metric, target):
        for r in rows:
            if r["job"] == job and r["metric"] == metric:
                return r["values"].get(target)
        return None

    lines = [
        "robib benchmark: %s — fio, %ss per job, %s-byte volume, %s CPUs, %s, git %s"
        % (", ".join(targets), meta.get("runtime_s", "?"), meta.get("size_bytes", "?"), meta.get("host_cpus", "?"),
           meta.get("filesystem", "?"), meta.get("git", "?")),
        "",
        "| job | metric | " + " | ".join(targets) + "".join(" | %s/%s" % r for r in ratios) + " |",
        "| --- | --- |" + " ---: |" * (len(targets) + len(ratios)),
    ]
    for r in rows:
        label = r["metric"]
        if r["unit"] or not r["higher_is_better"]:
            label += " (" + "; ".join(x for x in (r["unit"], "" if r["higher_is_better"] else "lower is better") if x) + ")"
        cells = [fmt(r["values"][t]) for t in targets]
        cells += ["n/a" if r["ratios"][k] is None else "%.2f" % r["ratios"][k] for k in ("%s/%s" % x for x in ratios)]
        lines.append("| %s | %s | %s |" % (r["job"], label, " | ".join(cells)))

    notes = ["",
             "nbd targets: fio --ioengine=nbd, one connection, iodepth 8 (seq), 32 (rand), 1 (sync). raw: fio on a plain file, psync (iodepth 1) for the seq and sync "
             "jobs, libaio for the random queue-depth jobs, %s, --invalidate=0."
             % ("O_DIRECT" if meta.get("raw_direct") == "1" else "through the page cache")]

    derived = {}
    raw_bw = value("seq-write-1M", "bandwidth", "raw")
    r3 = value("seq-write-1M", "bandwidth", "robib-3site")
    if raw_bw:
        limit = raw_bw / THREE_SITE_WRITE_FACTOR
        derived["three_site_seq_write_limit_mib_s"] = limit
        derived["robib_3site_seq_write_mib_s"] = r3
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

    # Settle waits, machine load and leadership per phase.
    phase_rows = [p for p in phases if p["target"] in targets and p["phase"] != "end"]
    if phase_rows:
        notes += ["", "Per fio run: wall time of fio; for robib the wait until the cluster had settled "
                  "(write-back drained, every site applied the commit index); the 1-minute load average "
                  "after it (this machine has %s CPUs: much more means something else was running); for "
                  "robib-3site the site fio used and the leader before the run and after the settle."
                  % meta.get("host_cpus", "?"), "",
                  "| target | phase | fio (s) | settle (s) | load | attached | leader before → after |",
                  "| --- | --- | ---: | ---: | ---: | --- | --- |"]
        for p in phase_rows:
            st = p.get("settle") or {}
            settle = "" if not st else fmt(st.get("settle_s")) + ("" if st.get("ok", True) else " (NOT settled)")
            leaders = ""
            if p["target"] == "robib-3site":
                lb, la = p.get("leader_before") or "?", st.get("leader") or "?"
                leaders = lb + (" → " + la + " (CHANGED)" if la != lb else "")
            notes.append("| %s | %s | %s | %s | %s | %s | %s |" % (
                p["target"], p["phase"], fmt(p.get("elapsed_s")), settle, fmt(p.get("loadavg1_after")),
                p.get("attached") or "", leaders))
            if p.get("fio_rc"):
                fio_errors.append("%s on %s: fio exited %s" % (p["phase"], p["target"], p["fio_rc"]))
            if p["target"] == "robib-3site" and p.get("attached") and p.get("attached") in (
                    p.get("leader_before"), st.get("leader")):
                fio_errors.append("%s on robib-3site: attached site %s was the leader" % (p["phase"], p["attached"]))

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
                fio_errors.append("%s %s was not running at the end" % (p["target"], p["process"]))

    if meta.get("failures"):
        fio_errors.append(meta["failures"].strip("; "))
    if fio_errors:
        notes += ["", "**Problems:** " + "; ".join(fio_errors)]
    if meta.get("elapsed_s"):
        notes += ["", "The run took %s s; load average %s at the start, %s at the end%s." % (
            meta["elapsed_s"], meta.get("loadavg_start", "?"), meta.get("loadavg_end", "?"),
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
            json.dump({"meta": meta, "targets": targets, "rows": rows, "derived": derived,
                       "processes": procs, "phases": phases, "problems": fio_errors}, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
