package netx

import (
	"crypto/tls"
	"net"
	"sync"
)

// Go's crypto/tls writes every record (at most 16 KiB of data) with a
// write of its own on the connection underneath, so one large Write on a
// TLS connection costs a system call per record. The Raft link writes
// frames of up to hundreds of KiB; corkedTLS gathers the records of one
// Write and hands them to the kernel in one write.

// corkConn buffers writes while corked. Writes come from the TLS layer
// only, which orders its records under its own lock; mu keeps the buffer
// consistent when the TLS layer writes on its own (an alert, a key
// update) while a corked Write is being flushed.
type corkConn struct {
	net.Conn
	mu     sync.Mutex
	corked bool
	buf    []byte
}

// maxCorkBuffer: a buffer grown beyond this by one large Write is not kept.
const maxCorkBuffer = 1 << 20

func (c *corkConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.corked {
		c.buf = append(c.buf, p...)
		return len(p), nil
	}
	return c.Conn.Write(p)
}

func (c *corkConn) cork() {
	c.mu.Lock()
	c.corked = true
	c.mu.Unlock()
}

// uncork writes what was gathered, in one write.
func (c *corkConn) uncork() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.corked = false
	if len(c.buf) == 0 {
		return nil
	}
	_, err := c.Conn.Write(c.buf)
	if cap(c.buf) > maxCorkBuffer {
		c.buf = nil
	} else {
		c.buf = c.buf[:0]
	}
	return err
}

// corkedTLS is a TLS connection whose every Write reaches the kernel as
// one write, whatever the number of records. It has the *tls.Conn's
// methods (ConnectionState for PeerIdentity, deadlines, Close).
type corkedTLS struct {
	*tls.Conn
	raw *corkConn
	wmu sync.Mutex // one corked Write at a time
}

func (c *corkedTLS) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.raw.cork()
	n, err := c.Conn.Write(p)
	if ferr := c.raw.uncork(); err == nil && ferr != nil {
		err = ferr
		n = 0
	}
	return n, err
}
