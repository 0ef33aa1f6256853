package wire

//lint:file-ignore SA1019 raft v1.7.3 still fills and reads the deprecated Leader and Candidate fields, so the frame format carries them

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"reflect"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

func tcpDial(ctx context.Context, addr string) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, "tcp", addr)
}

// logBuf collects a transport's log lines.
type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

type node struct {
	*Transport
	logs *logBuf
}

func newNode(t testing.TB, mod func(*Config)) node {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	logs := &logBuf{}
	cfg := Config{Listener: ln, Dial: tcpDial, Timeout: 5 * time.Second, Logger: slog.New(slog.NewTextHandler(logs, nil))}
	if mod != nil {
		mod(&cfg)
	}
	tr, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tr.Close() })
	return node{tr, logs}
}

// serve answers every RPC of n with answer until the test ends.
func serve(t testing.TB, n node, answer func(raft.RPC) (any, error)) {
	done := make(chan struct{})
	go func() {
		for {
			select {
			case rpc := <-n.Consumer():
				resp, err := answer(rpc)
				rpc.Respond(resp, err)
			case <-done:
				return
			}
		}
	}()
	t.Cleanup(func() { close(done) })
}

// call sends req with the RPC of its type.
func call(tr *Transport, target raft.ServerAddress, req any) (any, error) {
	switch r := req.(type) {
	case *raft.AppendEntriesRequest:
		resp := new(raft.AppendEntriesResponse)
		return resp, tr.AppendEntries("peer", target, r, resp)
	case *raft.RequestVoteRequest:
		resp := new(raft.RequestVoteResponse)
		return resp, tr.RequestVote("peer", target, r, resp)
	case *raft.RequestPreVoteRequest:
		resp := new(raft.RequestPreVoteResponse)
		return resp, tr.RequestPreVote("peer", target, r, resp)
	case *raft.TimeoutNowRequest:
		resp := new(raft.TimeoutNowResponse)
		return resp, tr.TimeoutNow("peer", target, r, resp)
	case *raft.InstallSnapshotRequest:
		resp := new(raft.InstallSnapshotResponse)
		return resp, tr.InstallSnapshot("peer", target, r, resp, bytes.NewReader(make([]byte, r.Size)))
	}
	panic(fmt.Sprintf("no RPC for %T", req))
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// TestRoundTrips: every RPC, with every field set, nil and empty slices,
// a remote error, and large entries, arrives and answers exactly.
func TestRoundTrips(t *testing.T) {
	server, client := newNode(t, nil), newNode(t, nil)
	type exchange struct {
		req    any
		resp   any
		rpcErr string
	}
	got := make(chan any, 1)
	var next exchange
	var mu sync.Mutex
	serve(t, server, func(rpc raft.RPC) (any, error) {
		if rpc.Reader != nil {
			if _, err := io.Copy(io.Discard, rpc.Reader); err != nil {
				return nil, err
			}
		}
		got <- rpc.Command
		mu.Lock()
		defer mu.Unlock()
		if next.rpcErr != "" {
			return next.resp, errors.New(next.rpcErr)
		}
		return next.resp, nil
	})
	s := samples()
	big := &raft.AppendEntriesRequest{RPCHeader: hdr("site-a", "a"), Term: 3, PrevLogEntry: 9, PrevLogTerm: 2, LeaderCommitIndex: 9}
	for i := range 8 {
		big.Entries = append(big.Entries, &raft.Log{Index: uint64(10 + i), Term: 3, Data: randomBytes(512 << 10), Extensions: randomBytes(i), AppendedAt: at.Add(time.Duration(i))})
	}
	exchanges := []exchange{
		{s[0].msg, s[3].msg, ""},
		{s[1].msg, s[4].msg, s[4].rpcErr},
		{s[2].msg, s[3].msg, ""},
		{big, s[3].msg, ""},
		{&raft.AppendEntriesRequest{Entries: []*raft.Log{}}, &raft.AppendEntriesResponse{}, ""},
		{&raft.AppendEntriesRequest{}, &raft.AppendEntriesResponse{RPCHeader: raft.RPCHeader{ID: []byte{}}}, ""},
		{s[5].msg, s[6].msg, ""},
		{&raft.RequestVoteRequest{Candidate: []byte{}}, &raft.RequestVoteResponse{Peers: []byte{}}, "vote refused"},
		{s[7].msg, s[8].msg, ""},
		{s[9].msg, s[10].msg, ""},
		{&raft.InstallSnapshotRequest{Size: 0}, &raft.InstallSnapshotResponse{}, ""},
		{s[11].msg, s[12].msg, ""},
	}
	for i, x := range exchanges {
		if r, ok := x.req.(*raft.InstallSnapshotRequest); ok && r.Size > 1<<20 {
			r.Size = 3<<20 + 7
		}
		mu.Lock()
		next = x
		mu.Unlock()
		resp, err := call(client.Transport, server.LocalAddr(), x.req)
		if x.rpcErr != "" {
			if err == nil || err.Error() != x.rpcErr {
				t.Fatalf("%d: error %v, want %q", i, err, x.rpcErr)
			}
		} else if err != nil {
			t.Fatalf("%d (%T): %v", i, x.req, err)
		}
		if cmd := <-got; !reflect.DeepEqual(cmd, x.req) {
			t.Fatalf("%d: server got\n%#v\nwant\n%#v", i, cmd, x.req)
		}
		if !reflect.DeepEqual(resp, x.resp) {
			t.Fatalf("%d: client got\n%#v\nwant\n%#v", i, resp, x.resp)
		}
	}
}

// TestWrongResponseType: a handler answering with nil or the wrong type
// gets a zero response of the right type to the caller, not a failure.
func TestWrongResponseType(t *testing.T) {
	server, client := newNode(t, nil), newNode(t, nil)
	serve(t, server, func(rpc raft.RPC) (any, error) {
		if _, ok := rpc.Command.(*raft.RequestVoteRequest); ok {
			return nil, errors.New("no")
		}
		return &raft.RequestVoteResponse{Granted: true}, nil
	})
	resp, err := call(client.Transport, server.LocalAddr(), &raft.AppendEntriesRequest{Term: 1})
	if err != nil || !reflect.DeepEqual(resp, &raft.AppendEntriesResponse{}) {
		t.Fatalf("got %#v, %v", resp, err)
	}
	resp, err = call(client.Transport, server.LocalAddr(), &raft.RequestVoteRequest{Term: 1})
	if err == nil || err.Error() != "no" || !reflect.DeepEqual(resp, &raft.RequestVoteResponse{}) {
		t.Fatalf("got %#v, %v", resp, err)
	}
}

// TestHeartbeatFastPath: a heartbeat goes to the heartbeat handler, other
// AppendEntries to the consumer, as in raft.NetworkTransport.
func TestHeartbeatFastPath(t *testing.T) {
	server, client := newNode(t, nil), newNode(t, nil)
	hb := make(chan any, 1)
	server.SetHeartbeatHandler(func(rpc raft.RPC) {
		hb <- rpc.Command
		rpc.Respond(&raft.AppendEntriesResponse{Term: 5, Success: true}, nil)
	})
	consumed := make(chan any, 1)
	serve(t, server, func(rpc raft.RPC) (any, error) {
		consumed <- rpc.Command
		return &raft.AppendEntriesResponse{Term: 6}, nil
	})
	beat := &raft.AppendEntriesRequest{RPCHeader: hdr("a", "127.0.0.1:1"), Term: 5}
	resp, err := call(client.Transport, server.LocalAddr(), beat)
	if err != nil || resp.(*raft.AppendEntriesResponse).Term != 5 {
		t.Fatalf("heartbeat: %#v, %v", resp, err)
	}
	if cmd := <-hb; !reflect.DeepEqual(cmd, beat) {
		t.Fatalf("heartbeat handler got %#v", cmd)
	}
	// The deprecated Leader field alone also makes a heartbeat.
	beat = &raft.AppendEntriesRequest{Term: 5, Leader: []byte("127.0.0.1:1")}
	if _, err := call(client.Transport, server.LocalAddr(), beat); err != nil {
		t.Fatal(err)
	}
	<-hb
	for _, notBeat := range []*raft.AppendEntriesRequest{
		{RPCHeader: hdr("a", "127.0.0.1:1"), Term: 5, LeaderCommitIndex: 1},
		{RPCHeader: hdr("a", "127.0.0.1:1"), Term: 5, Entries: []*raft.Log{{Index: 1}}},
		{RPCHeader: hdr("a", ""), Term: 5},
	} {
		resp, err := call(client.Transport, server.LocalAddr(), notBeat)
		if err != nil || resp.(*raft.AppendEntriesResponse).Term != 6 {
			t.Fatalf("%#v: %#v, %v", notBeat, resp, err)
		}
		if cmd := <-consumed; !reflect.DeepEqual(cmd, notBeat) {
			t.Fatalf("consumer got %#v", cmd)
		}
	}
	if len(hb) != 0 {
		t.Fatal("a non-heartbeat went to the heartbeat handler")
	}
}

// TestInstallSnapshot streams a snapshot and checks every byte; a second
// one follows on a new connection.
func TestInstallSnapshot(t *testing.T) {
	server, client := newNode(t, nil), newNode(t, nil)
	type recv struct {
		data []byte
		err  error
	}
	got := make(chan recv, 1)
	serve(t, server, func(rpc raft.RPC) (any, error) {
		b, err := io.ReadAll(rpc.Reader)
		got <- recv{b, err}
		return &raft.InstallSnapshotResponse{Term: 4, Success: err == nil}, err
	})
	for _, size := range []int{5<<20 + 3, 1} {
		data := randomBytes(size)
		req := &raft.InstallSnapshotRequest{RPCHeader: hdr("a", "b"), Term: 4, Size: int64(size), Configuration: []byte("c")}
		var resp raft.InstallSnapshotResponse
		if err := client.InstallSnapshot("s", server.LocalAddr(), req, &resp, bytes.NewReader(data)); err != nil {
			t.Fatal(err)
		}
		r := <-got
		if r.err != nil || !bytes.Equal(r.data, data) {
			t.Fatalf("server read %d bytes, %v; want %d", len(r.data), r.err, size)
		}
		if !resp.Success || resp.Term != 4 {
			t.Fatalf("response %#v", resp)
		}
	}
}

// TestInstallSnapshotShort: a snapshot reader that ends early fails the
// sender, and raft's reader on the receiver gets an error, never io.EOF.
func TestInstallSnapshotShort(t *testing.T) {
	server, client := newNode(t, nil), newNode(t, nil)
	got := make(chan error, 1)
	serve(t, server, func(rpc raft.RPC) (any, error) {
		_, err := io.ReadAll(rpc.Reader)
		got <- err
		return &raft.InstallSnapshotResponse{}, err
	})
	req := &raft.InstallSnapshotRequest{Size: 1 << 20}
	err := client.InstallSnapshot("s", server.LocalAddr(), req, &raft.InstallSnapshotResponse{}, bytes.NewReader(make([]byte, 1000)))
	if !errors.Is(err, ErrInvalidConfig) {
		t.Fatalf("sender: %v", err)
	}
	if err := <-got; !errors.Is(err, ErrTruncated) {
		t.Fatalf("receiver: %v", err)
	}
}

// TestInstallSnapshotChecksum: a stream whose trailing crc does not match
// is an error at its end.
func TestInstallSnapshotChecksum(t *testing.T) {
	server := newNode(t, nil)
	got := make(chan error, 1)
	serve(t, server, func(rpc raft.RPC) (any, error) {
		_, err := io.ReadAll(rpc.Reader)
		got <- err
		return &raft.InstallSnapshotResponse{}, err
	})
	c := rawConn(t, server)
	data := []byte("0123456789")
	c.Write(frameBytes(t, &raft.InstallSnapshotRequest{Size: int64(len(data))}, "", false))
	c.Write(data)
	c.Write(binary.LittleEndian.AppendUint32(nil, crcOf(data)+1))
	if err := <-got; !errors.Is(err, ErrChecksum) {
		t.Fatalf("receiver: %v", err)
	}
	var h [headerSize]byte
	f, err := readFrame(c, &h, DefaultMaxFrame)
	if err != nil {
		t.Fatal(err)
	}
	if rpcErr, err := decodeResponse(f, kindInstallSnap, &raft.InstallSnapshotResponse{}); err != nil || !strings.Contains(rpcErr, "checksum") {
		t.Fatalf("response %q, %v", rpcErr, err)
	}
}

// TestPipelineOrder: futures complete in request order with their own
// responses, with several requests in flight.
func TestPipelineOrder(t *testing.T) {
	for _, inflight := range []int{2, 3, 16} {
		t.Run(fmt.Sprint(inflight), func(t *testing.T) {
			server := newNode(t, nil)
			client := newNode(t, func(c *Config) { c.MaxRPCsInFlight = inflight })
			serve(t, server, func(rpc raft.RPC) (any, error) {
				req := rpc.Command.(*raft.AppendEntriesRequest)
				if req.PrevLogEntry%7 == 3 {
					return &raft.AppendEntriesResponse{LastLog: req.PrevLogEntry}, fmt.Errorf("refused %d", req.PrevLogEntry)
				}
				return &raft.AppendEntriesResponse{LastLog: req.PrevLogEntry, Success: true}, nil
			})
			p, err := client.AppendEntriesPipeline("s", server.LocalAddr())
			if err != nil {
				t.Fatal(err)
			}
			const n = 200
			errc := make(chan error, 1)
			go func() {
				for i := range n {
					f := <-p.Consumer()
					req, resp := f.Request(), f.Response()
					if req.PrevLogEntry != uint64(i) {
						errc <- fmt.Errorf("future %d is for request %d", i, req.PrevLogEntry)
						return
					}
					err := f.Error()
					if i%7 == 3 {
						if err == nil || err.Error() != fmt.Sprintf("refused %d", i) {
							errc <- fmt.Errorf("future %d: error %v", i, err)
							return
						}
					} else if err != nil || resp.LastLog != uint64(i) || !resp.Success {
						errc <- fmt.Errorf("future %d: %v, %#v", i, err, resp)
						return
					}
					if f.Start().IsZero() {
						errc <- fmt.Errorf("future %d has no start time", i)
						return
					}
				}
				errc <- nil
			}()
			for i := range n {
				req := &raft.AppendEntriesRequest{Term: 1, PrevLogEntry: uint64(i), Entries: []*raft.Log{{Index: uint64(i + 1), Data: randomBytes(1000)}}}
				if _, err := p.AppendEntries(req, new(raft.AppendEntriesResponse)); err != nil {
					t.Fatal(err)
				}
			}
			if err := <-errc; err != nil {
				t.Fatal(err)
			}
			if err := p.Close(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestPipelineDisabled: MaxRPCsInFlight 1 asks raft to replicate without
// a pipeline.
func TestPipelineDisabled(t *testing.T) {
	server := newNode(t, nil)
	client := newNode(t, func(c *Config) { c.MaxRPCsInFlight = 1 })
	if _, err := client.AppendEntriesPipeline("s", server.LocalAddr()); !errors.Is(err, raft.ErrPipelineReplicationNotSupported) {
		t.Fatal(err)
	}
}

// stalled is a server whose consumer never answers: RPCs to it block
// until a deadline or a Close.
func stalled(t testing.TB) node {
	return newNode(t, func(c *Config) { c.Timeout = time.Minute })
}

// TestPipelineClose: Close unblocks a send waiting for room in flight and
// later sends fail.
func TestPipelineClose(t *testing.T) {
	server := stalled(t)
	client := newNode(t, func(c *Config) { c.Timeout = time.Minute })
	p, err := client.AppendEntriesPipeline("s", server.LocalAddr())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.AppendEntries(&raft.AppendEntriesRequest{Term: 1}, new(raft.AppendEntriesResponse)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the first request to arrive", func() bool { return server.received.Load() == 1 })
	// The second send blocks: the reader waits for the first answer, which
	// never comes. Close unblocks it (or, if it has not started yet, makes
	// it fail at once: either way ErrShutdown).
	blocked := make(chan error, 1)
	go func() {
		_, err := p.AppendEntries(&raft.AppendEntriesRequest{Term: 1}, new(raft.AppendEntriesResponse))
		blocked <- err
	}()
	p.Close()
	if err := <-blocked; !errors.Is(err, ErrShutdown) {
		t.Fatalf("blocked send: %v", err)
	}
	if _, err := p.AppendEntries(&raft.AppendEntriesRequest{Term: 1}, new(raft.AppendEntriesResponse)); !errors.Is(err, ErrShutdown) {
		t.Fatalf("send after Close: %v", err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestCloseUnblocks: closing the client fails its RPC in progress at once;
// closing the server fails the client's; everything after Close fails
// with ErrShutdown.
func TestCloseUnblocks(t *testing.T) {
	server := stalled(t)
	client := newNode(t, func(c *Config) { c.Timeout = time.Minute })
	errc := make(chan error, 1)
	go func() {
		_, err := call(client.Transport, server.LocalAddr(), &raft.RequestVoteRequest{Term: 1})
		errc <- err
	}()
	waitFor(t, "the vote to reach the server", func() bool { return server.received.Load() == 1 })
	client.Close()
	if err := <-errc; !errors.Is(err, ErrShutdown) {
		t.Fatalf("RPC in progress at Close: %v", err)
	}
	if _, err := call(client.Transport, server.LocalAddr(), &raft.RequestVoteRequest{Term: 1}); !errors.Is(err, ErrShutdown) {
		t.Fatalf("RPC after Close: %v", err)
	}
	if _, err := client.AppendEntriesPipeline("s", server.LocalAddr()); !errors.Is(err, ErrShutdown) {
		t.Fatalf("pipeline after Close: %v", err)
	}
	if err := client.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}

	other := newNode(t, func(c *Config) { c.Timeout = time.Minute })
	go func() {
		_, err := call(other.Transport, server.LocalAddr(), &raft.RequestVoteRequest{Term: 1})
		errc <- err
	}()
	waitFor(t, "the vote to reach the server", func() bool { return server.received.Load() == 2 })
	server.Close()
	if err := <-errc; !errors.Is(err, ErrTruncated) {
		t.Fatalf("RPC to a server that closed: %v", err)
	}
}

// TestTimeout: a server that does not answer makes the RPC fail after
// Timeout.
func TestTimeout(t *testing.T) {
	server := stalled(t)
	client := newNode(t, func(c *Config) { c.Timeout = 200 * time.Millisecond })
	start := time.Now()
	_, err := call(client.Transport, server.LocalAddr(), &raft.AppendEntriesRequest{Term: 1})
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("got %v", err)
	}
	if d := time.Since(start); d < 200*time.Millisecond || d > 5*time.Second {
		t.Fatalf("timed out after %v", d)
	}
}

// rawConn dials n without a transport, for sending hand-made bytes.
func rawConn(t testing.TB, n node) *net.TCPConn {
	t.Helper()
	c, err := net.Dial("tcp", string(n.LocalAddr()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(20 * time.Second))
	return c.(*net.TCPConn)
}

// expectReject reads the server's reject frame, checks its reason, and
// checks that the server then closed the connection.
func expectReject(t *testing.T, c net.Conn, want error) {
	t.Helper()
	var h [headerSize]byte
	f, err := readFrame(c, &h, DefaultMaxFrame)
	if err != nil {
		t.Fatalf("reading the reject frame: %v", err)
	}
	_, err = decodeResponse(f, kindAppendEntries, &raft.AppendEntriesResponse{})
	if !errors.Is(err, ErrRejected) || !strings.Contains(err.Error(), want.Error()) {
		t.Fatalf("got %v, want a rejection for %v", err, want)
	}
	if n, err := c.Read(h[:]); n != 0 || !errors.Is(err, io.EOF) {
		t.Fatalf("connection still open after the reject: %d, %v", n, err)
	}
}

// TestStrangers: garbage, wrong versions, bad checksums, oversized or
// truncated frames, responses sent as requests and slow senders are
// refused with a reason and the connection closed; nothing reaches raft
// and the transport keeps serving.
func TestStrangers(t *testing.T) {
	server := newNode(t, func(c *Config) { c.Timeout = 300 * time.Millisecond; c.MaxFrame = 1 << 20 })
	reached := make(chan any, 100)
	serve(t, server, func(rpc raft.RPC) (any, error) {
		reached <- rpc.Command
		return &raft.RequestVoteResponse{Granted: true}, nil
	})
	vote := frameBytes(t, samples()[5].msg, "", false)
	big := frameBytes(t, &raft.AppendEntriesRequest{Entries: []*raft.Log{{Data: make([]byte, 1<<20)}}}, "", false)
	for _, c := range []struct {
		name string
		send []byte
		half bool // close our write side after sending
		want error
	}{
		{"http", []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), false, ErrMagic},
		{"short garbage", []byte("GET /"), false, ErrMagic},
		{"msgpack transport", []byte{0, 0x87, 0xa4}, true, ErrTruncated},
		{"version 2", corrupt(vote, func(b []byte) { b[4] = 2 }), false, ErrVersion},
		{"header crc", func() []byte { b := bytes.Clone(vote); b[29] ^= 1; return b }(), false, ErrChecksum},
		{"metadata crc", func() []byte { b := bytes.Clone(vote); b[40] ^= 1; return b }(), false, ErrChecksum},
		{"oversized", big, false, ErrTooLarge},
		{"4 GiB", corrupt(vote, func(b []byte) { binary.LittleEndian.PutUint32(b[12:], 0xFFFFFFFF) }), false, ErrTooLarge},
		{"response as request", frameBytes(t, samples()[6].msg, "", false), false, ErrMalformed},
		{"reject as request", func() []byte { var e encoder; b, _ := e.reject("x", 100); return bytes.Join(b, nil) }(), false, ErrMalformed},
		{"trailing metadata", corrupt(append(bytes.Clone(vote), 0), func(b []byte) {
			binary.LittleEndian.PutUint32(b[8:], binary.LittleEndian.Uint32(b[8:])+1)
		}), false, ErrMalformed},
		{"truncated header", vote[:20], true, ErrTruncated},
		{"truncated body", vote[:len(vote)-3], true, ErrTruncated},
		{"slow header", vote[:20], false, ErrSlow},
		{"slow body", vote[:len(vote)-3], false, ErrSlow},
	} {
		t.Run(c.name, func(t *testing.T) {
			conn := rawConn(t, server)
			if _, err := conn.Write(c.send); err != nil {
				t.Fatal(err)
			}
			if c.half {
				conn.CloseWrite()
			}
			expectReject(t, conn, c.want)
		})
	}
	if len(reached) != 0 {
		t.Fatalf("a refused frame reached raft: %#v", <-reached)
	}
	// Still serving, and the log says why connections were closed.
	client := newNode(t, nil)
	if _, err := call(client.Transport, server.LocalAddr(), samples()[5].msg); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(<-reached, samples()[5].msg) {
		t.Fatal("the vote after the strangers was not delivered intact")
	}
	for _, want := range []string{"bad magic", "version 2", "checksum", "too large", "too slow", "truncated"} {
		if !strings.Contains(server.logs.String(), want) {
			t.Errorf("server log lacks %q:\n%s", want, server.logs)
		}
	}
}

// fakeServer accepts one connection, reads a request frame and answers
// with reply (then closes).
func fakeServer(t *testing.T, reply []byte) raft.ServerAddress {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		var h [headerSize]byte
		if _, err := readFrame(c, &h, DefaultMaxFrame); err != nil {
			return
		}
		c.Write(reply)
	}()
	return raft.ServerAddress(ln.Addr().String())
}

// TestBadResponses: a peer that answers with half a frame, a frame of
// another version, the wrong kind, or a rejection gives the caller a
// clear error.
func TestBadResponses(t *testing.T) {
	client := newNode(t, nil)
	resp := frameBytes(t, samples()[6].msg, "", false)
	var e encoder
	rej, _ := e.reject("go away", DefaultMaxFrame)
	for _, c := range []struct {
		name  string
		reply []byte
		want  error
		text  string
	}{
		{"half a response", resp[:len(resp)/2], ErrTruncated, "truncated"},
		{"no response", nil, ErrTruncated, "without answering"},
		{"version 2", corrupt(resp, func(b []byte) { b[4] = 2 }), ErrVersion, "peer speaks version 2, this side version 1"},
		{"wrong kind", frameBytes(t, samples()[3].msg, "", false), ErrMalformed, "response kind"},
		{"request as response", frameBytes(t, samples()[5].msg, "", false), ErrMalformed, "response kind"},
		{"rejected", bytes.Join(rej, nil), ErrRejected, "go away"},
		{"garbage", []byte("HTTP/1.1 400 Bad Request\r\n\r\n"), ErrMagic, "bad magic"},
	} {
		t.Run(c.name, func(t *testing.T) {
			addr := fakeServer(t, c.reply)
			_, err := call(client.Transport, addr, samples()[5].msg)
			if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.text) {
				t.Fatalf("got %v, want %v (%q)", err, c.want, c.text)
			}
		})
	}
}

// TestOversizedSend: a frame over MaxFrame is refused before sending and
// the connection stays usable; a receiver with a smaller MaxFrame rejects.
func TestOversizedSend(t *testing.T) {
	server := newNode(t, func(c *Config) { c.MaxFrame = 1 << 20 })
	serve(t, server, func(rpc raft.RPC) (any, error) { return &raft.AppendEntriesResponse{Success: true}, nil })
	client := newNode(t, func(c *Config) { c.MaxFrame = 1 << 20 })
	huge := &raft.AppendEntriesRequest{Term: 1, Entries: []*raft.Log{{Data: make([]byte, 1<<20)}}}
	if _, err := call(client.Transport, server.LocalAddr(), huge); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("got %v", err)
	}
	resp, err := call(client.Transport, server.LocalAddr(), &raft.AppendEntriesRequest{Term: 1})
	if err != nil || !resp.(*raft.AppendEntriesResponse).Success {
		t.Fatalf("after the refusal: %v", err)
	}
	bigger := newNode(t, nil)
	if _, err := call(bigger.Transport, server.LocalAddr(), huge); !errors.Is(err, ErrRejected) || !strings.Contains(err.Error(), "too large") {
		t.Fatalf("got %v", err)
	}
}

// TestNetworkTransportPeer: a msgpack raft.NetworkTransport and this
// transport refuse each other with errors, not hangs.
func TestNetworkTransportPeer(t *testing.T) {
	ours := newNode(t, nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	nt := raft.NewNetworkTransport(&tcpStream{ln}, 2, 5*time.Second, io.Discard)
	t.Cleanup(func() { nt.Close() })
	go func() {
		for rpc := range nt.Consumer() {
			rpc.Respond(&raft.RequestVoteResponse{}, nil)
		}
	}()
	if _, err := call(ours.Transport, nt.LocalAddr(), &raft.RequestVoteRequest{Term: 1}); !errors.Is(err, ErrTruncated) {
		t.Fatalf("ours to msgpack: %v", err)
	}
	if err := nt.RequestVote("x", ours.LocalAddr(), &raft.RequestVoteRequest{Term: 1}, &raft.RequestVoteResponse{}); err == nil {
		t.Fatal("msgpack to ours succeeded")
	}
	waitFor(t, "the refusal in our log", func() bool { return strings.Contains(ours.logs.String(), "bad magic") })
}

// tcpStream is a raft.StreamLayer over a TCP listener.
type tcpStream struct{ net.Listener }

func (s *tcpStream) Dial(addr raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	return net.DialTimeout("tcp", string(addr), timeout)
}

func TestNewInvalid(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for _, cfg := range []Config{
		{Dial: tcpDial},
		{Listener: ln},
		{Listener: ln, Dial: tcpDial, Timeout: -1},
		{Listener: ln, Dial: tcpDial, MaxPool: -1},
		{Listener: ln, Dial: tcpDial, MaxRPCsInFlight: -1},
		{Listener: ln, Dial: tcpDial, MaxFrame: -1},
	} {
		if _, err := New(cfg); !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("%+v: %v", cfg, err)
		}
	}
	tr, err := New(Config{Listener: ln, Dial: tcpDial, Advertise: "site-a:7000"})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	if tr.LocalAddr() != "site-a:7000" {
		t.Fatalf("LocalAddr %q", tr.LocalAddr())
	}
	if got := tr.DecodePeer(tr.EncodePeer("id", "10.0.0.9:7000")); got != "10.0.0.9:7000" {
		t.Fatalf("peer round trip: %q", got)
	}
	if err := tr.InstallSnapshot("s", "x", &raft.InstallSnapshotRequest{Size: -1}, &raft.InstallSnapshotResponse{}, nil); !errors.Is(err, ErrInvalidConfig) {
		t.Fatalf("negative snapshot size: %v", err)
	}
}

// TestPoolReuse: sequential RPCs share one pooled connection.
func TestPoolReuse(t *testing.T) {
	server, client := newNode(t, nil), newNode(t, func(c *Config) { c.MaxPool = 1 })
	serve(t, server, func(rpc raft.RPC) (any, error) { return &raft.RequestVoteResponse{Granted: true}, nil })
	for range 20 {
		if _, err := call(client.Transport, server.LocalAddr(), &raft.RequestVoteRequest{}); err != nil {
			t.Fatal(err)
		}
	}
	if n := server.accepted.Load(); n != 1 {
		t.Fatalf("%d connections for 20 sequential RPCs", n)
	}
}

// TestPipelineBroken: a follower that answers one request and then drops
// the connection fails the next futures with a clear error, in order; an
// oversized request is refused without breaking the pipeline.
func TestPipelineBroken(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	reply := frameBytes(t, &raft.AppendEntriesResponse{LastLog: 1, Success: true}, "", false)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		var h [headerSize]byte
		for range 2 {
			if _, err := readFrame(c, &h, DefaultMaxFrame); err != nil {
				return
			}
		}
		c.Write(reply)
	}()
	client := newNode(t, func(c *Config) { c.MaxRPCsInFlight = 4; c.MaxFrame = 1 << 20 })
	p, err := client.AppendEntriesPipeline("s", raft.ServerAddress(ln.Addr().String()))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if _, err := p.AppendEntries(&raft.AppendEntriesRequest{Entries: []*raft.Log{{Data: make([]byte, 1<<20)}}}, new(raft.AppendEntriesResponse)); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("oversized: %v", err)
	}
	for i := range 2 {
		if _, err := p.AppendEntries(&raft.AppendEntriesRequest{PrevLogEntry: uint64(i)}, new(raft.AppendEntriesResponse)); err != nil {
			t.Fatal(err)
		}
	}
	f := <-p.Consumer()
	if err := f.Error(); err != nil || f.Request().PrevLogEntry != 0 || !f.Response().Success {
		t.Fatalf("first future: %v, %#v", err, f.Response())
	}
	f = <-p.Consumer()
	if err := f.Error(); !errors.Is(err, ErrTruncated) || f.Request().PrevLogEntry != 1 {
		t.Fatalf("second future: %v", err)
	}
}

// TestCloseLeaksNothing: after Close, none of the transports' goroutines
// (accept loops, connection handlers, pipeline readers) is left.
func TestCloseLeaksNothing(t *testing.T) {
	before := runtime.NumGoroutine()
	server, client := newNode(t, nil), newNode(t, nil)
	stop := make(chan struct{})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		for {
			select {
			case rpc := <-server.Consumer():
				if rpc.Reader != nil {
					io.Copy(io.Discard, rpc.Reader)
				}
				rpc.Respond(responseFor(kindOf(rpc.Command)), nil)
			case <-stop:
				return
			}
		}
	}()
	p, err := client.AppendEntriesPipeline("s", server.LocalAddr())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.AppendEntries(&raft.AppendEntriesRequest{Term: 1}, new(raft.AppendEntriesResponse)); err != nil {
		t.Fatal(err)
	}
	if err := (<-p.Consumer()).Error(); err != nil {
		t.Fatal(err)
	}
	for _, req := range []any{&raft.RequestVoteRequest{}, &raft.InstallSnapshotRequest{Size: 100}, &raft.TimeoutNowRequest{}} {
		if _, err := call(client.Transport, server.LocalAddr(), req); err != nil {
			t.Fatal(err)
		}
	}
	client.Close() // closes the pipeline too
	server.Close()
	close(stop)
	<-stopped
	// Close has waited for them; they may still be returning (after
	// their WaitGroup Done), hence the poll.
	waitFor(t, "the transports' goroutines to end", func() bool { return runtime.NumGoroutine() <= before })
}

func kindOf(cmd any) uint8 {
	switch cmd.(type) {
	case *raft.AppendEntriesRequest:
		return kindAppendEntries
	case *raft.RequestVoteRequest:
		return kindRequestVote
	case *raft.InstallSnapshotRequest:
		return kindInstallSnap
	case *raft.TimeoutNowRequest:
		return kindTimeoutNow
	case *raft.RequestPreVoteRequest:
		return kindRequestPreVote
	}
	return 0
}
