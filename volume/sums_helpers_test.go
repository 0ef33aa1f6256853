package volume

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
)

// wantDamage asserts that ReadAt of [off, +n) fails with ErrDamaged and a
// *DamageError naming exactly want.
func wantDamage(t testing.TB, v *Volume, off int64, n int, want []Range) {
	t.Helper()
	got, err := v.ReadAt(make([]byte, n), off)
	if !errors.Is(err, ErrDamaged) || got != 0 {
		t.Fatalf("ReadAt(%d, +%d) = %d, %v; want 0, ErrDamaged", off, n, got, err)
	}
	var de *DamageError
	if !errors.As(err, &de) {
		t.Fatalf("ReadAt error %v is not a *DamageError", err)
	}
	if de.Volume != v.Name() || !slices.Equal(de.Ranges, want) {
		t.Fatalf("DamageError = %q %v, want %q %v", de.Volume, de.Ranges, v.Name(), want)
	}
}

// wantNoDamage asserts that the whole volume reads without damage, that
// Damaged is empty and that it reads as model.
func wantNoDamage(t testing.TB, v *Volume, model []byte) {
	t.Helper()
	if d := v.Damaged(); len(d) != 0 {
		t.Fatalf("Damaged = %v", d)
	}
	if got := mustRead(t, v, 0, int(v.Size())); model != nil && !bytes.Equal(got, model) {
		t.Fatal("volume differs from model")
	}
}

// sumsPath is the sums file of volume name in the store at dir.
func sumsPath(dir, name string) string {
	return filepath.Join(dir, volumesDirName, name, sumsFileName)
}

func dataPath(dir, name string) string {
	return filepath.Join(dir, volumesDirName, name, dataFileName)
}

// expectedSums returns the sums file a volume holding model must have.
func expectedSums(model []byte) []byte {
	out := encodeSumsHeader()
	for off := 0; off < len(model); off += SumBlockSize {
		out = binary.LittleEndian.AppendUint32(out, blockSum(model[off:min(off+SumBlockSize, len(model))]))
	}
	return out
}

// checkSumsFile asserts that the sums file on disk is exactly the one for
// model (header, length and every entry).
func checkSumsFile(t testing.TB, dir, name string, model []byte) {
	t.Helper()
	got, err := os.ReadFile(sumsPath(dir, name))
	if err != nil {
		t.Fatal(err)
	}
	want := expectedSums(model)
	if len(got) != len(want) {
		t.Fatalf("sums file is %d bytes, want %d", len(got), len(want))
	}
	if !bytes.Equal(got[:sumsHeaderSize], want[:sumsHeaderSize]) {
		t.Fatal("sums header differs")
	}
	for i := sumsHeaderSize; i < len(got); i += 4 {
		if g, w := binary.LittleEndian.Uint32(got[i:]), binary.LittleEndian.Uint32(want[i:]); g != w {
			t.Fatalf("sum of block %d is %08x, want %08x", (i-sumsHeaderSize)/4, g, w)
		}
	}
}

// corruptFile overwrites bytes of path at off behind the store's back.
func corruptFile(t testing.TB, path string, off int64, b []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

// logRecorder is a slog handler that keeps messages by level.
type logRecorder struct {
	mu   sync.Mutex
	msgs []string
}

func (r *logRecorder) has(prefix string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.ContainsFunc(r.msgs, func(m string) bool { return len(m) >= len(prefix) && m[:len(prefix)] == prefix })
}

func (r *logRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (r *logRecorder) Handle(_ context.Context, rec slog.Record) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.msgs = append(r.msgs, rec.Level.String()+" "+rec.Message)
	return nil
}
func (r *logRecorder) WithAttrs([]slog.Attr) slog.Handler { return r }
func (r *logRecorder) WithGroup(string) slog.Handler      { return r }

// testLoggerTo logs to rec.
func testLoggerTo(rec *logRecorder) *slog.Logger { return slog.New(rec) }
