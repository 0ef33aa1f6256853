package wire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

// memFSM keeps every applied entry's data, in order (followers' copies
// alias the frames they arrived in, which therefore must never be reused).
type memFSM struct {
	mu       sync.Mutex
	entries  [][]byte
	restores int
}

func (f *memFSM) Apply(l *raft.Log) any {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.entries = append(f.entries, l.Data)
	return len(f.entries)
}

func (f *memFSM) Snapshot() (raft.FSMSnapshot, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return memSnapshot(f.entries[:len(f.entries):len(f.entries)]), nil
}

func (f *memFSM) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	var entries [][]byte
	var n [4]byte
	for {
		if _, err := io.ReadFull(rc, n[:]); err == io.EOF {
			break
		} else if err != nil {
			return err
		}
		b := make([]byte, binary.LittleEndian.Uint32(n[:]))
		if _, err := io.ReadFull(rc, b); err != nil {
			return err
		}
		entries = append(entries, b)
	}
	f.mu.Lock()
	f.entries, f.restores = entries, f.restores+1
	f.mu.Unlock()
	return nil
}

// matches reports whether the FSM applied exactly want.
func (f *memFSM) matches(want [][]byte) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.entries) != len(want) {
		return false
	}
	for i := range want {
		if !bytes.Equal(f.entries[i], want[i]) {
			return false
		}
	}
	return true
}

type memSnapshot [][]byte

func (s memSnapshot) Persist(sink raft.SnapshotSink) error {
	for _, b := range s {
		if _, err := sink.Write(binary.LittleEndian.AppendUint32(nil, uint32(len(b)))); err != nil {
			sink.Cancel()
			return err
		}
		if _, err := sink.Write(b); err != nil {
			sink.Cancel()
			return err
		}
	}
	return sink.Close()
}

func (memSnapshot) Release() {}

type raftNode struct {
	id    raft.ServerID
	addr  string
	tr    *Transport
	r     *raft.Raft
	fsm   *memFSM
	logs  *raft.InmemStore
	snaps *raft.InmemSnapshotStore
}

// startRaft runs a raft node over this transport on addr ("" for a new
// port), with the given stores (nil for new ones).
func startRaft(t *testing.T, id raft.ServerID, addr string, logs *raft.InmemStore, snaps *raft.InmemSnapshotStore, rlog io.Writer) *raftNode {
	t.Helper()
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	tr, err := New(Config{Listener: ln, Dial: tcpDial, Timeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if logs == nil {
		logs, snaps = raft.NewInmemStore(), raft.NewInmemSnapshotStore()
	}
	c := raft.DefaultConfig()
	c.LocalID = id
	// Generous for a race-instrumented run on two shared cores.
	c.HeartbeatTimeout = time.Second
	c.ElectionTimeout = time.Second
	c.LeaderLeaseTimeout = 500 * time.Millisecond
	c.CommitTimeout = 10 * time.Millisecond
	c.SnapshotThreshold = 4
	c.TrailingLogs = 2
	c.SnapshotInterval = time.Hour // snapshots are taken by the test
	c.LogOutput = rlog
	c.LogLevel = "INFO"
	n := &raftNode{id: id, addr: ln.Addr().String(), tr: tr, fsm: &memFSM{}, logs: logs, snaps: snaps}
	n.r, err = raft.NewRaft(c, n.fsm, logs, logs, snaps, tr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.r.Shutdown().Error() })
	return n
}

func leaderOf(t *testing.T, nodes []*raftNode, not *raftNode) *raftNode {
	t.Helper()
	var leader *raftNode
	waitFor(t, "a leader", func() bool {
		for _, n := range nodes {
			if n != not && n.r.State() == raft.Leader {
				leader = n
				return true
			}
		}
		return false
	})
	return leader
}

// TestRaftCluster runs three hashicorp/raft nodes over this transport:
// election, 512 KiB entries, the leader killed and a new one elected, a
// snapshot installed on the old leader when it comes back lagging, and
// every FSM with the same entries.
func TestRaftCluster(t *testing.T) {
	rlog := &logBuf{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("raft log:\n%s", rlog)
		}
	})
	nodes := make([]*raftNode, 3)
	var servers []raft.Server
	for i := range nodes {
		nodes[i] = startRaft(t, raft.ServerID(fmt.Sprint("site-", i)), "", nil, nil, rlog)
		servers = append(servers, raft.Server{ID: nodes[i].id, Address: raft.ServerAddress(nodes[i].addr)})
	}
	if err := nodes[0].r.BootstrapCluster(raft.Configuration{Servers: servers}).Error(); err != nil {
		t.Fatal(err)
	}
	var want [][]byte
	// apply commits n new entries through whichever node leads (raft
	// refuses with ErrNotLeader before appending anything, so that retry
	// cannot duplicate an entry).
	apply := func(nodes []*raftNode, not *raftNode, n int) {
		t.Helper()
		for range n {
			data := randomBytes(512 << 10)
			for {
				err := leaderOf(t, nodes, not).r.Apply(data, 20*time.Second).Error()
				if errors.Is(err, raft.ErrNotLeader) {
					continue
				}
				if err != nil {
					t.Fatal(err)
				}
				break
			}
			want = append(want, data)
		}
	}
	converged := func(nodes []*raftNode) {
		t.Helper()
		for _, n := range nodes {
			waitFor(t, fmt.Sprintf("%s to apply %d entries", n.id, len(want)), func() bool { return n.fsm.matches(want) })
		}
	}

	apply(nodes, nil, 6)
	converged(nodes)

	// Kill the leader; the other two elect one of themselves and go on.
	old := leaderOf(t, nodes, nil)
	if err := old.r.Shutdown().Error(); err != nil {
		t.Fatal(err)
	}
	apply(nodes, old, 8)
	var rest []*raftNode
	for _, n := range nodes {
		if n != old {
			rest = append(rest, n)
		}
	}
	converged(rest)
	// Both compact their logs, so whichever leads must send a snapshot.
	for _, n := range rest {
		if err := n.r.Snapshot().Error(); err != nil {
			t.Fatal(err)
		}
		if first, _ := n.logs.FirstIndex(); first <= 7 {
			t.Fatalf("%s's log still starts at %d: no snapshot needed", n.id, first)
		}
	}
	if list, err := old.snaps.List(); err != nil || len(list) != 0 {
		t.Fatalf("the old leader has snapshots of its own (%d, %v): a restore would not prove InstallSnapshot", len(list), err)
	}
	// The old leader comes back on its address with its stores: its log
	// ends before the leader's begins, so it gets the snapshot.
	back := startRaft(t, old.id, old.addr, old.logs, old.snaps, rlog)
	for i, n := range nodes {
		if n == old {
			nodes[i] = back
		}
	}
	apply(nodes, nil, 2)
	converged(nodes)
	back.fsm.mu.Lock()
	restores := back.fsm.restores
	back.fsm.mu.Unlock()
	if restores == 0 {
		t.Fatal("the lagging node caught up without a snapshot")
	}
}
