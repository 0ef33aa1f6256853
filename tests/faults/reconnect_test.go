package faults

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/robib/robib/tests/checker"
	"github.com/robib/robib/tests/harness"
)

// movingAddr is a TCP forwarder standing in for an address that moves
// between sites (a DNS name, a virtual IP, a load balancer): clients
// connect to it, it connects them to the current backend. Moving it closes
// the connections to the old backend, as a moved virtual IP would.
type movingAddr struct {
	ln      net.Listener
	mu      sync.Mutex
	backend string
	conns   map[net.Conn]bool
	bytes   atomic.Int64 // client-to-server bytes forwarded
}

func newMovingAddr(t *testing.T, backend string) *movingAddr {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m := &movingAddr{ln: ln, backend: backend, conns: map[net.Conn]bool{}}
	t.Cleanup(func() {
		ln.Close()
		m.move("")
	})
	go m.serve()
	return m
}

func (m *movingAddr) addr() string { return m.ln.Addr().String() }

func (m *movingAddr) move(backend string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.backend = backend
	for c := range m.conns {
		c.Close()
	}
	clear(m.conns)
}

func (m *movingAddr) serve() {
	for {
		c, err := m.ln.Accept()
		if err != nil {
			return
		}
		go m.forward(c)
	}
}

func (m *movingAddr) forward(c net.Conn) {
	m.mu.Lock()
	backend := m.backend
	m.mu.Unlock()
	s, err := net.DialTimeout("tcp", backend, 2*time.Second)
	if err != nil {
		c.Close()
		return
	}
	m.mu.Lock()
	if m.backend != backend { // moved meanwhile
		m.mu.Unlock()
		c.Close()
		s.Close()
		return
	}
	m.conns[c], m.conns[s] = true, true
	m.mu.Unlock()
	done := make(chan struct{}, 2)
	go func() { io.Copy(s, &countingReader{r: c, n: &m.bytes}); s.Close(); done <- struct{}{} }()
	go func() { io.Copy(c, s); c.Close(); done <- struct{}{} }()
	<-done
	<-done
}

// countingReader counts the bytes read through it.
type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// TestQemuReconnectsToAnotherSite: qemu's NBD client, with reconnect-delay,
// writes and flushes through an address that moves from site A to site B
// when A is killed. qemu reconnects, B takes over A's lease once it
// expired, and qemu's writes complete; every one of them is at every site.
func TestQemuReconnectsToAnotherSite(t *testing.T) {
	qemuIO := harness.RequireTool(t, "qemu-io")
	e := newEnv(t, "64MiB")
	leader := e.c.MustLeader()
	fs := e.others(leader)
	a, b := fs[0], fs[1]
	vip := newMovingAddr(t, e.nbd(a))

	const writes, chunk = 60, 64 << 10
	args := []string{"--image-opts",
		fmt.Sprintf("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=%s,export=%s,reconnect-delay=60",
			vip.addr()[strings.LastIndexByte(vip.addr(), ':')+1:], volName)}
	for i := range writes {
		args = append(args, "-c", fmt.Sprintf("write -P %d %d %d", i+1, i*chunk, chunk), "-c", "flush", "-c", "sleep 150")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, qemuIO, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	// Once a third of the writes went through A, A dies and the address
	// moves to B.
	harness.WaitFor(t, time.Minute, "qemu-io to write through site A", func() (bool, error) {
		select {
		case err := <-exited:
			return false, fmt.Errorf("qemu-io exited early: %v\n%s", err, out.String())
		default:
		}
		return vip.bytes.Load() > writes/3*chunk, nil
	})
	e.c.Kill(a)
	vip.move(e.nbd(b))
	t.Logf("killed %s; the address now leads to %s", a, b)

	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("qemu-io: %v\n%s", err, out.String())
		}
	case <-ctx.Done():
		t.Fatalf("qemu-io did not finish\n%s", out.String())
	}
	for _, bad := range []string{"error", "failed", "Input/output"} {
		if strings.Contains(out.String(), bad) {
			t.Fatalf("qemu-io reported %q:\n%s", bad, out.String())
		}
	}
	if got := strings.Count(out.String(), "wrote "); got != writes {
		t.Fatalf("qemu-io confirmed %d of %d writes:\n%s", got, writes, out.String())
	}

	e.c.Start(a)
	e.c.WaitReady(time.Minute, 3)
	e.c.WaitCaughtUp(time.Minute)
	for _, site := range e.c.Names() {
		cl, err := checker.Dial(ctx, nil, e.nbd(site), volName+"@ro")
		if err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, chunk)
		for i := range writes {
			if err := cl.Read(ctx, uint64(i*chunk), buf); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(buf, bytes.Repeat([]byte{byte(i + 1)}, chunk)) {
				t.Fatalf("at %s, qemu's flushed write %d is missing", site, i)
			}
		}
		cl.Close()
	}
}
