package cluster

import (
	"fmt"
	"path/filepath"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
)

// BenchmarkLogStoreAppend times durable appends (StoreLogs) of one entry,
// the way Raft's leader stores a new entry before it replicates it, and a
// follower before it answers: the floor of a replicated commit is two of
// these in a row (see docs/performance.md). The x8 cases store 8 entries
// per call, as Raft does when entries queue up under load: the most one
// store can take in (MB/s). Every 128 entries the log is
// compacted down to the newest 256, as snapshots do, so the store reuses
// freed space as it does in a running agent. The directory is on the
// file system of the test's temp dir (the disk, on this machine).
func BenchmarkLogStoreAppend(b *testing.B) {
	for _, kind := range []string{LogStoreBoltDB, LogStoreWAL} {
		for _, c := range []struct{ size, per int }{{4 << 10, 1}, {512 << 10, 1}, {512 << 10, 8}} {
			size, per := c.size, c.per
			b.Run(fmt.Sprintf("%s/%dKiBx%d", kind, size>>10, per), func(b *testing.B) {
				logs, _, c, err := openLogStore(kind, filepath.Join(b.TempDir(), "raft"), hclog.NewNullLogger())
				if err != nil {
					b.Fatal(err)
				}
				defer c.Close()
				data := make([]byte, size)
				for i := range data {
					data[i] = byte(i * 7)
				}
				const keep, every = 256, 128
				first := uint64(1)
				batch := make([]*raft.Log, per)
				for j := range batch {
					batch[j] = &raft.Log{Term: 1, Type: raft.LogCommand, Data: data}
				}
				b.SetBytes(int64(size * per))
				b.ResetTimer()
				idx := uint64(0)
				for i := 0; i < b.N; i++ {
					for _, l := range batch {
						idx++
						l.Index = idx
					}
					if err := logs.StoreLogs(batch); err != nil {
						b.Fatal(err)
					}
					if idx/every != (idx-uint64(per))/every && idx > keep {
						if err := logs.DeleteRange(first, idx-keep); err != nil {
							b.Fatal(err)
						}
						first = idx - keep + 1
					}
				}
			})
		}
	}
}
