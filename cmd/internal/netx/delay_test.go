package netx

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"testing"
	"time"
)

// slack absorbs scheduling noise (race detector, a loaded machine).
const slack = 150 * time.Millisecond

// pair returns the two ends of a loopback TCP connection: the local end
// wrapped with delay d and queue limit, and the plain remote end.
func pair(t *testing.T, d time.Duration, limit int) (*delayConn, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	remote := <-accepted
	if remote == nil {
		t.Fatal("accept failed")
	}
	local := newDelayConn(c, d, limit)
	t.Cleanup(func() { local.Close(); remote.Close() })
	return local, remote
}

// settle waits for the goroutine count to drop to at most n.
func settle(t *testing.T, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > n {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("goroutines: %d, want at most %d\n%s", runtime.NumGoroutine(), n, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestDelayPingPongCostsTwoDelays(t *testing.T) {
	const d = 40 * time.Millisecond
	local, remote := pair(t, d, delayQueueLimit)
	go io.Copy(remote, remote) // echo, undelayed: only the local end delays
	buf := make([]byte, 5)
	for i := range 5 {
		start := time.Now()
		if _, err := local.Write([]byte("ping!")); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(local, buf); err != nil {
			t.Fatal(err)
		}
		rtt := time.Since(start)
		if string(buf) != "ping!" {
			t.Fatalf("echo %q", buf)
		}
		if rtt < 2*d || rtt > 2*d+slack {
			t.Fatalf("round trip %d took %v, want %v..%v", i, rtt, 2*d, 2*d+slack)
		}
	}
}

func TestDelayOneWayAndOrder(t *testing.T) {
	const d = 60 * time.Millisecond
	local, remote := pair(t, d, delayQueueLimit)
	// Local to remote: arrives d after the write.
	start := time.Now()
	local.Write([]byte("abc"))
	local.Write([]byte("def"))
	got := make([]byte, 6)
	if _, err := io.ReadFull(remote, got); err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el < d || el > d+slack {
		t.Fatalf("one way out took %v, want ~%v", el, d)
	}
	if string(got) != "abcdef" {
		t.Fatalf("got %q", got)
	}
	// Remote to local: delivered d after it arrived.
	start = time.Now()
	remote.Write([]byte("xyz"))
	if _, err := io.ReadFull(local, got[:3]); err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el < d || el > d+slack {
		t.Fatalf("one way in took %v, want ~%v", el, d)
	}
	// EOF comes after the data, delayed like it.
	remote.Write([]byte("bye"))
	start = time.Now()
	remote.Close()
	all, err := io.ReadAll(local)
	if err != nil || string(all) != "bye" {
		t.Fatalf("ReadAll = %q, %v", all, err)
	}
	if el := time.Since(start); el < d-5*time.Millisecond {
		t.Fatalf("EOF after %v, before the delay %v", el, d)
	}
	if n, err := local.Read(got); n != 0 || err != io.EOF {
		t.Fatalf("read after EOF = %d, %v", n, err)
	}
}

// pattern is n bytes that differ by position, to check order.
func pattern(seed, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(seed*7 + i*13 + i>>8)
	}
	return b
}

func TestDelayDoesNotSerialiseBandwidth(t *testing.T) {
	const (
		d      = 100 * time.Millisecond
		writes = 100
		size   = 64 << 10
	)
	local, remote := pair(t, d, delayQueueLimit)
	var want bytes.Buffer
	chunks := make([][]byte, writes)
	for i := range writes {
		chunks[i] = pattern(i, size)
		want.Write(chunks[i])
	}

	// transfer sends every chunk with send and receives it all from
	// recv. Serialised, the delays would add up to writes × d = 10s;
	// kept in parallel, the last byte arrives d after it was written (the
	// loaded machine may make the writes themselves slow: that part is
	// not the delay's).
	transfer := func(dir string, send, recv net.Conn) {
		t.Helper()
		start := time.Now()
		sent := make(chan time.Time, 1)
		go func() {
			for _, c := range chunks {
				if _, err := send.Write(c); err != nil {
					t.Error(err)
				}
			}
			sent <- time.Now()
		}()
		got := make([]byte, writes*size)
		if _, err := io.ReadFull(recv, got); err != nil {
			t.Fatal(err)
		}
		end := time.Now()
		last := <-sent
		t.Logf("%s: writes took %v, all data arrived after %v", dir, last.Sub(start), end.Sub(start))
		if el := end.Sub(start); el < d {
			t.Fatalf("%s: %d × %d bytes arrived after %v, before the delay %v", dir, writes, size, el, d)
		}
		if tail := end.Sub(last); tail > d+slack {
			t.Fatalf("%s: the last write arrived %v after it was written, want about %v", dir, tail, d)
		}
		if !bytes.Equal(got, want.Bytes()) {
			t.Fatalf("%s: data corrupted or reordered", dir)
		}
	}
	transfer("out", local, remote)
	transfer("in", remote, local)
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) && errors.As(err, &ne) && ne.Timeout()
}

func TestDelayReadDeadline(t *testing.T) {
	const d = 200 * time.Millisecond
	local, remote := pair(t, d, delayQueueLimit)
	remote.Write([]byte("late"))

	// The data has arrived but is not due: the deadline wins.
	local.SetReadDeadline(time.Now().Add(30 * time.Millisecond))
	start := time.Now()
	buf := make([]byte, 4)
	if n, err := local.Read(buf); n != 0 || !isTimeout(err) {
		t.Fatalf("Read = %d, %v; want a timeout", n, err)
	}
	if el := time.Since(start); el < 25*time.Millisecond || el > 30*time.Millisecond+slack {
		t.Fatalf("timeout after %v, want ~30ms", el)
	}
	// A deadline in the past fails at once.
	local.SetReadDeadline(time.Now().Add(-time.Second))
	if _, err := local.Read(buf); !isTimeout(err) {
		t.Fatalf("Read past deadline = %v", err)
	}
	// Clearing it: the data comes when due, intact.
	local.SetReadDeadline(time.Time{})
	if _, err := io.ReadFull(local, buf); err != nil || string(buf) != "late" {
		t.Fatalf("after clearing the deadline: %q, %v", buf, err)
	}
	// A deadline set while a Read waits wakes it.
	errc := make(chan error, 1)
	go func() {
		_, err := local.Read(buf)
		errc <- err
	}()
	time.Sleep(20 * time.Millisecond)
	start = time.Now()
	local.SetDeadline(time.Now())
	select {
	case err := <-errc:
		if !isTimeout(err) {
			t.Fatalf("woken Read = %v", err)
		}
	case <-time.After(slack):
		t.Fatal("SetDeadline did not wake a waiting Read")
	}
	if el := time.Since(start); el > slack {
		t.Fatalf("woken after %v", el)
	}
}

func TestDelayWriteBackpressureAndDeadline(t *testing.T) {
	const limit = 1 << 20
	// The peer never reads: the kernel buffers fill, then the send queue.
	local, _ := pair(t, 5*time.Millisecond, limit)
	local.SetWriteDeadline(time.Now().Add(500 * time.Millisecond))
	chunk := make([]byte, 64<<10)
	var total int
	var err error
	for total < 1<<30 {
		var n int
		if n, err = local.Write(chunk); err != nil {
			break
		}
		total += n
	}
	if !isTimeout(err) {
		t.Fatalf("after %d bytes: Write = %v; want a timeout", total, err)
	}
	local.out.mu.Lock()
	queued := local.out.queued
	local.out.mu.Unlock()
	if queued > limit {
		t.Fatalf("%d bytes queued, limit %d", queued, limit)
	}
	if total > 256<<20 {
		t.Fatalf("%d bytes accepted: backpressure does not work", total)
	}
	// A past write deadline fails at once; clearing it lets writes wait.
	local.SetWriteDeadline(time.Now().Add(-time.Second))
	if _, err := local.Write([]byte("x")); !isTimeout(err) {
		t.Fatalf("Write past deadline = %v", err)
	}
}

func TestDelayCloseIsPromptAndLeaksNothing(t *testing.T) {
	base := runtime.NumGoroutine()
	func() {
		const d = time.Second
		local, remote := pair(t, d, delayQueueLimit)
		// Pending in both directions.
		local.Write(make([]byte, 1<<20))
		remote.Write(make([]byte, 1<<20))
		readErr := make(chan error, 1)
		go func() {
			_, err := local.Read(make([]byte, 10))
			readErr <- err
		}()
		time.Sleep(50 * time.Millisecond)
		start := time.Now()
		if err := local.Close(); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-readErr:
			if !errors.Is(err, net.ErrClosed) {
				t.Fatalf("Read after Close = %v", err)
			}
		case <-time.After(slack):
			t.Fatal("Close did not unblock Read")
		}
		if el := time.Since(start); el > slack {
			t.Fatalf("Close took %v", el)
		}
		if _, err := local.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Write after Close = %v", err)
		}
		if err := local.Close(); err != nil {
			t.Fatalf("second Close = %v", err)
		}
		remote.Close()
	}()
	settle(t, base)
}

func TestDelayCloseUnblocksFullWrite(t *testing.T) {
	base := runtime.NumGoroutine()
	func() {
		local, remote := pair(t, 5*time.Millisecond, 1<<20)
		errc := make(chan error, 1)
		go func() {
			chunk := make([]byte, 64<<10)
			for {
				if _, err := local.Write(chunk); err != nil {
					errc <- err
					return
				}
			}
		}()
		time.Sleep(200 * time.Millisecond) // kernel buffers and queue fill up
		local.Close()
		select {
		case err := <-errc:
			if !errors.Is(err, net.ErrClosed) {
				t.Fatalf("Write = %v", err)
			}
		case <-time.After(slack):
			t.Fatal("Close did not unblock a full Write")
		}
		remote.Close()
	}()
	settle(t, base)
}

func TestPeerResetFailsLocalIO(t *testing.T) {
	local, remote := pair(t, 10*time.Millisecond, delayQueueLimit)
	remote.(*net.TCPConn).SetLinger(0)
	remote.Close() // RST
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := local.Write([]byte("x")); err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("writes to a reset peer keep succeeding")
		}
		time.Sleep(20 * time.Millisecond)
	}
	local.SetReadDeadline(time.Now().Add(time.Second))
	if _, err := local.Read(make([]byte, 1)); err == nil || isTimeout(err) {
		t.Fatalf("Read from a reset peer = %v", err)
	}
}

func TestNetworkDelaysOnlySiteLinks(t *testing.T) {
	const d = 50 * time.Millisecond
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	n := &Network{LinkDelay: d}
	for _, link := range []Link{LinkNBD, LinkRaft, LinkAPI} {
		start := time.Now()
		c, err := n.DialContext(context.Background(), link, ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		dial := time.Since(start)
		_, isDelayed := c.(*delayConn)
		if isDelayed != (link != LinkNBD) {
			t.Errorf("%s: delayed = %v", link, isDelayed)
		}
		if isDelayed && (dial < 2*d || dial > 2*d+slack) {
			t.Errorf("%s: dial took %v, want one round trip %v", link, dial, 2*d)
		}
		start = time.Now()
		c.Write([]byte("x"))
		io.ReadFull(c, make([]byte, 1))
		rtt := time.Since(start)
		if isDelayed && (rtt < 2*d || rtt > 2*d+slack) || !isDelayed && rtt > slack {
			t.Errorf("%s: round trip %v", link, rtt)
		}
		c.Close()
	}
	// A cancelled context interrupts the connection round trip.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	slow := &Network{LinkDelay: time.Second}
	start := time.Now()
	if _, err := slow.DialContext(ctx, LinkRaft, ln.Addr().String()); err == nil {
		t.Fatal("dial outlived its context")
	}
	if el := time.Since(start); el > slack {
		t.Fatalf("cancelled dial took %v", el)
	}
}
