package volume

// Benchmarks of the checksummed I/O paths against the raw pread/pwrite of
// a plain file in the same directory, in the same run. QD32 is 32
// goroutines (b.SetParallelism) issuing 4 KiB I/O at random aligned
// offsets; QD1 is one. The data stays in the page cache, so these measure
// the CPU and syscall overhead of the checksums, the worst case: through
// the replicated stack a write also costs a raft round trip and fsyncs.
//
//	go test -run x -bench 'Write4K|Read4K|Write1M' -benchtime 2s ./volume

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"testing"
)

const benchSize = 256 * MiB

// ioTarget is what a benchmark writes to: a volume or a plain file.
type ioTarget interface {
	WriteAt(p []byte, off int64) (int, error)
	ReadAt(p []byte, off int64) (int, error)
}

func benchTargets(b *testing.B, fill bool) map[string]ioTarget {
	s := newStore(b)
	v := mustCreate(b, s, "bench", benchSize)
	f, err := os.OpenFile(filepath.Join(b.TempDir(), "raw"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { f.Close() })
	if err := f.Truncate(benchSize); err != nil {
		b.Fatal(err)
	}
	if fill {
		buf := randBytes(rand.New(rand.NewPCG(1, 1)), 4*MiB)
		for off := int64(0); off < benchSize; off += int64(len(buf)) {
			mustWrite(b, v, buf, off)
			if _, err := f.WriteAt(buf, off); err != nil {
				b.Fatal(err)
			}
		}
	}
	return map[string]ioTarget{"raw": f, "volume": v}
}

// bench4K runs 4 KiB I/O at random aligned offsets at the given queue
// depth, reading or writing.
func bench4K(b *testing.B, write bool) {
	targets := benchTargets(b, !write)
	for _, qd := range []int{1, 32} {
		for _, name := range []string{"raw", "volume"} {
			t := targets[name]
			b.Run(name+"/qd"+itoa(qd), func(b *testing.B) {
				b.SetBytes(4096)
				var seed atomic.Uint64
				if qd > 1 {
					b.SetParallelism((qd + runtime.GOMAXPROCS(0) - 1) / runtime.GOMAXPROCS(0))
				}
				run := func(next func() bool) {
					r := rand.New(rand.NewPCG(seed.Add(1), 2))
					buf := randBytes(r, 4096)
					for next() {
						off := r.Int64N(benchSize/4096) * 4096
						var err error
						if write {
							_, err = t.WriteAt(buf, off)
						} else {
							_, err = t.ReadAt(buf, off)
						}
						if err != nil {
							b.Error(err)
							return
						}
					}
				}
				if qd == 1 {
					run(b.Loop)
				} else {
					b.RunParallel(func(pb *testing.PB) { run(pb.Next) })
				}
			})
		}
	}
}

func BenchmarkWrite4K(b *testing.B) { bench4K(b, true) }
func BenchmarkRead4K(b *testing.B)  { bench4K(b, false) }

// BenchmarkWrite1M writes 1 MiB sequentially, wrapping around.
func BenchmarkWrite1M(b *testing.B) {
	targets := benchTargets(b, false)
	buf := randBytes(rand.New(rand.NewPCG(1, 1)), MiB)
	for _, name := range []string{"raw", "volume"} {
		t := targets[name]
		b.Run(name, func(b *testing.B) {
			b.SetBytes(MiB)
			var off int64
			for b.Loop() {
				if _, err := t.WriteAt(buf, off); err != nil {
					b.Fatal(err)
				}
				off = (off + MiB) % benchSize
			}
		})
	}
}

func itoa(n int) string {
	if n < 10 {
		return string(rune('0' + n))
	}
	return itoa(n/10) + string(rune('0'+n%10))
}
