package nbdfront

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
)

// tryExport is a memExport with a TryWriter whose answer the test picks per
// call: accept (write now), refuse (done false: the request goes to a
// worker and WriteAt) or fail.
type tryExport struct {
	*memExport
	decide func(off int64) (accept bool, err error)
	tried  atomic.Int64 // TryWriteAt calls
	inline atomic.Int64 // writes it took
}

func (e *tryExport) TryWriteAt(p []byte, off int64) (bool, error) {
	e.tried.Add(1)
	accept, err := e.decide(off)
	if err != nil {
		return true, err
	}
	if !accept {
		return false, nil
	}
	if _, err := e.WriteAt(p, off); err != nil {
		return true, err
	}
	e.inline.Add(1)
	return true, nil
}

// tryBackend opens tryExports over a memBackend.
type tryBackend struct {
	*memBackend
	decide func(off int64) (bool, error)
	mu     sync.Mutex
	opened []*tryExport
}

func (b *tryBackend) Open(name string) (Export, error) {
	e, err := b.memBackend.Open(name)
	if err != nil {
		return nil, err
	}
	te := &tryExport{memExport: e.(*memExport), decide: b.decide}
	b.mu.Lock()
	b.opened = append(b.opened, te)
	b.mu.Unlock()
	return te, nil
}

var errTryFailed = errors.New("try failed")

// TestInlineWrites sends a burst of pipelined writes, some taken inline,
// some refused (served by a worker), some failing, then a FLUSH and a
// DISC in the same burst. Every request gets exactly one reply with the
// right errno, the flush reaches the device after every write, and the
// device holds exactly the bytes of the writes that succeeded.
func TestInlineWrites(t *testing.T) {
	for _, structured := range []bool{false, true} {
		t.Run(map[bool]string{false: "simple", true: "structured"}[structured], func(t *testing.T) {
			const n, size = 200, 4096
			failAt := func(off int64) bool { return off/size%17 == 5 }
			tb := &tryBackend{decide: func(off int64) (bool, error) {
				if failAt(off) {
					return false, errTryFailed
				}
				return off/size%3 != 0, nil // one in three refused
			}}
			e := newEnv(t, func(c *Config) {
				tb.memBackend = c.Backend.(*memBackend)
				c.Backend = tb
			})
			c, _ := e.open("disk", structured, false)
			c.structured = structured

			rng := rand.New(rand.NewPCG(1, 2))
			want := make([]byte, n*size)
			var burst bytes.Buffer
			for i := range n {
				data := make([]byte, size)
				for k := range data {
					data[k] = byte(rng.Uint32())
				}
				if !failAt(int64(i * size)) {
					copy(want[i*size:], data)
				}
				burst.Write(reqBytes(0, cmdWrite, uint64(i+1), uint64(i*size), size, data))
			}
			burst.Write(reqBytes(0, cmdFlush, n+1, 0, 0, nil))
			burst.Write(reqBytes(0, cmdDisc, n+2, 0, 0, nil))
			go c.conn.Write(burst.Bytes()) // the replies are read meanwhile

			seen := map[uint64]bool{}
			for len(seen) < n+1 {
				m, err := c.readMsg()
				if err != nil {
					t.Fatalf("after %d replies: %v", len(seen), err)
				}
				if seen[m.cookie] || m.cookie < 1 || m.cookie > n+1 {
					t.Fatalf("unexpected or repeated reply for cookie %d", m.cookie)
				}
				seen[m.cookie] = true
				errno := m.errno
				if !m.simple {
					errno = 0
					if m.typ == replyTypeError {
						errno = binary.BigEndian.Uint32(m.payload)
					}
				}
				wantErr := m.cookie <= n && failAt(int64(m.cookie-1)*size)
				if (errno != 0) != wantErr {
					t.Fatalf("cookie %d: errno %d, want failure %v", m.cookie, errno, wantErr)
				}
			}
			c.expectClosed()
			got := e.disk.bytes(0, n*size)
			if !bytes.Equal(got, want) {
				t.Fatal("device content differs from the writes that succeeded")
			}
			tb.mu.Lock()
			te := tb.opened[0]
			tb.mu.Unlock()
			// Writes sent before a FLUSH in one burst (no reply awaited)
			// are not covered by it in NBD, and the refused ones run on
			// workers; but an inline write is done before the reader
			// reads the next request, so each precedes the flush.
			ops := e.disk.ops()
			before := 0
			for _, op := range ops {
				if op == "flush" {
					break
				}
				before++
			}
			if int64(before) < te.inline.Load() {
				t.Fatalf("%d writes reached the device before the flush, but %d were taken inline before it was read", before, te.inline.Load())
			}
			if te.tried.Load() != n || te.inline.Load() == 0 || te.inline.Load() == n {
				t.Fatalf("TryWriteAt called %d times for %d writes, %d inline: the test needs both paths", te.tried.Load(), n, te.inline.Load())
			}
		})
	}
}

// TestInlineFUAGoesToAWorker: a write with FUA must be flushed
// before its reply, so it never takes the inline path.
func TestInlineFUAGoesToAWorker(t *testing.T) {
	tb := &tryBackend{decide: func(int64) (bool, error) { return true, nil }}
	e := newEnv(t, func(c *Config) {
		tb.memBackend = c.Backend.(*memBackend)
		c.Backend = tb
	})
	c, _ := e.open("disk", false, false)
	if r := c.do(cmdFlagFUA, cmdWrite, 0, 4096, make([]byte, 4096)); r.errno != 0 {
		t.Fatalf("FUA write: errno %d", r.errno)
	}
	if r := c.do(0, cmdWrite, 4096, 4096, make([]byte, 4096)); r.errno != 0 {
		t.Fatalf("write: errno %d", r.errno)
	}
	tb.mu.Lock()
	te := tb.opened[0]
	tb.mu.Unlock()
	if te.tried.Load() != 1 || e.disk.flushes.Load() != 1 {
		t.Fatalf("TryWriteAt calls %d (want 1: not for FUA), flushes %d (want 1)", te.tried.Load(), e.disk.flushes.Load())
	}
}
