#!/usr/bin/python3
"""libnbd checks of a robib NBD export, run by TestLibnbdPython.

Usage: /usr/bin/python3 nbd_checks.py CASE URI [URI2]

URI is an empty (fresh) export the case may scribble on; URI2 is a second,
different export. Prints "PASS CASE" and exits 0 on success; any failed
check raises (exit 1) with a message saying what was expected.
"""

import errno
import os
import sys

import nbd

HOLE = nbd.STATE_HOLE
ZERO = nbd.STATE_ZERO
KiB = 1024
MiB = 1024 * KiB


def connect(uri, meta=False, strict=True):
    h = nbd.NBD()
    h.set_handle_name("robib-e2e")
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    if not strict:
        # Send requests libnbd would refuse locally, so the server has to
        # deal with them.
        h.set_strict_mode(0)
    return h


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def extents(h, off, length):
    """Return [(offset, length, flags)] covering [off, off+length)."""
    out = []
    pos = off
    end = off + length
    while pos < end:
        got = []

        def cb(metacontext, offset, entries, err):
            if metacontext != nbd.CONTEXT_BASE_ALLOCATION:
                return 0
            check(offset == pos, "block status reply for offset %d, asked %d" % (offset, pos))
            o = offset
            for i in range(0, len(entries), 2):
                check(entries[i] > 0, "zero-length extent at %d" % o)
                got.append((o, entries[i], entries[i + 1]))
                o += entries[i]
            return 0

        h.block_status(end - pos, pos, cb)
        check(got, "block status returned no extents at %d" % pos)
        for e in got:
            if e[0] >= end:
                break
            out.append(e)
        pos = got[-1][0] + got[-1][1]
    return out


def flags_over(h, off, length):
    """Flags common to every extent overlapping [off, off+length), and the
    union of them."""
    exts = extents(h, off, length)
    common = HOLE | ZERO
    union = 0
    for _, _, f in exts:
        common &= f
        union |= f
    return common, union, exts


def expect_error(what, fn, errnos):
    try:
        fn()
    except nbd.Error as e:
        check(e.errnum in errnos, "%s: failed with errno %s (%s), want one of %s"
              % (what, e.errnum, e, [errno.errorcode.get(x, x) for x in errnos]))
        return e
    raise AssertionError("%s: succeeded, want an error" % what)


def case_block_status(uri, uri2):
    h = connect(uri, meta=True)
    check(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation not negotiated")
    size = h.get_size()
    # A fresh volume is one hole.
    common, _, exts = flags_over(h, 0, size)
    check(common & HOLE and common & ZERO, "fresh volume not reported as a hole: %s" % exts[:8])

    data = os.urandom(MiB)
    h.pwrite(data, 0)
    h.flush()
    _, union, exts = flags_over(h, 0, MiB)
    check(not union & HOLE, "written data reported as a hole: %s" % exts)
    check(not union & ZERO, "random data reported as zero: %s" % exts)
    # The rest is still a hole.
    common, _, exts = flags_over(h, 2 * MiB, size - 2 * MiB)
    check(common & HOLE, "unwritten tail not a hole: %s" % exts[:8])

    h.trim(256 * KiB, 256 * KiB)
    h.flush()
    common, _, exts = flags_over(h, 256 * KiB, 256 * KiB)
    check(common & HOLE, "trimmed range not reported as a hole: %s" % exts)
    check(common & ZERO, "trimmed hole not reported as zero: %s" % exts)
    check(h.pread(256 * KiB, 256 * KiB) == bytes(256 * KiB), "trimmed range does not read as zeros")
    check(h.pread(256 * KiB, 0) == data[:256 * KiB], "data before the trim changed")
    check(h.pread(512 * KiB, 512 * KiB) == data[512 * KiB:], "data after the trim changed")
    _, union, exts = flags_over(h, 512 * KiB, 512 * KiB)
    check(not union & HOLE, "data after the trimmed range reported as a hole: %s" % exts)

    # Extents of an unaligned range, and a query at the very end.
    exts = extents(h, 1000, 3 * MiB)
    check(exts[0][0] == 1000, "first extent starts at %d, want 1000" % exts[0][0])
    exts = extents(h, size - 1, 1)
    check(exts and exts[-1][0] + exts[-1][1] <= size, "extent past the end: %s" % exts)
    h.shutdown()


def case_zero(uri, uri2):
    h = connect(uri, meta=True)
    check(h.can_zero(), "can_zero false")
    check(h.can_fast_zero(), "can_fast_zero false")
    pat = b"\xa5" * (2 * MiB)
    base = 4 * MiB

    # NO_HOLE: zeros, and the range stays allocated.
    h.pwrite(pat, base)
    h.zero(MiB, base + 512 * KiB, nbd.CMD_FLAG_NO_HOLE)
    check(h.pread(MiB, base + 512 * KiB) == bytes(MiB), "NO_HOLE zero does not read as zeros")
    check(h.pread(512 * KiB, base) == pat[:512 * KiB], "NO_HOLE zero changed bytes before")
    check(h.pread(512 * KiB, base + 1536 * KiB) == pat[:512 * KiB], "NO_HOLE zero changed bytes after")
    _, union, exts = flags_over(h, base + 512 * KiB, MiB)
    check(not union & HOLE, "NO_HOLE zero left a hole: %s" % exts)

    # Plain zero (holes allowed), unaligned.
    h.pwrite(pat, base)
    h.zero(100001, base + 12345)
    check(h.pread(100001, base + 12345) == bytes(100001), "zero does not read as zeros")
    check(h.pread(12345, base) == pat[:12345], "zero changed bytes before")
    check(h.pread(10000, base + 12345 + 100001) == pat[:10000], "zero changed bytes after")

    # FAST_ZERO: robib advertises it, so it must work (punching a hole).
    h.pwrite(pat, base)
    h.zero(MiB, base, nbd.CMD_FLAG_FAST_ZERO)
    check(h.pread(MiB, base) == bytes(MiB), "FAST_ZERO zero does not read as zeros")
    check(h.pread(MiB, base + MiB) == pat[:MiB], "FAST_ZERO changed bytes after")

    # FAST_ZERO | NO_HOLE: may be refused with ENOTSUP, but then must not
    # have changed anything.
    h.pwrite(pat, base)
    try:
        h.zero(MiB, base, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
        check(h.pread(MiB, base) == bytes(MiB), "FAST_ZERO|NO_HOLE does not read as zeros")
    except nbd.Error as e:
        check(e.errnum == errno.ENOTSUP, "FAST_ZERO|NO_HOLE failed with %s, want success or ENOTSUP" % e)
        check(h.pread(MiB, base) == pat[:MiB], "failed FAST_ZERO|NO_HOLE changed data")

    # Zero with FUA, and zeroing a hole.
    h.pwrite(pat, base)
    h.zero(2 * MiB, base, nbd.CMD_FLAG_FUA)
    check(h.pread(2 * MiB, base) == bytes(2 * MiB), "FUA zero does not read as zeros")
    h.zero(MiB, 10 * MiB)
    check(h.pread(MiB, 10 * MiB) == bytes(MiB), "zeroing a hole")
    h.shutdown()


def case_fua(uri, uri2):
    h = connect(uri)
    check(h.can_fua(), "can_fua false")
    check(h.can_flush(), "can_flush false")
    data = os.urandom(192 * KiB)
    h.pwrite(data, 3 * MiB + 512, nbd.CMD_FLAG_FUA)
    # Visible on another connection without any flush.
    h2 = connect(uri)
    check(h2.pread(len(data), 3 * MiB + 512) == data, "FUA write not visible on a second connection")
    h.trim(64 * KiB, 3 * MiB + 512, nbd.CMD_FLAG_FUA)
    h.flush()
    h2.shutdown()
    h.shutdown()


def case_multi_conn(uri, uri2):
    hs = [connect(uri) for _ in range(4)]
    for h in hs:
        check(h.can_multi_conn(), "can_multi_conn false")
    blobs = []
    for i, h in enumerate(hs):
        d = os.urandom(64 * KiB + i)
        h.pwrite(d, i * MiB + 7)
        blobs.append(d)
    hs[0].flush()
    for i, h in enumerate(hs):
        for j, d in enumerate(blobs):
            check(h.pread(len(d), j * MiB + 7) == d,
                  "connection %d does not see connection %d's write after a flush" % (i, j))
    # Writes on different exports do not mix.
    g = connect(uri2)
    check(g.get_size() != hs[0].get_size(), "test wants exports of different sizes")
    check(g.pread(64 * KiB, 7) == bytes(64 * KiB), "second export shows data of the first")
    g.pwrite(b"\x01" * 4096, 0)
    g.flush()
    check(hs[1].pread(len(blobs[0]), 7) == blobs[0], "write to export 2 changed export 1")
    g.shutdown()
    for h in hs:
        h.shutdown()


def case_aio(uri, uri2):
    """Many requests in flight on one connection, replies in any order."""
    h = connect(uri)
    size = h.get_size()
    n = 64
    bufs = [os.urandom(4 * KiB * (1 + i % 8)) for i in range(n)]
    offs = [i * 128 * KiB for i in range(n)]  # disjoint ranges
    check(offs[-1] + 64 * KiB <= size, "export too small for the aio case")
    cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b)), o) for b, o in zip(bufs, offs)]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        check(h.aio_command_completed(c), "write %d not completed" % c)
    fc = h.aio_flush()
    while not h.aio_command_completed(fc):
        h.poll(-1)
    rbufs = [nbd.Buffer(len(b)) for b in bufs]
    cookies = [h.aio_pread(rb, o) for rb, o in zip(rbufs, offs)]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        check(h.aio_command_completed(c), "read %d not completed" % c)
    for i, (rb, b) in enumerate(zip(rbufs, bufs)):
        check(rb.to_bytearray() == b, "aio read %d differs from what was written" % i)
    h.shutdown()


def case_out_of_range(uri, uri2):
    h = connect(uri, strict=False)
    size = h.get_size()
    bad = (errno.EINVAL, errno.ENOSPC, errno.EOVERFLOW)
    h.pwrite(b"\x5a" * 4096, 0)

    def usable(step):
        check(h.pread(4096, 0) == b"\x5a" * 4096, "connection unusable after %s" % step)

    cases = [
        ("pread past end", lambda: h.pread(4096, size - 1024)),
        ("pread at end", lambda: h.pread(1, size)),
        ("pread far away", lambda: h.pread(4096, 1 << 62)),
        ("pread wrapping offset", lambda: h.pread(8192, (1 << 64) - 4096)),
        ("pwrite past end", lambda: h.pwrite(b"x" * 4096, size - 1)),
        ("pwrite wrapping offset", lambda: h.pwrite(b"x" * 8192, (1 << 64) - 4096)),
        ("trim past end", lambda: h.trim(8192, size - 4096)),
        ("zero past end", lambda: h.zero(8192, size - 4096)),
        ("zero wrapping offset", lambda: h.zero(8192, (1 << 64) - 4096)),
        ("trim wrapping offset", lambda: h.trim(8192, (1 << 64) - 4096)),
    ]
    for what, fn in cases:
        expect_error(what, fn, bad)
        usable(what)
    # The failed writes did not touch the last bytes.
    check(h.pread(4096, size - 4096) == bytes(4096), "a refused request changed the end of the export")
    # Nothing at or after the end moved the size.
    check(h.get_size() == size, "size changed")
    h.shutdown()
    # A new connection agrees.
    h2 = connect(uri)
    check(h2.pread(4096, size - 4096) == bytes(4096), "a refused request changed the end of the export (new connection)")
    h2.shutdown()


def case_model(uri, uri2):
    """Random unaligned writes, trims and zeroes checked against a model:
    bytes written or zeroed read back exactly; trimmed bytes may read as
    anything; every extent block status calls a hole or zero reads as
    zeros. Checked from a second connection after each flush."""
    import random
    rnd = random.Random(20261124)
    h = connect(uri, meta=True)
    r = connect(uri, meta=True)
    span = 4 * MiB
    model = bytearray(span)          # expected content
    known = bytearray(b"\x01" * span)  # 0 where content is undefined (trimmed)
    ops = []
    for step in range(300):
        off = rnd.randrange(0, span - 1)
        n = rnd.randrange(1, min(span - off, 300 * KiB) + 1)
        if rnd.random() < 0.3:
            n = max(4096, n - n % 4096)
            off = min(off - off % 4096, span - n)
        kind = rnd.choice(("write", "write", "write", "zero", "zero_nohole", "trim"))
        if kind == "write":
            d = rnd.randbytes(n)
            h.pwrite(d, off)
            model[off:off + n] = d
            known[off:off + n] = b"\x01" * n
        elif kind == "zero":
            h.zero(n, off)
            model[off:off + n] = bytes(n)
            known[off:off + n] = b"\x01" * n
        elif kind == "zero_nohole":
            h.zero(n, off, nbd.CMD_FLAG_NO_HOLE)
            model[off:off + n] = bytes(n)
            known[off:off + n] = b"\x01" * n
        else:
            h.trim(n, off)
            known[off:off + n] = bytes(n)
        ops.append((kind, off, n))
        if step % 25 == 24 or step == 299:
            h.flush()
            got = r.pread(span, 0)
            for i in range(0, span, 4096):
                g, m, k = got[i:i + 4096], model[i:i + 4096], known[i:i + 4096]
                if g != m:
                    for j in range(len(g)):
                        if k[j] and g[j] != m[j]:
                            raise AssertionError(
                                "step %d: byte %d reads %#x, model says %#x; last ops: %s"
                                % (step, i + j, g[j], m[j], ops[-6:]))
            for eo, el, ef in extents(r, 0, span):
                if ef & (HOLE | ZERO):
                    seg = got[eo:min(eo + el, span)]
                    check(seg == bytes(len(seg)),
                          "step %d: extent [%d,+%d) flags %d claims zero/hole but holds data; last ops: %s"
                          % (step, eo, el, ef, ops[-6:]))
    h.shutdown()
    r.shutdown()


def case_reconnect(uri, uri2):
    """Writes completed on a connection are seen by a connection opened
    right after it closed, without a flush (what qemu, nbdcopy and fio's
    verify-after-write from a new process rely on)."""
    data = [os.urandom(MiB) for _ in range(16)]
    for rnd in range(3):
        h = connect(uri)
        for i, d in enumerate(data):
            h.pwrite(d, i * MiB)
        h.shutdown()
        del h
        h = connect(uri)
        stale = [i for i, d in enumerate(data) if h.pread(MiB, i * MiB) != d]
        check(not stale, "round %d: a new connection reads stale data in MiB %s of 16 written (no flush) "
              "by the connection closed just before" % (rnd, stale))
        h.shutdown()
        data = data[1:] + data[:1]


def main():
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    case, uri = sys.argv[1], sys.argv[2]
    uri2 = sys.argv[3] if len(sys.argv) > 3 else None
    fn = globals().get("case_" + case)
    if fn is None:
        print("unknown case %s" % case, file=sys.stderr)
        sys.exit(2)
    fn(uri, uri2)
    print("PASS " + case)


if __name__ == "__main__":
    main()
