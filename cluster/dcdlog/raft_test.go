package dcdlog

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"io"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
)

// digestFSM folds every applied command into a digest, so replicas that
// applied the same commands in the same order agree.
type digestFSM struct {
	mu     sync.Mutex
	n      uint64
	digest uint32
}

func (f *digestFSM) Apply(l *raft.Log) any {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.n++
	f.digest = crc32.Update(f.digest, castagnoli, l.Data)
	return nil
}

func (f *digestFSM) state() (uint64, uint32) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.n, f.digest
}

func (f *digestFSM) Snapshot() (raft.FSMSnapshot, error) {
	n, d := f.state()
	return digestSnap{n, d}, nil
}

func (f *digestFSM) Restore(r io.ReadCloser) error {
	defer r.Close()
	var b [12]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.n, f.digest = binary.LittleEndian.Uint64(b[:]), binary.LittleEndian.Uint32(b[8:])
	return nil
}

type digestSnap struct {
	n uint64
	d uint32
}

func (s digestSnap) Persist(sink raft.SnapshotSink) error {
	var b [12]byte
	binary.LittleEndian.PutUint64(b[:], s.n)
	binary.LittleEndian.PutUint32(b[8:], s.d)
	if _, err := sink.Write(b[:]); err != nil {
		sink.Cancel()
		return err
	}
	return sink.Close()
}

func (digestSnap) Release() {}

type raftNode struct {
	id     raft.ServerID
	dir    string
	stable *raft.InmemStore // term and vote; kept across restarts
	snaps  *raft.InmemSnapshotStore
	trans  *raft.InmemTransport
	fsm    *digestFSM
	logs   *Store
	r      *raft.Raft
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Three raft nodes on DCD logs replicate, compact (snapshots every 64
// entries, 32 kept), restart on the same directories and go on; every
// node ends with the same digest of all commands.
func TestRaftOnDCDLog(t *testing.T) {
	nodes := make([]*raftNode, 3)
	var servers []raft.Server
	for i := range nodes {
		n := &raftNode{id: raft.ServerID(fmt.Sprintf("n%d", i)), dir: filepath.Join(t.TempDir(), "log"),
			stable: raft.NewInmemStore(), snaps: raft.NewInmemSnapshotStore()}
		nodes[i] = n
		servers = append(servers, raft.Server{ID: n.id, Address: raft.ServerAddress(n.id)})
	}
	start := func() {
		for _, n := range nodes {
			_, n.trans = raft.NewInmemTransport(raft.ServerAddress(n.id))
		}
		for _, a := range nodes {
			for _, b := range nodes {
				if a != b {
					a.trans.Connect(raft.ServerAddress(b.id), b.trans)
				}
			}
		}
		for _, n := range nodes {
			conf := raft.DefaultConfig()
			conf.LocalID = n.id
			conf.Logger = hclog.NewNullLogger()
			// Generous: under -race on a loaded machine, 100 ms lost
			// leadership now and then.
			conf.HeartbeatTimeout = 500 * time.Millisecond
			conf.ElectionTimeout = 500 * time.Millisecond
			conf.LeaderLeaseTimeout = 250 * time.Millisecond
			conf.CommitTimeout = 5 * time.Millisecond
			conf.SnapshotThreshold = 64
			conf.SnapshotInterval = 50 * time.Millisecond
			conf.TrailingLogs = 32
			var err error
			if n.logs, err = Open(n.dir, Options{SegmentSize: 64 << 10}); err != nil {
				t.Fatal(err)
			}
			n.fsm = &digestFSM{}
			if n.r, err = raft.NewRaft(conf, n.fsm, n.logs, n.stable, n.snaps, n.trans); err != nil {
				t.Fatal(err)
			}
		}
	}
	stop := func() {
		for _, n := range nodes {
			if err := n.r.Shutdown().Error(); err != nil {
				t.Fatal(err)
			}
			if err := n.logs.Close(); err != nil {
				t.Fatal(err)
			}
		}
	}
	leader := func() *raftNode {
		var l *raftNode
		waitFor(t, "a leader", func() bool {
			for _, n := range nodes {
				if n.r.State() == raft.Leader {
					l = n
					return true
				}
			}
			return false
		})
		return l
	}
	apply := func(from, to int) {
		l := leader()
		for i := from; i < to; i++ {
			data := make([]byte, 1000+i%3000)
			for k := range data {
				data[k] = byte(i + k)
			}
			if err := l.r.Apply(data, 5*time.Second).Error(); err != nil {
				t.Fatalf("apply %d: %v", i, err)
			}
		}
	}
	converged := func(total uint64) {
		waitFor(t, fmt.Sprintf("all nodes to apply %d commands", total), func() bool {
			n0, d0 := nodes[0].fsm.state()
			for _, n := range nodes[1:] {
				if c, d := n.fsm.state(); c != n0 || d != d0 {
					return false
				}
			}
			return n0 == total
		})
	}

	start()
	cfg := raft.Configuration{Servers: servers}
	if err := nodes[0].r.BootstrapCluster(cfg).Error(); err != nil {
		t.Fatal(err)
	}
	apply(0, 300)
	converged(300)
	waitFor(t, "log compaction on every node", func() bool {
		for _, n := range nodes {
			if f, _ := n.logs.FirstIndex(); f <= 1 {
				return false
			}
		}
		return true
	})
	stop()

	start() // the FSMs restart empty: snapshots and logs bring them back
	apply(300, 400)
	converged(400)
	stop()
}
