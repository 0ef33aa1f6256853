package volume

import (
	"bytes"
	"encoding/binary"
	"errors"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

const (
	KiB = 1 << 10
	MiB = 1 << 20
)

// testLogger logs to the test's output (shown with -v or on failure);
// benchmarks do not log.
func testLogger(t testing.TB) *slog.Logger {
	if _, ok := t.(*testing.B); ok {
		return slog.New(slog.DiscardHandler)
	}
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// openStore opens dir and closes the store when the test ends.
func openStore(t testing.TB, dir string) *Store {
	t.Helper()
	s, err := Open(dir, testLogger(t))
	if err != nil {
		t.Fatalf("Open(%s): %v", dir, err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// newStore opens a store in a fresh temporary directory.
func newStore(t testing.TB) *Store {
	t.Helper()
	return openStore(t, t.TempDir())
}

var testCreated = time.Date(2024, 5, 6, 7, 8, 9, 123456789, time.UTC)

func mustCreate(t testing.TB, s *Store, name string, size int64) *Volume {
	t.Helper()
	v, err := s.Create(Meta{Name: name, Size: size, Created: testCreated})
	if err != nil {
		t.Fatalf("Create(%q, %d): %v", name, size, err)
	}
	return v
}

func randBytes(r *rand.Rand, n int) []byte {
	b := make([]byte, n+8)
	for i := 0; i < n; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], r.Uint64())
	}
	return b[:n:n]
}

func mustWrite(t testing.TB, v *Volume, p []byte, off int64) {
	t.Helper()
	n, err := v.WriteAt(p, off)
	if err != nil || n != len(p) {
		t.Fatalf("WriteAt(len %d, off %d) = %d, %v", len(p), off, n, err)
	}
}

func mustRead(t testing.TB, v *Volume, off int64, n int) []byte {
	t.Helper()
	p := make([]byte, n)
	for i := range p {
		p[i] = 0xAA // make sure holes are really filled in
	}
	got, err := v.ReadAt(p, off)
	if err != nil || got != n {
		t.Fatalf("ReadAt(len %d, off %d) = %d, %v", n, off, got, err)
	}
	return p
}

func isZero(b []byte) bool { return !slices.ContainsFunc(b, func(c byte) bool { return c != 0 }) }

func wantZeros(t testing.TB, v *Volume, off int64, n int) {
	t.Helper()
	if b := mustRead(t, v, off, n); !isZero(b) {
		i := slices.IndexFunc(b, func(c byte) bool { return c != 0 })
		t.Fatalf("[%d, +%d) not zero: byte %d is %#x", off, n, off+int64(i), b[i])
	}
}

func wantErr(t testing.TB, what string, err, target error) {
	t.Helper()
	if !errors.Is(err, target) {
		t.Fatalf("%s: got error %v, want %v", what, err, target)
	}
}

// checkExtents asserts that exts is well formed and covers [off, end)
// exactly: sorted, contiguous, non-empty, neighbours of different kinds.
func checkExtents(t testing.TB, exts []Extent, off, end int64) {
	t.Helper()
	pos := off
	for i, e := range exts {
		if e.Offset != pos || e.Length <= 0 {
			t.Fatalf("extent %d %+v: want offset %d and positive length; all: %+v", i, e, pos, exts)
		}
		if i > 0 && exts[i-1].Hole == e.Hole {
			t.Fatalf("extents %d and %d are both hole=%v: %+v", i-1, i, e.Hole, exts)
		}
		pos += e.Length
	}
	if pos != end {
		t.Fatalf("extents end at %d, want %d: %+v", pos, end, exts)
	}
}

// holeAt reports whether byte off lies in a hole extent.
func holeAt(exts []Extent, off int64) bool {
	for _, e := range exts {
		if e.Offset <= off && off < e.Offset+e.Length {
			return e.Hole
		}
	}
	return false
}

// snapshotFiles returns the contents of every regular file under dir.
func snapshotFiles(t testing.TB, dir string) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	err := filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(path)
		out[path] = b
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func equalSnapshots(a, b map[string][]byte) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || !bytes.Equal(v, w) {
			return false
		}
	}
	return true
}

// volumeEntries lists the names in <store>/volumes.
func volumeEntries(t testing.TB, s *Store) []string {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(s.Dir(), volumesDirName))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}
