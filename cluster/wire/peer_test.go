//lint:file-ignore SA1019 raft v1.7.3 still fills and reads the deprecated Leader and Candidate fields, so the frame format carries them

package wire

import (
	"bytes"
	"errors"
	"net"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/hashicorp/raft"
)

// TestPeerNameBindsRequests: on a connection whose peer PeerName knows,
// every request kind naming another server ID (or none) in its header is
// refused with a reject frame and never reaches raft or the heartbeat
// handler; the same requests naming the peer are served. The refusal is
// logged once per (peer, claimed ID), and PeerName is asked once per
// connection.
func TestPeerNameBindsRequests(t *testing.T) {
	var asked atomic.Int64
	server := newNode(t, func(c *Config) {
		c.PeerName = func(nc net.Conn) (string, bool) {
			asked.Add(1)
			if nc == nil {
				t.Error("PeerName got no connection")
			}
			return "site-b", true
		}
	})
	reached := make(chan any, 100)
	serve(t, server, func(rpc raft.RPC) (any, error) {
		if rpc.Reader != nil {
			var buf bytes.Buffer
			if _, err := buf.ReadFrom(rpc.Reader); err != nil {
				return nil, err
			}
		}
		reached <- rpc.Command
		switch rpc.Command.(type) {
		case *raft.AppendEntriesRequest:
			return &raft.AppendEntriesResponse{Term: 3, Success: true}, nil
		case *raft.RequestVoteRequest:
			return &raft.RequestVoteResponse{Term: 3, Granted: true}, nil
		case *raft.RequestPreVoteRequest:
			return &raft.RequestPreVoteResponse{Term: 3, Granted: true}, nil
		case *raft.InstallSnapshotRequest:
			return &raft.InstallSnapshotResponse{Term: 3, Success: true}, nil
		case *raft.TimeoutNowRequest:
			return &raft.TimeoutNowResponse{}, nil
		}
		return nil, errors.New("unexpected")
	})
	beats := make(chan any, 100)
	server.SetHeartbeatHandler(func(rpc raft.RPC) {
		beats <- rpc.Command
		rpc.Respond(&raft.AppendEntriesResponse{Term: 3, Success: true}, nil)
	})
	requests := func(id string) []any {
		h := hdr(id, "127.0.0.1:9")
		return []any{
			&raft.AppendEntriesRequest{RPCHeader: h, Term: 3, Leader: []byte("127.0.0.1:9"), LeaderCommitIndex: 1,
				Entries: []*raft.Log{{Index: 1, Term: 3, Type: raft.LogCommand, Data: []byte("x")}}},
			&raft.AppendEntriesRequest{RPCHeader: h, Term: 3, Leader: []byte("127.0.0.1:9")}, // a heartbeat
			&raft.RequestVoteRequest{RPCHeader: h, Term: 3, Candidate: []byte("127.0.0.1:9")},
			&raft.RequestPreVoteRequest{RPCHeader: h, Term: 3},
			&raft.InstallSnapshotRequest{RPCHeader: h, Term: 3, Leader: []byte("127.0.0.1:9"), Size: 3 << 20},
			&raft.TimeoutNowRequest{RPCHeader: h},
		}
	}
	client := newNode(t, nil)
	for _, claimed := range []string{"site-a", "", "site-b2"} {
		for _, req := range requests(claimed) {
			_, err := call(client.Transport, server.LocalAddr(), req)
			if req, ok := req.(*raft.InstallSnapshotRequest); ok {
				// The snapshot stream may be cut before the reject
				// frame is read: refused either way.
				if err == nil {
					t.Fatalf("a snapshot naming %q from site-b was accepted", claimed)
				}
				_ = req
				continue
			}
			if !errors.Is(err, ErrRejected) || !strings.Contains(err.Error(), "another server") {
				t.Fatalf("%T naming %q from site-b: %v, want a rejection", req, claimed, err)
			}
		}
	}
	if len(reached) != 0 || len(beats) != 0 {
		t.Fatalf("a refused request reached raft (%d) or the heartbeat handler (%d)", len(reached), len(beats))
	}
	if got := server.peerRefusals.Load(); got != 18 {
		t.Fatalf("%d refusals counted, want 18", got)
	}
	for _, claimed := range []string{`names=site-a`, `names=""`, `names=site-b2`} {
		if n := strings.Count(server.logs.String(), claimed); n != 1 {
			t.Errorf("refusals of %s logged %d times, want once:\n%s", claimed, n, server.logs)
		}
	}
	refusedConns := asked.Load()
	if refusedConns != 18 {
		t.Fatalf("PeerName asked %d times for 18 refused connections", refusedConns)
	}

	// The same requests naming the peer pass, pooled connections asking
	// PeerName once each.
	for _, req := range requests("site-b") {
		if _, err := call(client.Transport, server.LocalAddr(), req); err != nil {
			t.Fatalf("%T naming the peer: %v", req, err)
		}
	}
	for _, req := range requests("site-b") {
		var got any
		if r, ok := req.(*raft.AppendEntriesRequest); ok && len(r.Entries) == 0 {
			got = <-beats
		} else {
			got = <-reached
		}
		if !reflect.DeepEqual(got, req) {
			t.Fatalf("delivered %#v, want %#v", got, req)
		}
	}
	// One pooled connection for the five round trips, one for the snapshot.
	if n := asked.Load() - refusedConns; n != 2 {
		t.Fatalf("PeerName asked %d times for 2 connections", n)
	}
}

// TestPeerNameUnknown: a PeerName that does not know the peer (ok=false)
// checks nothing, and neither does a transport without PeerName.
func TestPeerNameUnknown(t *testing.T) {
	for name, mod := range map[string]func(*Config){
		"unknown": func(c *Config) { c.PeerName = func(net.Conn) (string, bool) { return "site-b", false } },
		"none":    nil,
	} {
		t.Run(name, func(t *testing.T) {
			server, client := newNode(t, mod), newNode(t, nil)
			serve(t, server, func(rpc raft.RPC) (any, error) { return &raft.RequestVoteResponse{Granted: true}, nil })
			req := &raft.RequestVoteRequest{RPCHeader: hdr("site-a", "127.0.0.1:9"), Term: 2}
			resp, err := call(client.Transport, server.LocalAddr(), req)
			if err != nil || !resp.(*raft.RequestVoteResponse).Granted {
				t.Fatalf("%#v, %v", resp, err)
			}
			if server.peerRefusals.Load() != 0 {
				t.Fatal("a refusal was counted")
			}
		})
	}
}
