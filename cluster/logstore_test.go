package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"

	"github.com/robib/robib/fsm"
	"github.com/robib/robib/volume"
)

func TestLogStoresKeepLogsAndStableKeys(t *testing.T) {
	for _, kind := range []string{LogStoreBoltDB, LogStoreWAL} {
		t.Run(kind, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "raft")
			logs, stable, c, err := openLogStore(kind, dir, hclog.NewNullLogger())
			if err != nil {
				t.Fatal(err)
			}
			var batch []*raft.Log
			for i := uint64(1); i <= 100; i++ {
				batch = append(batch, &raft.Log{Index: i, Term: 1 + i/50, Type: raft.LogCommand, Data: bytes.Repeat([]byte{byte(i)}, int(i)*100)})
			}
			if err := logs.StoreLogs(batch[:60]); err != nil {
				t.Fatal(err)
			}
			for _, l := range batch[60:] {
				if err := logs.StoreLog(l); err != nil {
					t.Fatal(err)
				}
			}
			if err := stable.Set([]byte("k"), []byte("v")); err != nil {
				t.Fatal(err)
			}
			if err := stable.SetUint64([]byte("CurrentTerm"), 7); err != nil {
				t.Fatal(err)
			}
			// Compaction drops a prefix.
			if err := logs.DeleteRange(1, 10); err != nil {
				t.Fatal(err)
			}
			if err := c.Close(); err != nil {
				t.Fatal(err)
			}
			if b, err := os.ReadFile(filepath.Join(dir, logStoreMarker)); err != nil || strings.TrimSpace(string(b)) != kind {
				t.Fatalf("marker = %q, %v", b, err)
			}

			logs, stable, c, err = openLogStore(kind, dir, hclog.NewNullLogger())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			first, _ := logs.FirstIndex()
			last, _ := logs.LastIndex()
			if first != 11 || last != 100 {
				t.Fatalf("after reopen: indexes %d..%d, want 11..100", first, last)
			}
			for i := uint64(11); i <= 100; i++ {
				var l raft.Log
				if err := logs.GetLog(i, &l); err != nil {
					t.Fatalf("GetLog(%d): %v", i, err)
				}
				if want := batch[i-1]; l.Index != i || l.Term != want.Term || !bytes.Equal(l.Data, want.Data) {
					t.Fatalf("log %d: index %d term %d, %d bytes", i, l.Index, l.Term, len(l.Data))
				}
			}
			var l raft.Log
			if err := logs.GetLog(5, &l); !errors.Is(err, raft.ErrLogNotFound) {
				t.Fatalf("GetLog of a deleted entry = %v", err)
			}
			if v, err := stable.Get([]byte("k")); err != nil || string(v) != "v" {
				t.Fatalf("Get = %q, %v", v, err)
			}
			if v, err := stable.GetUint64([]byte("CurrentTerm")); err != nil || v != 7 {
				t.Fatalf("GetUint64 = %d, %v", v, err)
			}

			// A second opener of the same directory fails at once.
			if _, _, c2, err := openLogStore(kind, dir, hclog.NewNullLogger()); err == nil {
				c2.Close()
				t.Fatal("a second open of a store in use succeeded")
			} else if !strings.Contains(err.Error(), "in use") {
				t.Fatalf("second open: %v", err)
			}
		})
	}
}

func TestLogStoreKindIsFixedPerDirectory(t *testing.T) {
	for _, tc := range []struct{ created, asked string }{{LogStoreBoltDB, LogStoreWAL}, {LogStoreWAL, LogStoreBoltDB}} {
		dir := filepath.Join(t.TempDir(), "raft")
		_, _, c, err := openLogStore(tc.created, dir, hclog.NewNullLogger())
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		_, _, _, err = openLogStore(tc.asked, dir, hclog.NewNullLogger())
		if !errors.Is(err, ErrLogStoreMismatch) {
			t.Fatalf("created %s, opened as %s: %v", tc.created, tc.asked, err)
		}
		if !strings.Contains(err.Error(), "--raft-log-store="+tc.created) {
			t.Fatalf("error does not say what to do: %v", err)
		}
		// The marker still names the original kind, and it still opens.
		_, _, c, err = openLogStore(tc.created, dir, hclog.NewNullLogger())
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	// The default is the DCD log (and raft-boltdb for the term and vote).
	dir := filepath.Join(t.TempDir(), "raft")
	_, _, c, err := openLogStore("", dir, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	for _, f := range []string{"dcdlog", "stable.db"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Fatalf("default store: %v", err)
		}
	}
	if _, _, _, err := openLogStore("rocksdb", dir, hclog.NewNullLogger()); !errors.Is(err, ErrInvalidRequest) {
		t.Fatalf("unknown kind: %v", err)
	}
}

// TestLogStoreMarkerlessBoltDir: a data directory from before the marker
// holds raft.db and no marker; it is a boltdb directory.
func TestLogStoreMarkerlessBoltDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "raft")
	_, _, c, err := openLogStore(LogStoreBoltDB, dir, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if err := os.Remove(filepath.Join(dir, logStoreMarker)); err != nil {
		t.Fatal(err)
	}
	if _, _, _, err := openLogStore(LogStoreWAL, dir, hclog.NewNullLogger()); !errors.Is(err, ErrLogStoreMismatch) {
		t.Fatalf("markerless raft.db opened as wal: %v", err)
	}
	logs, _, c, err := openLogStore(LogStoreBoltDB, dir, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := logs.LastIndex(); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, logStoreMarker)); strings.TrimSpace(string(b)) != LogStoreBoltDB {
		t.Fatalf("marker not recorded: %q", b)
	}
}

// TestSiteRestartsOnEachLogStore runs a one-site cluster on each store:
// commands commit, the log is compacted by snapshots, and a restart finds
// the state and log again.
func TestSiteRestartsOnEachLogStore(t *testing.T) {
	for _, kind := range []string{LogStoreBoltDB, LogStoreWAL} {
		t.Run(kind, func(t *testing.T) {
			dir := t.TempDir()
			open := func() (*Node, func()) {
				t.Helper()
				store, err := volume.Open(filepath.Join(dir, "volumes"), slog.New(slog.DiscardHandler))
				if err != nil {
					t.Fatal(err)
				}
				f, err := fsm.New(store, filepath.Join(dir, "fsm"), fsm.Options{Logger: slog.New(slog.DiscardHandler)})
				if err != nil {
					t.Fatal(err)
				}
				ln, err := net.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					t.Fatal(err)
				}
				n, err := Open(Config{
					Name:              "s1",
					DataDir:           dir,
					LogStore:          kind,
					RaftAddr:          ln.Addr().String(),
					GossipAddr:        freeAddr(t),
					APIAddr:           "127.0.0.1:1",
					SnapshotThreshold: 16,
					SnapshotInterval:  50 * time.Millisecond,
					TrailingLogs:      8,
					RaftListener:      ln,
					Dial: func(ctx context.Context, addr string) (net.Conn, error) {
						var d net.Dialer
						return d.DialContext(ctx, "tcp", addr)
					},
					Logger: slog.New(slog.DiscardHandler),
				}, f)
				if err != nil {
					t.Fatal(err)
				}
				return n, func() {
					if err := n.Close(); err != nil {
						t.Error(err)
					}
					f.Close()
					store.Close()
				}
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()

			n, closeNode := open()
			if _, err := n.WaitForLeader(ctx); err != nil {
				t.Fatal(err)
			}
			for i := range 60 {
				cmd := &fsm.CreateVolume{Name: fmt.Sprintf("v%d", i), Size: 1 << 20, BlockSize: 4096, Created: 1}
				if _, err := n.ApplyAndWait(ctx, cmd); err != nil {
					t.Fatal(err)
				}
			}
			deadline := time.Now().Add(10 * time.Second)
			for n.LocalStatus().LastSnapshotIndex == 0 {
				if time.Now().After(deadline) {
					t.Fatal("no snapshot taken")
				}
				time.Sleep(20 * time.Millisecond)
			}
			before := n.LocalStatus()
			closeNode()

			n, closeNode = open()
			defer closeNode()
			if _, err := n.WaitForLeader(ctx); err != nil {
				t.Fatal(err)
			}
			if _, err := n.ApplyAndWait(ctx, &fsm.DeleteVolume{Name: "v0"}); err != nil {
				t.Fatal(err)
			}
			after := n.LocalStatus()
			if after.LastLogIndex <= before.LastLogIndex || after.Term <= before.Term {
				t.Fatalf("log or term went back: before %+v, after %+v", before, after)
			}
			if got := len(n.FSM().Store().List()); got != 59 {
				t.Fatalf("%d volumes after restart, want 59", got)
			}
		})
	}
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}
