package dcdlog

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"golang.org/x/sys/unix"
)

// reportLatency reports the p50 and p99 of the per-call times.
func reportLatency(b *testing.B, ts []time.Duration) {
	if len(ts) == 0 {
		return
	}
	slices.Sort(ts)
	b.ReportMetric(float64(ts[len(ts)/2].Nanoseconds())/1e3, "p50-us")
	b.ReportMetric(float64(ts[len(ts)*99/100].Nanoseconds())/1e3, "p99-us")
}

// BenchmarkLogStoreAppend has the shape of cluster's benchmark of the same
// name (durable StoreLogs of one 4 KiB, one 512 KiB, or 8 x 512 KiB
// entries; every 128 entries the log is compacted to the newest 256), for
// the DCD log: "pwritev" is the store as built, "copy" the same store
// writing one built buffer with a single pwrite instead. Each starts from
// a new directory, so the 512 KiB runs include zeroing their first
// segments (nothing is recycled before the first compaction frees a whole
// segment); "steady" first runs 1024 entries untimed, as a store that has
// been running recycles its segments.
func BenchmarkLogStoreAppend(b *testing.B) {
	for _, mode := range []struct {
		name   string
		copy   bool
		warmup int
	}{{"pwritev", false, 0}, {"copy", true, 0}, {"pwritev-steady", false, 1024}} {
		for _, c := range []struct{ size, per int }{{4 << 10, 1}, {512 << 10, 1}, {512 << 10, 8}} {
			size, per := c.size, c.per
			if mode.warmup > 0 && size < 512<<10 {
				continue // 4 KiB entries take 16K per segment to recycle
			}
			b.Run(fmt.Sprintf("dcdlog-%s/%dKiBx%d", mode.name, size>>10, per), func(b *testing.B) {
				s, err := Open(filepath.Join(b.TempDir(), "raft"), Options{copyWrites: mode.copy})
				if err != nil {
					b.Fatal(err)
				}
				defer s.Close()
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
				idx := uint64(0)
				var ts []time.Duration
				run := func(n int) {
					for i := 0; i < n; i++ {
						for _, l := range batch {
							idx++
							l.Index = idx
						}
						t0 := time.Now()
						if err := s.StoreLogs(batch); err != nil {
							b.Fatal(err)
						}
						ts = append(ts, time.Since(t0))
						if idx/every != (idx-uint64(per))/every && idx > keep {
							if err := s.DeleteRange(first, idx-keep); err != nil {
								b.Fatal(err)
							}
							first = idx - keep + 1
						}
					}
				}
				run(mode.warmup / per)
				s0 := s.prep.statsNow()
				ts = make([]time.Duration, 0, b.N)
				b.SetBytes(int64(size * per))
				b.ResetTimer()
				run(b.N)
				b.StopTimer()
				reportLatency(b, ts)
				st := s.prep.statsNow()
				b.ReportMetric(float64(st.zeroed-s0.zeroed), "zeroed")
				b.ReportMetric(float64(st.reused-s0.reused), "reused")
				b.ReportMetric(float64(st.grown-s0.grown), "grown")
				b.ReportMetric(float64((st.waited - s0.waited).Milliseconds()), "spare-wait-ms")
				b.ReportMetric(float64(ts[len(ts)-1].Microseconds()), "max-us")
			})
		}
	}
}

// prezeroed creates a file of size bytes written with zeros and synced.
func prezeroed(b *testing.B, size int64, flags int) *os.File {
	path := filepath.Join(b.TempDir(), "floor")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		if _, err := f.WriteAt(buf, off); err != nil {
			b.Fatal(err)
		}
	}
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		b.Fatal(err)
	}
	if flags != 0 {
		f.Close()
		if f, err = os.OpenFile(path, os.O_RDWR|flags, 0); err != nil {
			b.Fatal(err)
		}
	}
	return f
}

// BenchmarkRawFloor is what the disk gives without any store: a 4 KiB
// pwrite + fdatasync over blocks already written (the 4 KiB append's
// floor), and sequential 4 MiB writes + fdatasync, buffered (the shape of
// an 8 x 512 KiB StoreLogs) and O_DIRECT (the disk's bandwidth).
func BenchmarkRawFloor(b *testing.B) {
	for _, c := range []struct {
		name  string
		size  int
		flags int
	}{{"pwrite-fdatasync/4KiB", 4 << 10, 0}, {"pwrite-fdatasync/4MiB", 4 << 20, 0}, {"odirect/4MiB", 4 << 20, unix.O_DIRECT}} {
		b.Run(c.name, func(b *testing.B) {
			const fileSize = 128 << 20
			f := prezeroed(b, fileSize, c.flags)
			defer f.Close()
			buf, err := unix.Mmap(-1, 0, c.size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE) // page aligned, for O_DIRECT
			if err != nil {
				b.Fatal(err)
			}
			defer unix.Munmap(buf)
			for i := range buf {
				buf[i] = byte(i * 7)
			}
			fd := int(f.Fd())
			ts := make([]time.Duration, 0, b.N)
			b.SetBytes(int64(c.size))
			b.ResetTimer()
			off := int64(0)
			for i := 0; i < b.N; i++ {
				t0 := time.Now()
				if _, err := unix.Pwrite(fd, buf, off); err != nil {
					b.Fatal(err)
				}
				if err := unix.Fdatasync(fd); err != nil {
					b.Fatal(err)
				}
				ts = append(ts, time.Since(t0))
				if off += int64(c.size); off+int64(c.size) > fileSize {
					off = 0
				}
			}
			b.StopTimer()
			reportLatency(b, ts)
		})
	}
}
