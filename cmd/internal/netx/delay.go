package netx

import (
	"context"
	"io"
	"net"
	"os"
	"sync"
	"time"
)

// MaxLinkDelay bounds Network.LinkDelay (and the --link-delay flag).
const MaxLinkDelay = time.Second

// delayQueueLimit bounds the bytes queued in each direction of a delayed
// connection. A writer that finds its direction full waits (backpressure,
// bounded by its write deadline); the receiving goroutine stops reading the
// socket, so TCP flow control pushes back on the peer.
const delayQueueLimit = 64 << 20

// delayReadSize is the receiving goroutine's read size.
const delayReadSize = 64 << 10

// DelayConn wraps c so that it behaves like a link with a one-way delay of d
// in each direction: bytes written to the returned connection reach the
// peer d after the Write, and bytes the peer sends are delivered to Read d
// after they arrived. A request/response round trip therefore costs 2d more.
// Order and bandwidth are kept: data is stamped when it is written (or
// arrives) and a goroutine per direction releases it when its time has
// come, however much else is queued, so the delay is not serialised.
//
// Deadlines keep their meaning: a read deadline bounds the wait for delayed
// data, a write deadline bounds the wait for room in the bounded send queue.
// Close closes c at once, discards data not yet delivered (as when a cable
// is cut) and unblocks every Read and Write; both goroutines then exit.
//
// It is a testing and benchmark knob (emulating a WAN between sites on one
// machine), not something a production link wants.
func DelayConn(c net.Conn, d time.Duration) net.Conn {
	if d <= 0 {
		return c
	}
	return newDelayConn(c, d, delayQueueLimit)
}

func newDelayConn(c net.Conn, d time.Duration, limit int) *delayConn {
	dc := &delayConn{
		conn:  c,
		delay: d,
		out:   newDelayQueue(limit),
		in:    newDelayQueue(limit),
	}
	go dc.send()
	go dc.receive()
	return dc
}

type delayConn struct {
	conn  net.Conn
	delay time.Duration
	out   *delayQueue // written here, waiting to be sent on conn
	in    *delayQueue // arrived on conn, waiting to be read here

	closeOnce sync.Once
	closeErr  error
}

// Read returns delayed data that is due, waiting for it until the read
// deadline. The peer's EOF (or a read error) is delivered after the data
// that preceded it, with the same delay.
func (c *delayConn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	return c.in.read(p)
}

// Write queues a copy of p for delivery d from now and returns; it waits
// only while the send queue is full.
func (c *delayConn) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if err := c.out.write(p, c.delay, true); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Close closes the underlying connection and wakes everything waiting on
// this one.
func (c *delayConn) Close() error {
	c.closeOnce.Do(func() {
		c.out.close()
		c.in.close()
		c.closeErr = c.conn.Close()
	})
	return c.closeErr
}

func (c *delayConn) LocalAddr() net.Addr  { return c.conn.LocalAddr() }
func (c *delayConn) RemoteAddr() net.Addr { return c.conn.RemoteAddr() }

// SetDeadline sets both deadlines. They apply to this wrapper's waits; the
// underlying connection is read and written by the delay goroutines, which
// stop when the connection is closed.
func (c *delayConn) SetDeadline(t time.Time) error {
	c.in.setDeadline(t)
	c.out.setDeadline(t)
	return nil
}

func (c *delayConn) SetReadDeadline(t time.Time) error  { c.in.setDeadline(t); return nil }
func (c *delayConn) SetWriteDeadline(t time.Time) error { c.out.setDeadline(t); return nil }

// send writes queued data to the underlying connection when it is due. All
// chunks that are due go out in one vectored write.
func (c *delayConn) send() {
	for {
		bufs, ok := c.out.takeDue()
		if !ok {
			return
		}
		if _, err := bufs.WriteTo(c.conn); err != nil {
			// The link is broken: later Writes and Reads fail with err.
			c.out.fail(err)
			c.in.fail(err)
			return
		}
	}
}

// receive reads from the underlying connection and queues what arrives,
// stamped with its delivery time. A read error ends the stream after the
// data before it.
func (c *delayConn) receive() {
	buf := make([]byte, delayReadSize)
	for {
		n, err := c.conn.Read(buf)
		if n > 0 {
			if werr := c.in.write(buf[:n], c.delay, false); werr != nil {
				return // closed
			}
		}
		if err != nil {
			c.in.end(err, c.delay)
			return
		}
	}
}

// chunk is data (or the end of the stream) with the time it is delivered.
type chunk struct {
	due  time.Time
	data []byte
	err  error // set on the last chunk of a stream that ended (io.EOF, ...)
}

// delayQueue is one direction of a delayed connection: a FIFO of stamped
// chunks with a byte limit. State changes close (and replace) the changed
// channel, which waiters select on together with their timers.
type delayQueue struct {
	mu       sync.Mutex
	chunks   []chunk
	queued   int // bytes in chunks not yet taken
	limit    int
	deadline time.Time // for the local side's waits (Read or Write)
	closed   bool
	failed   error // the underlying connection failed: local I/O returns it
	ended    bool  // a chunk with err was queued: no more data will come
	changed  chan struct{}
}

func newDelayQueue(limit int) *delayQueue {
	return &delayQueue{limit: limit, changed: make(chan struct{})}
}

// notifyLocked wakes every waiter so it re-examines the state.
func (q *delayQueue) notifyLocked() {
	close(q.changed)
	q.changed = make(chan struct{})
}

func (q *delayQueue) setDeadline(t time.Time) {
	q.mu.Lock()
	q.deadline = t
	q.notifyLocked()
	q.mu.Unlock()
}

func (q *delayQueue) close() {
	q.mu.Lock()
	q.closed = true
	q.chunks, q.queued = nil, 0
	q.notifyLocked()
	q.mu.Unlock()
}

func (q *delayQueue) fail(err error) {
	q.mu.Lock()
	if q.failed == nil {
		q.failed = err
	}
	q.notifyLocked()
	q.mu.Unlock()
}

func (q *delayQueue) deadlinePassed() bool {
	return !q.deadline.IsZero() && !time.Now().Before(q.deadline)
}

// wait blocks until the state changes, the deadline or until passes (a zero
// until means no timer), releasing q.mu meanwhile. It reports a passed
// deadline as os.ErrDeadlineExceeded.
func (q *delayQueue) wait(until time.Time, useDeadline bool) error {
	if useDeadline && !q.deadline.IsZero() {
		if !time.Now().Before(q.deadline) {
			return os.ErrDeadlineExceeded
		}
		if until.IsZero() || q.deadline.Before(until) {
			until = q.deadline
		}
	}
	ch := q.changed
	q.mu.Unlock()
	defer q.mu.Lock()
	if until.IsZero() {
		<-ch
		return nil
	}
	t := time.NewTimer(time.Until(until))
	defer t.Stop()
	select {
	case <-ch:
	case <-t.C:
	}
	return nil
}

// write queues a copy of p, due d from now, waiting while the queue is
// over its limit (until the deadline, if useDeadline: the local writer's,
// not the receiving goroutine's). An empty queue takes any size, so a write
// larger than the limit cannot wait forever.
func (q *delayQueue) write(p []byte, d time.Duration, useDeadline bool) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	for {
		switch {
		case q.closed:
			return net.ErrClosed
		case q.failed != nil:
			return q.failed
		case q.ended:
			return io.ErrClosedPipe
		case useDeadline && q.deadlinePassed():
			return os.ErrDeadlineExceeded
		}
		if q.queued == 0 || q.queued+len(p) <= q.limit {
			break
		}
		if err := q.wait(time.Time{}, useDeadline); err != nil {
			return err
		}
	}
	// Time is read under the lock, so due times never go backwards.
	q.chunks = append(q.chunks, chunk{due: time.Now().Add(d), data: append([]byte(nil), p...)})
	q.queued += len(p)
	q.notifyLocked()
	return nil
}

// end queues the end of the stream, delivered d from now.
func (q *delayQueue) end(err error, d time.Duration) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed || q.ended {
		return
	}
	q.ended = true
	q.chunks = append(q.chunks, chunk{due: time.Now().Add(d), err: err})
	q.notifyLocked()
}

// read copies due data into p, waiting for some until the deadline. It
// returns the stream's end error once all data before it was read.
func (q *delayQueue) read(p []byte) (int, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for {
		if q.closed {
			return 0, net.ErrClosed
		}
		if q.deadlinePassed() {
			// As with a net.Conn, a passed deadline fails the call even
			// when data is waiting.
			return 0, os.ErrDeadlineExceeded
		}
		var until time.Time
		if len(q.chunks) > 0 {
			now := time.Now()
			n := 0
			for len(q.chunks) > 0 && n < len(p) && !q.chunks[0].due.After(now) {
				h := &q.chunks[0]
				if h.data == nil {
					if n > 0 {
						break
					}
					return 0, h.err // left in place: later reads see it too
				}
				m := copy(p[n:], h.data)
				n += m
				q.queued -= m
				if h.data = h.data[m:]; len(h.data) == 0 {
					q.chunks[0] = chunk{}
					q.chunks = q.chunks[1:]
				}
			}
			if n > 0 {
				q.notifyLocked() // room for the receiving goroutine
				return n, nil
			}
			until = q.chunks[0].due
		} else if q.failed != nil {
			return 0, q.failed
		}
		if err := q.wait(until, true); err != nil {
			return 0, err
		}
	}
}

// takeDue waits for the head chunk to be due and returns every chunk that
// is due by then. It reports false once the queue is closed.
func (q *delayQueue) takeDue() (net.Buffers, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for {
		if q.closed {
			return nil, false
		}
		var until time.Time
		if len(q.chunks) > 0 {
			now := time.Now()
			var bufs net.Buffers
			for len(q.chunks) > 0 && !q.chunks[0].due.After(now) {
				bufs = append(bufs, q.chunks[0].data)
				q.queued -= len(q.chunks[0].data)
				q.chunks[0] = chunk{}
				q.chunks = q.chunks[1:]
			}
			if len(bufs) > 0 {
				q.notifyLocked() // room for writers
				return bufs, true
			}
			until = q.chunks[0].due
		}
		q.wait(until, false)
	}
}

// dialDelayed dials with dial and, when d > 0, wraps the connection in
// DelayConn after waiting out the connection handshake's round trip (2d),
// as a real WAN link would take to connect.
func dialDelayed(ctx context.Context, d time.Duration, dial func(context.Context) (net.Conn, error)) (net.Conn, error) {
	c, err := dial(ctx)
	if err != nil || d <= 0 {
		return c, err
	}
	t := time.NewTimer(2 * d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
		c.Close()
		return nil, ctx.Err()
	}
	return DelayConn(c, d), nil
}
