#!/usr/bin/env python3
"""Turns the fio JSON files of tests/bench/run.sh into a side-by-side table.

Reads DIR/JOB-robib.json and DIR/JOB-nbdkit.json for every job, prints a
markdown table (robib, nbdkit, ratio robib/nbdkit) to stdout and writes it
and a JSON copy to the given paths.
"""

import argparse
import json
import os
import sys

TARGETS = ("robib", "nbdkit")


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
    if j.get("sync", {}).get("total_ios"):
        lat = j["sync"]["lat_ns"]
        out += [
            ("flush latency p50", pct(lat, "50.000000"), "µs", False),
            ("flush latency p99", pct(lat, "99.000000"), "µs", False),
            ("flushes", j["sync"]["total_ios"], "", True),
        ]
    if j.get("error"):
        out.append(("fio error", j["error"], "", False))
    return out


def fmt(v):
    if v is None:
        return "n/a"
    if isinstance(v, int) or float(v).is_integer() and abs(v) >= 1000:
        return "{:,}".format(int(v))
    if abs(v) >= 100:
        return "{:,.0f}".format(v)
    return "{:.2f}".format(v)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--jobs", required=True)
    ap.add_argument("--meta", default="{}")
    ap.add_argument("--markdown")
    ap.add_argument("--json")
    args = ap.parse_args()

    rows = []
    for job in args.jobs.split():
        per = {}
        for t in TARGETS:
            with open(os.path.join(args.dir, "%s-%s.json" % (job, t))) as f:
                data = json.load(f)
            per[t] = {m[0]: m for m in metrics(job, data["jobs"][0])}
        for name, (_, _, unit, better) in per["robib"].items():
            r = per["robib"][name][1]
            k = per["nbdkit"].get(name, (None, None))[1]
            ratio = r / k if r is not None and k else None
            rows.append({"job": job, "metric": name, "unit": unit, "higher_is_better": better,
                         "robib": r, "nbdkit": k, "ratio": ratio})

    meta = json.loads(args.meta)
    lines = [
        "robib vs nbdkit file plugin — fio --ioengine=nbd, %ss per job, %s-byte volume, %s CPUs, %s"
        % (meta.get("runtime_s", "?"), meta.get("size_bytes", "?"), meta.get("host_cpus", "?"),
           meta.get("filesystem", "?")),
        "",
        "| job | metric | robib | nbdkit | robib/nbdkit |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        unit = " " + r["unit"] if r["unit"] else ""
        ratio = "n/a" if r["ratio"] is None else "%.2f%s" % (r["ratio"], "" if r["higher_is_better"] else " (lower is better)")
        lines.append("| %s | %s%s | %s | %s | %s |" % (r["job"], r["metric"], " (" + r["unit"] + ")" if unit else "",
                                                       fmt(r["robib"]), fmt(r["nbdkit"]), ratio))
    md = "\n".join(lines) + "\n"
    sys.stdout.write(md)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
