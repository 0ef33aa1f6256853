package netx

import (
	"bytes"
	"crypto/tls"
	"io"
	"net"
	"sync"
	"testing"
)

// countWrites counts the writes reaching a connection.
type countWrites struct {
	net.Conn
	mu sync.Mutex
	n  int
}

func (c *countWrites) Write(p []byte) (int, error) {
	c.mu.Lock()
	c.n++
	c.mu.Unlock()
	return c.Conn.Write(p)
}

// TestCorkedTLSOneWritePerWrite: a 200 KiB Write on a corked TLS
// connection (13 records) reaches the connection underneath as one write,
// and the peer reads the same bytes.
func TestCorkedTLSOneWritePerWrite(t *testing.T) {
	w := newTLSWorld(t)
	a, b := net.Pipe()
	counted := &countWrites{Conn: a}
	raw := &corkConn{Conn: counted}
	cfg := w.s2.SiteClient("s1")
	cfg.ServerName = "127.0.0.1"
	cli := tls.Client(raw, cfg)
	srv := tls.Server(b, w.s1.SiteServer())
	go func() { _ = srv.Handshake() }()
	if err := cli.Handshake(); err != nil {
		t.Fatal(err)
	}
	c := &corkedTLS{Conn: cli, raw: raw}
	msg := bytes.Repeat([]byte("robib-"), 200<<10/6)
	got := make(chan []byte)
	go func() {
		buf := make([]byte, len(msg))
		_, _ = io.ReadFull(srv, buf)
		got <- buf
	}()
	counted.mu.Lock()
	before := counted.n
	counted.mu.Unlock()
	if n, err := c.Write(msg); err != nil || n != len(msg) {
		t.Fatalf("write: %d %v", n, err)
	}
	if !bytes.Equal(<-got, msg) {
		t.Fatal("the peer read other bytes")
	}
	counted.mu.Lock()
	defer counted.mu.Unlock()
	if w := counted.n - before; w != 1 {
		t.Fatalf("%d writes underneath for one Write of %d bytes", w, len(msg))
	}
}
