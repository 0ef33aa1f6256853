package dcd

import (
	"context"
	"math/rand/v2"
	"sync/atomic"
	"testing"

	"github.com/robib/robib/fsm"
)

// nullCommitter commits instantly and applies nothing: the benchmarks
// measure dcd itself.
type nullCommitter struct{ index atomic.Uint64 }

func (c *nullCommitter) Commit(ctx context.Context, b *fsm.WriteBatch) (uint64, error) {
	return c.index.Add(1), nil
}

func (c *nullCommitter) WaitApplied(ctx context.Context, index uint64) error { return nil }

// zeroLocal is a volume of zeros.
type zeroLocal struct{ size int64 }

func (z zeroLocal) ReadAt(p []byte, off int64) (int, error) { clear(p); return len(p), nil }
func (z zeroLocal) Size() int64                             { return z.size }

const benchSize = 1 << 30

func newBenchVolume(b *testing.B, cfg Config) *Volume {
	v, err := New("bench", zeroLocal{benchSize}, &nullCommitter{}, cfg)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { v.Close() })
	return v
}

func reportBatches(b *testing.B, v *Volume) {
	s := v.Stats()
	if s.Batches > 0 {
		b.ReportMetric(float64(s.Ops)/float64(s.Batches), "ops/batch")
		b.ReportMetric(float64(s.Accepted)/float64(s.Batches), "writes/batch")
	}
}

// BenchmarkWrite4K: parallel 4 KiB writes at random block offsets
// (little coalescing), ending with a Flush.
func BenchmarkWrite4K(b *testing.B) {
	v := newBenchVolume(b, Config{})
	var seed atomic.Uint64
	b.SetBytes(4096)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		rng := rand.New(rand.NewPCG(seed.Add(1), 0))
		p := make([]byte, 4096)
		for pb.Next() {
			if _, err := v.WriteAt(p, rng.Int64N(benchSize/4096)*4096); err != nil {
				b.Error(err)
				return
			}
		}
	})
	if err := v.Flush(); err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	reportBatches(b, v)
}

// BenchmarkWrite4KSequential: parallel streams of adjacent 4 KiB writes
// (coalesced into large ops).
func BenchmarkWrite4KSequential(b *testing.B) {
	v := newBenchVolume(b, Config{})
	var stream atomic.Int64
	b.SetBytes(4096)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		base := (stream.Add(1) % 16) * (benchSize / 16)
		p := make([]byte, 4096)
		for off := int64(0); pb.Next(); off = (off + 4096) % (benchSize / 16) {
			if _, err := v.WriteAt(p, base+off); err != nil {
				b.Error(err)
				return
			}
		}
	})
	if err := v.Flush(); err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	reportBatches(b, v)
}

// BenchmarkWriteFlush4K: parallel write+flush pairs (every write waits for
// its commit; concurrent flushers share batches) with a zero-latency
// committer.
func BenchmarkWriteFlush4K(b *testing.B) {
	v := newBenchVolume(b, Config{})
	var seed atomic.Uint64
	b.SetBytes(4096)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		rng := rand.New(rand.NewPCG(seed.Add(1), 0))
		p := make([]byte, 4096)
		for pb.Next() {
			if _, err := v.WriteAt(p, rng.Int64N(benchSize/4096)*4096); err != nil {
				b.Error(err)
				return
			}
			if err := v.Flush(); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.StopTimer()
	reportBatches(b, v)
}

// BenchmarkReadAt4K: parallel 4 KiB reads over a buffer holding 4096
// uncommitted 4 KiB writes (commits held), half of the reads hitting them.
func BenchmarkReadAt4K(b *testing.B) {
	c := &heldCommitter{release: make(chan struct{})}
	v, err := New("bench", zeroLocal{benchSize}, c, Config{})
	if err != nil {
		b.Fatal(err)
	}
	p := make([]byte, 4096)
	for i := range int64(4096) {
		if _, err := v.WriteAt(p, i*8192); err != nil {
			b.Fatal(err)
		}
	}
	var seed atomic.Uint64
	b.SetBytes(4096)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		rng := rand.New(rand.NewPCG(seed.Add(1), 0))
		p := make([]byte, 4096)
		for pb.Next() {
			if _, err := v.ReadAt(p, rng.Int64N(8192)*4096); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.StopTimer()
	close(c.release)
	v.Close()
}

// heldCommitter blocks every Commit until release is closed.
type heldCommitter struct {
	nullCommitter
	release chan struct{}
}

func (c *heldCommitter) Commit(ctx context.Context, b *fsm.WriteBatch) (uint64, error) {
	<-c.release
	return c.nullCommitter.Commit(ctx, b)
}
