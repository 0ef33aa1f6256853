package nbdfront

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

func TestReadWrite(t *testing.T) {
	for _, structured := range []bool{false, true} {
		t.Run(fmt.Sprintf("structured=%v", structured), func(t *testing.T) {
			e := newEnv(t, nil)
			c, _ := e.open("disk", structured, false)
			want := pattern(100000, 9)
			c.mustOK(0, cmdWrite, 12345, uint32(len(want)), want)
			mustEqual(t, "device", e.disk.bytes(12345, int64(len(want))), want)

			res := c.mustOK(0, cmdRead, 12345, uint32(len(want)), nil)
			mustEqual(t, "read", res.data, want)
			if structured {
				if len(res.chunks) != 1 || res.chunks[0].typ != replyTypeOffsetData || res.chunks[0].flags != replyFlagDone {
					t.Fatalf("read chunks %+v", res.chunks)
				}
				if off := binary.BigEndian.Uint64(res.chunks[0].payload); off != 12345 {
					t.Fatalf("chunk offset %d", off)
				}
				// DF is accepted and still one chunk.
				res = c.mustOK(cmdFlagDF, cmdRead, 0, 65536, nil)
				if len(res.chunks) != 1 {
					t.Fatalf("DF read: %d chunks", len(res.chunks))
				}
			}
			// Last byte of the export, and a hole reads as zeros.
			c.mustOK(0, cmdWrite, testSize-1, 1, []byte{0xee})
			res = c.mustOK(0, cmdRead, testSize-2, 2, nil)
			mustEqual(t, "tail", res.data, []byte{0, 0xee})
			// FUA is accepted on reads (and ignored).
			c.mustOK(cmdFlagFUA, cmdRead, 0, 1, nil)
			c.disc()
			c.expectClosed()
		})
	}
}

func TestFlushAndFUA(t *testing.T) {
	e := newEnv(t, nil)
	c, _ := e.open("disk", false, false)
	c.mustOK(0, cmdFlush, 0, 0, nil)
	if n := e.disk.flushes.Load(); n != 1 {
		t.Fatalf("flushes %d", n)
	}
	c.mustOK(cmdFlagFUA, cmdFlush, 0, 0, nil)

	before := len(e.disk.ops())
	c.mustOK(cmdFlagFUA, cmdWrite, 0, 4, []byte("fua!"))
	c.mustOK(cmdFlagFUA, cmdTrim, 4096, 4096, nil)
	c.mustOK(cmdFlagFUA, cmdWriteZeroes, 8192, 4096, nil)
	ops := e.disk.ops()[before:]
	if got := strings.Join(ops, ","); got != "write,flush,trim,flush,zero,flush" {
		t.Fatalf("device ops %s", got)
	}
	// Without FUA no flush.
	before = len(e.disk.ops())
	c.mustOK(0, cmdWrite, 0, 4, []byte("nofu"))
	if got := strings.Join(e.disk.ops()[before:], ","); got != "write" {
		t.Fatalf("device ops %s", got)
	}
	c.expectErrno(0, cmdFlush, 1, 0, nil, EINVAL)
	c.expectErrno(0, cmdFlush, 0, 1, nil, EINVAL)
}

func TestFlushWaitsForDevice(t *testing.T) {
	// A flush reply must not overtake the device flush.
	e := newEnv(t, nil)
	release := make(chan struct{})
	var flushing atomic.Bool
	e.disk.setHook(func(op string, off, length int64) error {
		if op == "flush" {
			flushing.Store(true)
			<-release
		}
		return nil
	})
	c, _ := e.open("disk", false, false)
	if err := c.send(0, cmdFlush, 77, 0, 0, nil); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "flush started", flushing.Load)
	got := make(chan msg, 1)
	go func() {
		m, _ := c.readMsg()
		got <- m
	}()
	select {
	case m := <-got:
		t.Fatalf("flush replied before the device flushed: %+v", m)
	case <-time.After(50 * time.Millisecond):
	}
	close(release)
	if m := <-got; m.cookie != 77 || m.errno != 0 {
		t.Fatalf("flush reply %+v", m)
	}
}

func TestTrimAndWriteZeroes(t *testing.T) {
	e := newEnv(t, nil)
	c, _ := e.open("disk", true, true)
	c.mustOK(0, cmdWrite, 0, 4*memBlock, pattern(4*memBlock, 1))
	c.mustOK(0, cmdTrim, memBlock, memBlock, nil)
	if e.disk.allocated(1) || !e.disk.allocated(0) || !e.disk.allocated(2) {
		t.Fatalf("trim did not deallocate exactly block 1")
	}
	mustEqual(t, "trimmed", c.mustOK(0, cmdRead, memBlock, memBlock, nil).data, make([]byte, memBlock))

	c.mustOK(cmdFlagNoHole, cmdWriteZeroes, 2*memBlock, memBlock, nil)
	if !e.disk.allocated(2) {
		t.Fatalf("NO_HOLE zeroing deallocated")
	}
	c.mustOK(0, cmdWriteZeroes, 3*memBlock, memBlock, nil)
	if e.disk.allocated(3) {
		t.Fatalf("zeroing without NO_HOLE kept the block")
	}
	c.mustOK(cmdFlagFastZero|cmdFlagNoHole, cmdWriteZeroes, 0, 10, nil)
	mustEqual(t, "zeroed", c.mustOK(0, cmdRead, 0, 4*memBlock, nil).data,
		append(append(make([]byte, 10), pattern(4*memBlock, 1)[10:memBlock]...), make([]byte, 3*memBlock)...))
}

func TestFastZeroNotAdvertised(t *testing.T) {
	e := newEnv(t, nil)
	e.be.add(ExportInfo{Name: "slowzero", Size: testSize, CanZero: true})
	c, flags := e.open("slowzero", false, false)
	if flags&tFlagSendWriteZeroes == 0 || flags&tFlagSendFastZero != 0 {
		t.Fatalf("flags %#x", flags)
	}
	before := len(e.be.exports["slowzero"].dev.ops())
	c.expectErrno(cmdFlagFastZero, cmdWriteZeroes, 0, 4096, nil, EINVAL)
	if len(e.be.exports["slowzero"].dev.ops()) != before {
		t.Fatalf("refused fast zero touched the device")
	}
	c.mustOK(0, cmdWriteZeroes, 0, 4096, nil)
	c.expectErrno(0, cmdTrim, 0, 4096, nil, EINVAL) // CanTrim false
}

func TestCache(t *testing.T) {
	e := newEnv(t, nil)
	c, _ := e.open("disk", false, false)
	c.mustOK(0, cmdCache, 0, 65536, nil)
	c.mustOK(cmdFlagFUA, cmdCache, 0, testSize, nil)
	c.expectErrno(0, cmdCache, testSize, 1, nil, EINVAL)
	c.expectErrno(cmdFlagNoHole, cmdCache, 0, 1, nil, EINVAL)
}

func TestBlockStatus(t *testing.T) {
	e := newEnv(t, nil)
	c, _ := e.open("disk", true, true)
	// Layout: blocks 0-1 data, 2-4 hole, 5 data, rest hole.
	c.mustOK(0, cmdWrite, 0, 2*memBlock, pattern(2*memBlock, 5))
	c.mustOK(0, cmdWrite, 5*memBlock, memBlock, pattern(memBlock, 6))

	res := c.mustOK(0, cmdBlockStatus, 100, 6*memBlock, nil)
	if len(res.chunks) != 1 || res.chunks[0].flags != replyFlagDone {
		t.Fatalf("chunks %+v", res.chunks)
	}
	const hz = stateHole | stateZero
	want := []uint32{metaIDAllocation,
		2*memBlock - 100, 0,
		3 * memBlock, hz,
		memBlock, 0,
		100, hz, // clipped to the request
	}
	if fmt.Sprint(res.status) != fmt.Sprint(want) {
		t.Fatalf("status %v, want %v", res.status, want)
	}

	res = c.mustOK(cmdFlagReqOne, cmdBlockStatus, 100, 6*memBlock, nil)
	if fmt.Sprint(res.status) != fmt.Sprint([]uint32{metaIDAllocation, 2*memBlock - 100, 0}) {
		t.Fatalf("REQ_ONE status %v", res.status)
	}
	res = c.mustOK(cmdFlagReqOne, cmdBlockStatus, 2*memBlock, 10, nil)
	if fmt.Sprint(res.status) != fmt.Sprint([]uint32{metaIDAllocation, 10, hz}) {
		t.Fatalf("REQ_ONE short status %v", res.status)
	}
	// Whole export.
	res = c.mustOK(0, cmdBlockStatus, 0, testSize, nil)
	var total uint32
	for i := 1; i < len(res.status); i += 2 {
		total += res.status[i]
	}
	if total != testSize {
		t.Fatalf("extents cover %d bytes", total)
	}
	c.expectErrno(0, cmdBlockStatus, testSize-10, 11, nil, EINVAL)
	c.expectErrno(cmdFlagDF, cmdBlockStatus, 0, 10, nil, EINVAL)
}

func TestBlockStatusNotNegotiated(t *testing.T) {
	e := newEnv(t, nil)
	c, _ := e.open("disk", true, false)
	c.expectErrno(0, cmdBlockStatus, 0, 4096, nil, EINVAL)
	c2, _ := e.open("disk", false, false)
	c2.expectErrno(0, cmdBlockStatus, 0, 4096, nil, EINVAL)
}

func TestBlockStatusBadDevice(t *testing.T) {
	e := newEnv(t, nil)
	e.disk.setHook(func(op string, off, length int64) error {
		if op == "status" {
			return ErrShutdown
		}
		return nil
	})
	c, _ := e.open("disk", true, true)
	c.expectErrno(0, cmdBlockStatus, 0, 4096, nil, ESHUTDOWN)
}

func TestEncodeExtents(t *testing.T) {
	dst := make([]byte, 8*3)
	n, err := encodeExtents(dst, []Extent{{Length: 10}, {Length: 5}, {Length: 7, Zero: true},
		{Length: 1, Hole: true}, {Length: 100}}, 1000, 20)
	if err != nil {
		t.Fatal(err)
	}
	var got []uint32
	for i := 0; i < n; i += 4 {
		got = append(got, binary.BigEndian.Uint32(dst[i:]))
	}
	// 10+5 merged, then 5 of the zero extent (clipped to the request).
	if fmt.Sprint(got) != "[15 0 5 2]" {
		t.Fatalf("encoded %v", got)
	}
	// Capacity bound.
	n, _ = encodeExtents(dst[:8], []Extent{{Length: 1}, {Length: 1, Hole: true}}, 0, 2)
	if n != 8 {
		t.Fatalf("n %d", n)
	}
	if _, err := encodeExtents(dst, nil, 0, 1); err == nil {
		t.Fatal("no extents accepted")
	}
	if _, err := encodeExtents(dst, []Extent{{Length: 0}}, 0, 1); err == nil {
		t.Fatal("zero extent accepted")
	}
}

func TestRequestErrors(t *testing.T) {
	for _, structured := range []bool{false, true} {
		t.Run(fmt.Sprintf("structured=%v", structured), func(t *testing.T) {
			e := newEnv(t, nil)
			c, _ := e.open("disk", structured, structured)
			ro, _ := e.open("ro", structured, false)
			maxU64 := uint64(math.MaxUint64)
			overRead := EINVAL
			if structured {
				overRead = EOVERFLOW
			}
			cases := []struct {
				c           *testClient
				flags, typ  uint16
				off         uint64
				length      uint32
				data        []byte
				want        uint32
				description string
			}{
				{c, 0, cmdRead, testSize - 1, 2, nil, EINVAL, "read past end"},
				{c, 0, cmdRead, maxU64, 2, nil, EINVAL, "read offset overflow"},
				{c, 0, cmdRead, 0, 0, nil, EINVAL, "zero-length read"},
				{c, 0, cmdRead, 0, 256<<10 + 1, nil, overRead, "read over max payload"},
				{c, 0, cmdWrite, testSize - 1, 2, []byte{1, 2}, ENOSPC, "write past end"},
				{c, 0, cmdWrite, maxU64 - 1, 4, []byte{1, 2, 3, 4}, ENOSPC, "write offset overflow"},
				{c, 0, cmdWrite, 0, 0, nil, EINVAL, "zero-length write"},
				{c, 0, cmdWriteZeroes, testSize, 1, nil, ENOSPC, "zero past end"},
				{c, 0, cmdTrim, testSize - 1, 2, nil, EINVAL, "trim past end"},
				{c, 0, cmdTrim, 0, 0, nil, EINVAL, "zero-length trim"},
				{c, 0, 8, 0, 0, nil, EINVAL, "unknown command 8"},
				{c, 0, 0xffff, 0, 0, nil, EINVAL, "unknown command 0xffff"},
				{c, 1 << 5, cmdRead, 0, 1, nil, EINVAL, "unknown flag"},
				{c, cmdFlagNoHole, cmdWrite, 0, 1, []byte{1}, EINVAL, "NO_HOLE on write"},
				{c, cmdFlagReqOne, cmdRead, 0, 1, nil, EINVAL, "REQ_ONE on read"},
				{c, cmdFlagFastZero, cmdTrim, 0, 1, nil, EINVAL, "FAST_ZERO on trim"},
				{ro, 0, cmdWrite, 0, 3, []byte{1, 2, 3}, EPERM, "write on read-only"},
				{ro, 0, cmdTrim, 0, 3, nil, EPERM, "trim on read-only"},
				{ro, 0, cmdWriteZeroes, 0, 3, nil, EPERM, "zero on read-only"},
			}
			if !structured {
				cases = append(cases, struct {
					c           *testClient
					flags, typ  uint16
					off         uint64
					length      uint32
					data        []byte
					want        uint32
					description string
				}{c, cmdFlagDF, cmdRead, 0, 1, nil, EINVAL, "DF without structured replies"})
			}
			for _, tc := range cases {
				r := tc.c.expectErrno(tc.flags, tc.typ, tc.off, tc.length, tc.data, tc.want)
				if structured && r.errMsg == "" {
					t.Errorf("%s: no error message", tc.description)
				}
			}
			// Streams are still in sync and the device untouched.
			mustEqual(t, "device", e.disk.bytes(testSize-2, 2), []byte{0, 0})
			c.mustOK(0, cmdWrite, 0, 2, []byte{7, 8})
			mustEqual(t, "read", c.mustOK(0, cmdRead, 0, 2, nil).data, []byte{7, 8})
			mustEqual(t, "read-only", ro.mustOK(0, cmdRead, 0, 2, nil).data, []byte{0, 0})
		})
	}
}

func TestOversizedWrite(t *testing.T) {
	e := newEnv(t, nil)
	c, _ := e.open("disk", true, false)
	// Above MaxPayload but within the 32 MiB skip limit: refused, payload
	// skipped, stream in sync.
	big := pattern(256<<10+1, 1)
	c.expectErrno(0, cmdWrite, 0, uint32(len(big)), big, EINVAL)
	c.mustOK(0, cmdWrite, 0, 3, []byte("ok!"))
	mustEqual(t, "device", e.disk.bytes(0, 4), []byte("ok!\x00"))

	// Beyond 32 MiB the server replies and hangs up without reading.
	if err := c.send(0, cmdWrite, 99, 0, 1<<25+1, nil); err != nil {
		t.Fatal(err)
	}
	m, err := c.readMsg()
	if err != nil || m.cookie != 99 || m.typ != replyTypeError {
		t.Fatalf("reply %+v, %v", m, err)
	}
	c.expectClosed()
}

func TestMinBlockAlignment(t *testing.T) {
	e := newEnv(t, nil)
	e.be.add(ExportInfo{Name: "aligned", Size: 10*512 + 100, MinBlock: 512, CanTrim: true})
	c := e.dialGreet(clientFlagFixedNewstyle)
	rs := c.option(optGo, goData("aligned", infoBlockSize))
	bs := infoReplies(t, rs)[infoBlockSize]
	if binary.BigEndian.Uint32(bs) != 512 {
		t.Fatalf("min block %d", binary.BigEndian.Uint32(bs))
	}
	c.expectErrno(0, cmdRead, 1, 512, nil, EINVAL)
	c.expectErrno(0, cmdRead, 0, 511, nil, EINVAL)
	c.expectErrno(0, cmdTrim, 512, 100, nil, EINVAL)
	c.mustOK(0, cmdRead, 512, 1024, nil)
	c.mustOK(0, cmdRead, 10*512, 100, nil) // unaligned tail of the export
}

func TestDeviceErrors(t *testing.T) {
	for _, structured := range []bool{false, true} {
		t.Run(fmt.Sprintf("structured=%v", structured), func(t *testing.T) {
			e := newEnv(t, nil)
			var failing atomic.Pointer[any] // error, or string to panic with
			setFail := func(v any) { failing.Store(&v) }
			setFail("")
			e.disk.setHook(func(op string, off, length int64) error {
				switch v := (*failing.Load()).(type) {
				case error:
					return v
				case string:
					if v != "" {
						panic(v)
					}
				}
				return nil
			})
			c, _ := e.open("disk", structured, structured)
			for _, tc := range []struct {
				fail any
				typ  uint16
				want uint32
			}{
				{ErrNoSpace, cmdWrite, ENOSPC},
				{fmt.Errorf("disk: %w", syscall.EROFS), cmdWrite, EPERM},
				{syscall.EDQUOT, cmdWriteZeroes, ENOSPC},
				{errors.New("raft timeout"), cmdRead, EIO},
				{ErrUnsupported, cmdTrim, EINVAL}, // ENOTSUP only for fast zero
				{ErrUnsupported, cmdWriteZeroes, EINVAL},
				{ErrShutdown, cmdFlush, ESHUTDOWN},
				{"boom", cmdRead, EIO},
				{"boom", cmdWrite, EIO},
				{"boom", cmdBlockStatus, EIO},
			} {
				setFail(tc.fail)
				var off uint64
				var length uint32 = 512
				var data []byte
				switch tc.typ {
				case cmdWrite:
					data = make([]byte, 512)
				case cmdFlush:
					length = 0
				}
				if tc.typ == cmdBlockStatus && !structured {
					continue
				}
				r := c.expectErrno(0, tc.typ, off, length, data, tc.want)
				if structured && r.errMsg == "" {
					t.Errorf("%v: empty error message", tc.fail)
				}
				if s, ok := tc.fail.(error); ok && structured && !strings.Contains(r.errMsg, s.Error()) {
					t.Errorf("message %q does not carry %q", r.errMsg, s)
				}
			}
			setFail(ErrUnsupported)
			c.expectErrno(cmdFlagFastZero, cmdWriteZeroes, 0, 512, nil, ENOTSUP)
			// FUA flush failure fails the write.
			e.disk.setHook(func(op string, off, length int64) error {
				if op == "flush" {
					return syscall.EIO
				}
				return nil
			})
			c.expectErrno(cmdFlagFUA, cmdWrite, 0, 1, []byte{1}, EIO)
			c.mustOK(0, cmdWrite, 0, 1, []byte{1})
		})
	}
}

func TestCustomErrorCode(t *testing.T) {
	e := newEnv(t, func(c *Config) {
		c.ErrorCode = func(err error) uint32 {
			if strings.Contains(err.Error(), "zero-me") {
				return 0 // must become EIO
			}
			return ENOMEM
		}
	})
	var msg atomic.Value
	msg.Store("x")
	e.disk.setHook(func(string, int64, int64) error { return errors.New(msg.Load().(string)) })
	c, _ := e.open("disk", false, false)
	c.expectErrno(0, cmdRead, 0, 1, nil, ENOMEM)
	msg.Store("zero-me")
	c.expectErrno(0, cmdRead, 0, 1, nil, EIO)
}

type shortDevice struct{ *memExport }

func (d shortDevice) ReadAt(p []byte, off int64) (int, error) {
	n, _ := d.memExport.ReadAt(p[:len(p)/2], off)
	return n, nil
}
func (d shortDevice) WriteAt(p []byte, off int64) (int, error) { return len(p) / 2, nil }

type shortBackend struct{ *memBackend }

func (b shortBackend) Open(name string) (Export, error) {
	e, err := b.memBackend.Open(name)
	if err != nil {
		return nil, err
	}
	return shortDevice{e.(*memExport)}, nil
}

func TestShortDeviceIO(t *testing.T) {
	e := newEnv(t, nil)
	srv, err := NewServer(Config{Backend: shortBackend{e.be}, Logger: quietLogger()})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	c := pipeClient(t, srv)
	c.greet(clientFlagFixedNewstyle)
	c.goExport("disk")
	c.expectErrno(0, cmdRead, 0, 10, nil, EIO)
	c.expectErrno(0, cmdWrite, 0, 10, make([]byte, 10), EIO)
	c.disc()
	c.expectClosed()
}

func TestBadRequestMagicAndTruncation(t *testing.T) {
	e := newEnv(t, nil)
	other, _ := e.open("disk", false, false)

	c, _ := e.open("disk", false, false)
	b := make([]byte, requestHeaderLen)
	binary.BigEndian.PutUint32(b, magicRequest+1)
	c.write(b)
	c.expectClosed()

	for _, tail := range [][]byte{
		binary.BigEndian.AppendUint32(nil, magicRequest), // short header
		func() []byte { // write with short payload
			h := binary.BigEndian.AppendUint32(nil, magicRequest)
			h = binary.BigEndian.AppendUint16(h, 0)
			h = binary.BigEndian.AppendUint16(h, cmdWrite)
			h = binary.BigEndian.AppendUint64(h, 1)
			h = binary.BigEndian.AppendUint64(h, 0)
			h = binary.BigEndian.AppendUint32(h, 1000)
			return append(h, 1, 2, 3)
		}(),
	} {
		c, _ := e.open("disk", false, false)
		c.write(tail)
		c.conn.(interface{ CloseWrite() error }).CloseWrite()
		c.expectClosed()
	}
	// Other connections are unaffected.
	other.mustOK(0, cmdWrite, 0, 1, []byte{42})
	mustEqual(t, "other", other.mustOK(0, cmdRead, 0, 1, nil).data, []byte{42})
}

func TestDiscFinishesInFlight(t *testing.T) {
	e := newEnv(t, nil)
	release := make(chan struct{})
	var started atomic.Bool
	e.disk.setHook(func(op string, off, length int64) error {
		if op == "write" && off == 4096 {
			started.Store(true)
			<-release
		}
		return nil
	})
	c, _ := e.open("disk", false, false)
	if err := c.send(0, cmdWrite, 5, 4096, 4, []byte("late")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "write started", started.Load)
	c.disc()
	time.Sleep(20 * time.Millisecond)
	if e.be.handle(0).closes.Load() != 0 {
		t.Fatalf("export closed with a request in flight")
	}
	close(release)
	m, err := c.readMsg()
	if err != nil || m.cookie != 5 || m.errno != 0 {
		t.Fatalf("in-flight reply %+v, %v", m, err)
	}
	c.expectClosed()
	mustEqual(t, "device", e.disk.bytes(4096, 4), []byte("late"))
	e.be.waitAllClosed(t)
}

func TestOutOfOrderReplies(t *testing.T) {
	e := newEnv(t, nil)
	release := make(chan struct{})
	e.disk.setHook(func(op string, off, length int64) error {
		if op == "read" && off == 0 {
			<-release
		}
		return nil
	})
	c, _ := e.open("disk", true, false)
	c.send(0, cmdRead, 1, 0, 100, nil) // blocks in the device
	c.send(0, cmdWrite, 2, 512, 3, []byte("abc"))
	c.send(0, cmdRead, 3, 512, 3, nil) // may see the write or not
	seen := map[uint64]bool{}
	for len(seen) < 2 {
		m, err := c.readMsg()
		if err != nil {
			t.Fatal(err)
		}
		if m.cookie == 1 {
			t.Fatalf("blocked read answered first")
		}
		seen[m.cookie] = true
	}
	close(release)
	m, err := c.readMsg()
	if err != nil || m.cookie != 1 || m.typ != replyTypeOffsetData || len(m.payload) != 108 {
		t.Fatalf("late reply %+v, %v", m, err)
	}
}

// TestConcurrentRequests runs many requests in flight on several
// connections, matches replies by cookie and checks every byte.
func TestConcurrentRequests(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.MaxWorkers = 8; c.MaxConnBuffer = 1 << 20 })
	var inflight, peak atomic.Int64
	e.disk.setHook(func(op string, off, length int64) error {
		n := inflight.Add(1)
		for {
			p := peak.Load()
			if n <= p || peak.CompareAndSwap(p, n) {
				break
			}
		}
		time.Sleep(time.Duration(off%7) * 100 * time.Microsecond) // reorder
		inflight.Add(-1)
		return nil
	})
	const conns, perConn, chunk = 4, 60, 4096
	var wg sync.WaitGroup
	errs := make(chan error, conns)
	for ci := 0; ci < conns; ci++ {
		c, _ := e.open("disk", ci%2 == 0, false)
		wg.Add(1)
		go func(ci int, c *testClient) {
			defer wg.Done()
			errs <- runConcurrent(c, ci, perConn, chunk)
		}(ci, c)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if p := peak.Load(); p < 2 || p > conns*8 {
		t.Fatalf("peak device concurrency %d", p)
	}
}

// runConcurrent writes perConn chunks to the connection's own region,
// then reads them all back, with all requests pipelined.
func runConcurrent(c *testClient, ci, n, chunk int) error {
	base := uint64(ci * n * chunk)
	phase := func(typ uint16) error {
		sendErr := make(chan error, 1)
		go func() {
			for i := 0; i < n; i++ {
				var data []byte
				length := uint32(chunk)
				if typ == cmdWrite {
					data = pattern(chunk, byte(ci*31+i))
				}
				if err := c.send(0, typ, uint64(i)<<8|uint64(ci), base+uint64(i*chunk), length, data); err != nil {
					sendErr <- err
					return
				}
			}
			sendErr <- nil
		}()
		seen := make(map[uint64]bool)
		for len(seen) < n {
			m, err := c.readMsg()
			if err != nil {
				return err
			}
			i := int(m.cookie >> 8)
			if m.cookie&0xff != uint64(ci) || i >= n || seen[m.cookie] {
				return fmt.Errorf("conn %d: unexpected cookie %#x", ci, m.cookie)
			}
			seen[m.cookie] = true
			if m.errno != 0 || (!m.simple && m.typ == replyTypeError) {
				return fmt.Errorf("conn %d: request %d failed: %+v", ci, i, m)
			}
			if typ == cmdRead {
				data := m.payload
				if !m.simple {
					if off := binary.BigEndian.Uint64(data); off != base+uint64(i*chunk) {
						return fmt.Errorf("conn %d: chunk offset %d", ci, off)
					}
					data = data[8:]
				}
				if string(data) != string(pattern(chunk, byte(ci*31+i))) {
					return fmt.Errorf("conn %d: read %d returned wrong data", ci, i)
				}
			}
		}
		return <-sendErr
	}
	if err := phase(cmdWrite); err != nil {
		return err
	}
	return phase(cmdRead)
}

// TestConnectionBudget checks MaxWorkers and MaxConnBuffer bound the
// requests handed to the device at once.
func TestConnectionBudget(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.MaxWorkers = 4; c.MaxPayload = 64 << 10; c.MaxConnBuffer = 128 << 10 })
	var inflight, peak atomic.Int64
	release := make(chan struct{})
	e.disk.setHook(func(op string, off, length int64) error {
		n := inflight.Add(1)
		if n > peak.Load() {
			peak.Store(n)
		}
		<-release
		inflight.Add(-1)
		return nil
	})
	c, _ := e.open("disk", false, false)
	go func() {
		for i := 0; i < 10; i++ {
			c.send(0, cmdRead, uint64(i), 0, 64<<10, nil)
		}
	}()
	waitFor(t, "two reads in flight", func() bool { return inflight.Load() == 2 })
	time.Sleep(50 * time.Millisecond)
	if n := inflight.Load(); n != 2 {
		t.Fatalf("%d reads of 64 KiB in flight with a 128 KiB budget", n)
	}
	close(release)
	for i := 0; i < 10; i++ {
		m, err := c.readMsg()
		if err != nil || m.errno != 0 || len(m.payload) != 64<<10 {
			t.Fatalf("reply %d: %v", i, err)
		}
	}
	if peak.Load() != 2 {
		t.Fatalf("peak %d", peak.Load())
	}

	// Small requests are bounded by MaxWorkers.
	inflight.Store(0)
	release2 := make(chan struct{})
	e.disk.setHook(func(op string, off, length int64) error {
		inflight.Add(1)
		<-release2
		return nil
	})
	go func() {
		for i := 0; i < 10; i++ {
			c.send(0, cmdFlush, uint64(i), 0, 0, nil)
		}
	}()
	waitFor(t, "four flushes in flight", func() bool { return inflight.Load() == 4 })
	time.Sleep(50 * time.Millisecond)
	if n := inflight.Load(); n != 4 {
		t.Fatalf("%d flushes in flight with 4 workers", n)
	}
	close(release2)
	for i := 0; i < 10; i++ {
		if _, err := c.readMsg(); err != nil {
			t.Fatal(err)
		}
	}
}

func TestRulesCheck(t *testing.T) {
	r := rules{info: ExportInfo{Size: 1 << 20, MinBlock: 1, PrefBlock: 4096, MaxBlock: 65536, CanZero: true},
		flags: tFlagSendWriteZeroes}
	for _, tc := range []struct {
		req  request
		want uint32
	}{
		{request{Type: cmdRead, Length: 65536}, 0},
		{request{Type: cmdRead, Length: 65537}, EINVAL},
		{request{Type: cmdWriteZeroes, Length: math.MaxUint32, Offset: 0}, ENOSPC},
		{request{Type: cmdWriteZeroes, Length: 1 << 20}, 0}, // beyond MaxBlock is fine without payload
		{request{Type: cmdWriteZeroes, Flags: cmdFlagFastZero, Length: 1}, EINVAL},
		{request{Type: cmdCache, Flags: cmdFlagFUA, Length: 1}, 0},
		{request{Type: cmdBlockStatus, Length: 1}, EINVAL},
		{request{Type: cmdRead, Offset: 1 << 20, Length: 1}, EINVAL},
		{request{Type: cmdWrite, Offset: math.MaxUint64, Length: 1}, ENOSPC},
	} {
		if got, msg := r.check(tc.req); got != tc.want {
			t.Errorf("check(%+v) = %d (%s), want %d", tc.req, got, msg, tc.want)
		}
	}
}

func TestBufferPool(t *testing.T) {
	p := newBufferPool(100 << 10)
	if got := p.sizes[len(p.sizes)-1]; got != 100<<10 {
		t.Fatalf("top class %d", got)
	}
	for _, n := range []int{1, 4096, 4097, 65536, 100 << 10} {
		b := p.get(n)
		if len(*b) != n || cap(*b) != p.classSize(n) || cap(*b) < n {
			t.Fatalf("get(%d): len %d cap %d", n, len(*b), cap(*b))
		}
		p.put(b)
	}
	defer func() {
		if recover() == nil {
			t.Fatal("oversized get did not panic")
		}
	}()
	p.get(100<<10 + 1)
}

func TestDiscardOnEOFDuringSkip(t *testing.T) {
	// A rejected WRITE whose payload never arrives ends the connection.
	e := newEnv(t, nil)
	c, _ := e.open("ro", false, false)
	c.send(0, cmdWrite, 1, 0, 1000, []byte{1, 2, 3})
	c.conn.(interface{ CloseWrite() error }).CloseWrite()
	rest, err := io.ReadAll(c.r)
	if err != nil || len(rest) != 0 {
		t.Fatalf("after truncated rejected write: %d bytes, %v", len(rest), err)
	}
}

func TestReplyWriteFailure(t *testing.T) {
	// The client goes away while a request is in flight: the reply write
	// fails, the connection ends and the export is closed once.
	be := newMemBackend()
	dev := be.add(ExportInfo{Name: "disk", Size: testSize})
	release := make(chan struct{})
	var started atomic.Bool
	dev.setHook(func(op string, off, length int64) error {
		if op == "read" {
			started.Store(true)
			<-release
		}
		return nil
	})
	srv, err := NewServer(Config{Backend: be, Logger: quietLogger()})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	client, server := halfPipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.ServeConn(server)
	}()
	go io.Copy(io.Discard, client.r) // handshake replies
	input := cat(clientFlagsBytes, optBytes(optGo, goData("disk")), reqBytes(0, cmdRead, 1, 0, 4096, nil))
	if _, err := client.Write(input); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "read started", started.Load)
	client.Close()
	close(release)
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("connection handler did not finish")
	}
	be.waitAllClosed(t)
}

// gateConn is a net.Conn whose writes wait for the gate to open and then
// succeed (recording the bytes) or fail with err.
type gateConn struct {
	net.Conn // nil: only Write and Close are used
	gate     chan struct{}
	entered  chan struct{} // closed at the first Write
	once     sync.Once
	err      error
	mu       sync.Mutex
	out      []byte
	closed   atomic.Bool
}

func newGateConn(err error) *gateConn {
	return &gateConn{gate: make(chan struct{}), entered: make(chan struct{}), err: err}
}

func (c *gateConn) Write(p []byte) (int, error) {
	c.once.Do(func() { close(c.entered) })
	<-c.gate
	if c.err != nil {
		return 0, c.err
	}
	c.mu.Lock()
	c.out = append(c.out, p...)
	c.mu.Unlock()
	return len(p), nil
}

func (c *gateConn) Close() error { c.closed.Store(true); return nil }

// sendAll sends one simple reply per cookie 1..n from its own goroutine
// while the first reply's write is held at the gate, then opens it, and
// returns each send's error.
func sendAll(t *testing.T, tr *transmission, c *gateConn, n int) []error {
	t.Helper()
	errs := make([]error, n)
	var wg sync.WaitGroup
	send := func(i int) {
		defer wg.Done()
		j := getJob()
		j.req.Cookie = uint64(i + 1)
		errs[i] = tr.sendOK(j)
	}
	wg.Add(1)
	go send(0)
	<-c.entered
	for i := 1; i < n; i++ {
		wg.Add(1)
		go send(i)
	}
	// Wait until every other reply is queued behind the blocked write.
	waitFor(t, "replies queued", func() bool {
		tr.wmu.Lock()
		defer tr.wmu.Unlock()
		return tr.queued == uint64(n)
	})
	close(c.gate)
	wg.Wait()
	return errs
}

func gateTransmission(c *gateConn) *transmission {
	tr := &transmission{sc: &serverConn{Conn: c}, log: quietLogger()}
	tr.wdone.L = &tr.wmu
	return tr
}

// TestRepliesGroupWritten checks that replies that become ready while a
// reply is being written leave together in the next write, each whole and
// each exactly once, and that every sender returns only after its reply
// is written.
func TestRepliesGroupWritten(t *testing.T) {
	const n = 50
	c := newGateConn(nil)
	tr := gateTransmission(c)
	for i, err := range sendAll(t, tr, c, n) {
		if err != nil {
			t.Fatalf("send %d: %v", i, err)
		}
	}
	if tr.writes != 2 {
		t.Errorf("%d replies took %d writes, want 2 (the first alone, then the %d queued behind it)", n, tr.writes, n-1)
	}
	if len(c.out) != n*simpleReplyLen {
		t.Fatalf("wrote %d bytes, want %d", len(c.out), n*simpleReplyLen)
	}
	seen := make(map[uint64]bool)
	for off := 0; off < len(c.out); off += simpleReplyLen {
		r := c.out[off : off+simpleReplyLen]
		if binary.BigEndian.Uint32(r) != magicSimpleReply || binary.BigEndian.Uint32(r[4:]) != 0 {
			t.Fatalf("reply at %d is not a simple OK reply: %x", off, r)
		}
		cookie := binary.BigEndian.Uint64(r[8:])
		if cookie < 1 || cookie > n || seen[cookie] {
			t.Fatalf("reply at %d: unexpected or repeated cookie %d", off, cookie)
		}
		seen[cookie] = true
	}
	if binary.BigEndian.Uint64(c.out[8:]) != 1 {
		t.Errorf("the first reply written is not the one that was being written first")
	}
	if tr.queue == nil && tr.spare == nil {
		t.Errorf("no reply slice kept for reuse")
	}
	for i, b := range tr.spare[:cap(tr.spare)] {
		if b != nil {
			t.Fatalf("reused reply slice still references buffer %d", i)
		}
	}
}

// TestGroupWriteFailure checks that a failed reply write fails every
// reply queued with it or after it, closes the connection, and leaves no
// sender waiting.
func TestGroupWriteFailure(t *testing.T) {
	const n = 20
	c := newGateConn(errors.New("connection reset by the test"))
	tr := gateTransmission(c)
	for i, err := range sendAll(t, tr, c, n) {
		if err == nil || !strings.Contains(err.Error(), "connection reset by the test") {
			t.Fatalf("send %d: got %v, want the write error", i, err)
		}
	}
	if !c.closed.Load() {
		t.Error("connection not closed after a failed reply write")
	}
	j := getJob()
	if err := tr.sendOK(j); err == nil {
		t.Error("a send after the failure succeeded")
	}
	if !tr.writeFailed() {
		t.Error("writeFailed is false after a failed write")
	}
}

// TestWorkersBoundedAndGone checks that a connection runs at most
// MaxWorkers worker goroutines however many requests it pipelines, that
// every request is served, and that the (reused, idle) workers are gone
// once the connection has ended.
func TestWorkersBoundedAndGone(t *testing.T) {
	const maxWorkers, n, chunk = 4, 200, 4096
	e := newEnv(t, func(c *Config) { c.MaxWorkers = maxWorkers })
	before := runtime.NumGoroutine()
	var peak atomic.Int64
	e.disk.setHook(func(op string, off, length int64) error {
		for g := int64(runtime.NumGoroutine()); ; {
			p := peak.Load()
			if g <= p || peak.CompareAndSwap(p, g) {
				break
			}
		}
		time.Sleep(200 * time.Microsecond)
		return nil
	})
	c, _ := e.open("disk", false, false)
	if err := runConcurrent(c, 0, n, chunk); err != nil {
		t.Fatal(err)
	}
	// The connection adds its handler, the test client's reader and sender,
	// and its workers.
	if extra := peak.Load() - int64(before); extra > maxWorkers+4 {
		t.Errorf("%d goroutines above the baseline while serving, want at most %d workers (+4)", extra, maxWorkers)
	}
	c.disc()
	c.expectClosed()
	e.be.waitAllClosed(t)
	waitFor(t, "workers to exit", func() bool { return runtime.NumGoroutine() <= before })
}
