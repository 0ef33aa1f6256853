#!/usr/bin/env python3
"""Issue 12's goals for the Raft log store alone, from the output of

    go test -run='^$' -bench='LogStoreAppend|RawFloor' ./cluster/dcdlog

read on stdin (and echoed). The floors come from BenchmarkRawFloor in the
same run: a 4 KiB pwrite + fdatasync over written blocks, and O_DIRECT
sequential 4 MiB writes (the disk's bandwidth for one writer).

  - 4 KiB durable append p50 <= 1.25 x the 4 KiB floor's p50
  - 8 x 512 KiB per StoreLogs >= 0.8 x the O_DIRECT bandwidth

Prints PASS / FAIL lines; the exit status is 0 either way (a missed goal is
a result, not a broken benchmark), 2 if a figure is missing.
"""
import re
import sys

LINE = re.compile(r"^(Benchmark\S+?)(?:-\d+)?\s+\d+\s+(.*)$")


def parse(lines):
    res = {}
    for line in lines:
        m = LINE.match(line.strip())
        if not m:
            continue
        name, rest = m.group(1), m.group(2)
        vals = {}
        for v, unit in re.findall(r"([0-9.]+) (\S+)", rest):
            vals[unit] = float(v)
        res[name] = vals
    return res


def main():
    lines = sys.stdin.read().splitlines()
    for line in lines:
        print(line)
    r = parse(lines)

    def get(name, unit):
        v = r.get(name, {}).get(unit)
        if v is None:
            print("storegoals: missing %s (%s)" % (name, unit), file=sys.stderr)
            sys.exit(2)
        return v

    floor = get("BenchmarkRawFloor/pwrite-fdatasync/4KiB", "p50-us")
    direct = get("BenchmarkRawFloor/odirect/4MiB", "MB/s")
    print()
    print("Log store goals (issue 12), floors from BenchmarkRawFloor in this run:")
    for mode in ("pwritev", "pwritev-steady"):
        small = r.get("BenchmarkLogStoreAppend/dcdlog-%s/4KiBx1" % mode, {}).get("p50-us")
        if small is not None:
            print("- %s 4 KiB append p50 <= 1.25 x floor: %.0f us vs 1.25 x %.0f = %.0f us (%.2fx)  [%s]" % (
                "PASS" if small <= 1.25 * floor else "FAIL", small, floor, 1.25 * floor, small / floor, mode))
        big = r.get("BenchmarkLogStoreAppend/dcdlog-%s/512KiBx8" % mode, {}).get("MB/s")
        if big is not None:
            print("- %s 8 x 512 KiB >= 0.8 x O_DIRECT bandwidth: %.0f MB/s vs 0.8 x %.0f = %.0f MB/s (%.2fx)  [%s]" % (
                "PASS" if big >= 0.8 * direct else "FAIL", big, direct, 0.8 * direct, big / direct, mode))


if __name__ == "__main__":
    main()
