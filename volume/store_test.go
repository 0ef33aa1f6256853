package volume

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestCreateGetListDelete(t *testing.T) {
	t.Parallel()
	s := newStore(t)
	if got := s.List(); len(got) != 0 {
		t.Fatalf("new store lists %v", got)
	}
	for _, name := range []string{"b", "a", "c-1"} {
		mustCreate(t, s, name, 1*MiB)
	}
	var names []string
	for _, m := range s.List() {
		names = append(names, m.Name)
		if m.Size != MiB || m.BlockSize != DefaultBlockSize || !m.Created.Equal(testCreated) {
			t.Errorf("List entry %+v", m)
		}
	}
	if want := []string{"a", "b", "c-1"}; !slices.Equal(names, want) {
		t.Fatalf("List names = %v, want %v", names, want)
	}

	v, err := s.Get("b")
	if err != nil {
		t.Fatal(err)
	}
	if v.Name() != "b" || v.Size() != MiB {
		t.Fatalf("Get(b) = %q size %d", v.Name(), v.Size())
	}
	if v2, _ := s.Get("b"); v2 != v {
		t.Fatal("Get returned a different handle for the same volume")
	}
	for _, f := range []string{dataFileName, metaFileName} {
		if _, err := os.Stat(filepath.Join(s.Dir(), volumesDirName, "b", f)); err != nil {
			t.Fatalf("expected file: %v", err)
		}
	}

	if err := s.Delete("b"); err != nil {
		t.Fatal(err)
	}
	_, err = s.Get("b")
	wantErr(t, "Get after Delete", err, ErrNotFound)
	if got := volumeEntries(t, s); !slices.Equal(got, []string{"a", "c-1"}) {
		t.Fatalf("volumes dir after delete = %v", got)
	}
	if n := len(s.List()); n != 2 {
		t.Fatalf("List has %d entries after delete, want 2", n)
	}

	// The name can be reused, and the new volume does not see old data.
	mustWrite(t, mustCreate(t, s, "x", MiB), []byte("old"), 0)
	if err := s.Delete("x"); err != nil {
		t.Fatal(err)
	}
	wantZeros(t, mustCreate(t, s, "x", MiB), 0, 3)
}

func TestCreateDefaults(t *testing.T) {
	t.Parallel()
	s := newStore(t)
	before := time.Now()
	v, err := s.Create(Meta{Name: "v", Size: 64 * KiB})
	if err != nil {
		t.Fatal(err)
	}
	m := v.Meta()
	if m.BlockSize != DefaultBlockSize {
		t.Errorf("BlockSize = %d, want %d", m.BlockSize, DefaultBlockSize)
	}
	if m.Created.Location() != time.UTC || m.Created.Before(before.Add(-time.Second)) || m.Created.After(time.Now()) {
		t.Errorf("Created = %v, want about now in UTC", m.Created)
	}

	// An explicit block size and creation time (any zone) are kept.
	created := time.Date(2020, 1, 2, 3, 4, 5, 6, time.FixedZone("X", 3600))
	v, err = s.Create(Meta{Name: "w", Size: 64 * KiB, BlockSize: 512, Created: created})
	if err != nil {
		t.Fatal(err)
	}
	if m := v.Meta(); m.BlockSize != 512 || !m.Created.Equal(created) || m.Created.Location() != time.UTC {
		t.Errorf("Meta = %+v", m)
	}
}

func TestCreateErrors(t *testing.T) {
	t.Parallel()
	s := newStore(t)
	mustCreate(t, s, "v", MiB)
	_, err := s.Create(Meta{Name: "v", Size: MiB})
	wantErr(t, "duplicate Create", err, ErrExists)
	if !strings.Contains(err.Error(), `"v"`) {
		t.Errorf("error %q does not name the volume", err)
	}

	for _, name := range []string{"../x", "a/b", "", strings.Repeat("n", 65), ".hidden", "-x", "has space", "nul\x00", ".", ".."} {
		_, err := s.Create(Meta{Name: name, Size: MiB})
		wantErr(t, "Create "+name, err, ErrInvalidName)
	}
	for _, m := range []Meta{
		{Name: "s", Size: 0},
		{Name: "s", Size: -MiB},
		{Name: "s", Size: MiB + 1},
		{Name: "s", Size: 4096, BlockSize: 8192},
		{Name: "s", Size: MaxSize + DefaultBlockSize},
		{Name: "s", Size: MiB, BlockSize: 100},
		{Name: "s", Size: MiB, BlockSize: -512},
		{Name: "s", Size: MiB, BlockSize: 1 << 17},
	} {
		_, err := s.Create(m)
		wantErr(t, fmt.Sprintf("Create(%+v)", m), err, ErrInvalidSize)
	}
	if got := volumeEntries(t, s); !slices.Equal(got, []string{"v"}) {
		t.Fatalf("failed creates left entries: %v", got)
	}
	if n := len(s.List()); n != 1 {
		t.Fatalf("List has %d entries, want 1", n)
	}
}

// TestCreateHuge creates a volume of MaxSize. Filesystems with a smaller
// file size limit (ext4) refuse it; then nothing may be left behind.
func TestCreateHuge(t *testing.T) {
	t.Parallel()
	s := newStore(t)
	v, err := s.Create(Meta{Name: "huge", Size: MaxSize})
	if err != nil {
		t.Logf("Create(MaxSize) failed as the filesystem allows: %v", err)
		if got := volumeEntries(t, s); len(got) != 0 {
			t.Fatalf("failed create left %v", got)
		}
		if _, err := s.Get("huge"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("Get after failed create: %v", err)
		}
		return
	}
	mustWrite(t, v, []byte("end"), MaxSize-3)
	if got := mustRead(t, v, MaxSize-3, 3); string(got) != "end" {
		t.Fatalf("read %q", got)
	}
	wantZeros(t, v, MaxSize/2, 4096)
}

func TestUnknownVolume(t *testing.T) {
	t.Parallel()
	s := newStore(t)
	_, err := s.Get("nope")
	wantErr(t, "Get", err, ErrNotFound)
	wantErr(t, "Delete", s.Delete("nope"), ErrNotFound)
	wantErr(t, "Resize", s.Resize("nope", MiB), ErrNotFound)
	_, err = s.Get("../etc")
	wantErr(t, "Get bad name", err, ErrInvalidName)
	wantErr(t, "Delete bad name", s.Delete("a/b"), ErrInvalidName)
	wantErr(t, "Resize bad name", s.Resize("", MiB), ErrInvalidName)
}

func TestReopen(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	r := rand.New(rand.NewPCG(1, 2))
	s, err := Open(dir, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string][]byte{}
	for _, name := range []string{"one", "two", "three"} {
		v := mustCreate(t, s, name, 2*MiB)
		data := randBytes(r, 300*KiB)
		mustWrite(t, v, data, 700*KiB)
		want[name] = data
	}
	metas := s.List()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s = openStore(t, dir)
	if got := s.List(); !reflect.DeepEqual(got, metas) {
		t.Fatalf("after reopen List = %+v, want %+v", got, metas)
	}
	if b := s.Broken(); len(b) != 0 {
		t.Fatalf("Broken = %v", b)
	}
	for name, data := range want {
		v, err := s.Get(name)
		if err != nil {
			t.Fatal(err)
		}
		if got := mustRead(t, v, 700*KiB, len(data)); !bytes.Equal(got, data) {
			t.Fatalf("%s: data differs after reopen", name)
		}
		wantZeros(t, v, 0, 700*KiB)
		wantZeros(t, v, 1000*KiB, 1048*KiB)
	}
}

func TestStoreLock(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s := openStore(t, dir)
	if s2, err := Open(dir, testLogger(t)); err == nil {
		s2.Close()
		t.Fatal("second Open of the same directory succeeded")
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	openStore(t, dir)
}

func TestStoreClose(t *testing.T) {
	t.Parallel()
	s := newStore(t)
	v := mustCreate(t, s, "v", MiB)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	_, err := s.Get("v")
	wantErr(t, "Get", err, ErrClosed)
	_, err = s.Create(Meta{Name: "w", Size: MiB})
	wantErr(t, "Create", err, ErrClosed)
	wantErr(t, "Delete", s.Delete("v"), ErrClosed)
	wantErr(t, "Resize", s.Resize("v", 2*MiB), ErrClosed)
	if l := s.List(); l != nil {
		t.Errorf("List after close = %v", l)
	}
	_, err = v.ReadAt(make([]byte, 1), 0)
	wantErr(t, "ReadAt", err, ErrClosed)
	_, err = v.WriteAt(make([]byte, 1), 0)
	wantErr(t, "WriteAt", err, ErrClosed)
	wantErr(t, "Sync", v.Sync(), ErrClosed)
	if v.Meta().Size != MiB || v.Name() != "v" {
		t.Errorf("Meta after close = %+v", v.Meta())
	}
}

func TestOpenNilLoggerCreatesDir(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "a", "b")
	s, err := Open(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.Dir() != dir {
		t.Errorf("Dir = %q, want %q", s.Dir(), dir)
	}
	fi, err := os.Stat(dir)
	if err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("dir: %v %v", fi, err)
	}
}

// TestBrokenVolumes damages one volume in each way a crash, a bad disk or
// an operator could, and checks that the store still opens, reports the
// volume as broken, leaves its files alone, and serves the other volume.
func TestBrokenVolumes(t *testing.T) {
	t.Parallel()
	metaPath := func(dir string) string { return filepath.Join(dir, volumesDirName, "bad", metaFileName) }
	rewriteMeta := func(f func([]byte) []byte) func(*testing.T, string) {
		return func(t *testing.T, dir string) {
			b, err := os.ReadFile(metaPath(dir))
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(metaPath(dir), f(b), 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	damage := map[string]func(*testing.T, string){
		"garbage":   rewriteMeta(func([]byte) []byte { return []byte("\x00\x01garbage") }),
		"empty":     rewriteMeta(func([]byte) []byte { return nil }),
		"truncated": rewriteMeta(func(b []byte) []byte { return b[:len(b)/2] }),
		"bad checksum": rewriteMeta(func(b []byte) []byte {
			return bytes.Replace(b, []byte(`"size":1048576`), []byte(`"size":2097152`), 1)
		}),
		"wrong version": rewriteMeta(func(b []byte) []byte {
			return bytes.Replace(b, []byte(`"format":1`), []byte(`"format":7`), 1)
		}),
		"other name": rewriteMeta(func([]byte) []byte {
			b, _ := encodeMeta(Meta{Name: "good", Size: MiB, BlockSize: 4096})
			return b
		}),
		"missing meta": func(t *testing.T, dir string) {
			if err := os.Remove(metaPath(dir)); err != nil {
				t.Fatal(err)
			}
		},
		"missing data": func(t *testing.T, dir string) {
			if err := os.Remove(filepath.Join(dir, volumesDirName, "bad", dataFileName)); err != nil {
				t.Fatal(err)
			}
		},
		"data is a directory": func(t *testing.T, dir string) {
			p := filepath.Join(dir, volumesDirName, "bad", dataFileName)
			if err := os.Remove(p); err != nil {
				t.Fatal(err)
			}
			if err := os.Mkdir(p, 0o700); err != nil {
				t.Fatal(err)
			}
		},
		"volume is a file": func(t *testing.T, dir string) {
			p := filepath.Join(dir, volumesDirName, "bad")
			if err := os.RemoveAll(p); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, []byte("x"), 0o600); err != nil {
				t.Fatal(err)
			}
		},
	}
	for what, f := range damage {
		t.Run(what, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			s, err := Open(dir, testLogger(t))
			if err != nil {
				t.Fatal(err)
			}
			mustWrite(t, mustCreate(t, s, "bad", MiB), []byte("bad data"), 0)
			mustWrite(t, mustCreate(t, s, "good", MiB), []byte("good data"), 4096)
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			f(t, dir)
			before := snapshotFiles(t, dir)

			s = openStore(t, dir)
			broken := s.Broken()
			if len(broken) != 1 || !errors.Is(broken["bad"], ErrCorrupt) {
				t.Fatalf("Broken = %v, want bad: ErrCorrupt", broken)
			}
			t.Logf("reported: %v", broken["bad"])
			if !strings.Contains(broken["bad"].Error(), `"bad"`) {
				t.Errorf("error %q does not name the volume", broken["bad"])
			}
			if l := s.List(); len(l) != 1 || l[0].Name != "good" {
				t.Fatalf("List = %+v, want only good", l)
			}
			_, err = s.Get("bad")
			wantErr(t, "Get broken", err, ErrCorrupt)
			wantErr(t, "Resize broken", s.Resize("bad", 2*MiB), ErrCorrupt)
			_, err = s.Create(Meta{Name: "bad", Size: MiB})
			wantErr(t, "Create over broken", err, ErrExists)
			g, err := s.Get("good")
			if err != nil {
				t.Fatal(err)
			}
			if got := mustRead(t, g, 4096, 9); string(got) != "good data" {
				t.Fatalf("good volume reads %q", got)
			}
			if after := snapshotFiles(t, dir); !equalSnapshots(before, after) {
				t.Fatal("opening the store modified files")
			}

			// Reopening keeps reporting it; Delete removes it.
			s.Close()
			s = openStore(t, dir)
			if _, ok := s.Broken()["bad"]; !ok {
				t.Fatal("broken volume not reported after second reopen")
			}
			if err := s.Delete("bad"); err != nil {
				t.Fatal(err)
			}
			if len(s.Broken()) != 0 || slices.Contains(volumeEntries(t, s), "bad") {
				t.Fatalf("after Delete: Broken %v, entries %v", s.Broken(), volumeEntries(t, s))
			}
			mustCreate(t, s, "bad", MiB)
		})
	}
}

// TestCrashLeftovers plants what a crash in each mutation can leave behind
// and checks that Open cleans it up without touching anything else.
func TestCrashLeftovers(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s, err := Open(dir, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	v := mustCreate(t, s, "keep", MiB)
	mustWrite(t, v, []byte("keep me"), 0)
	metaBefore, err := os.ReadFile(filepath.Join(dir, volumesDirName, "keep", metaFileName))
	if err != nil {
		t.Fatal(err)
	}
	s.Close()

	vols := filepath.Join(dir, volumesDirName)
	mkfile := func(path string, data []byte) {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// Create interrupted before the rename: complete or partial staging.
	complete, _ := encodeMeta(Meta{Name: "half", Size: MiB, BlockSize: 4096})
	mkfile(filepath.Join(vols, ".create-half-123", dataFileName), make([]byte, 10))
	mkfile(filepath.Join(vols, ".create-half-123", metaFileName), complete)
	mkfile(filepath.Join(vols, ".create-other-9", dataFileName), nil)
	// Delete interrupted after the rename.
	mkfile(filepath.Join(vols, ".trash-gone-abc", dataFileName), []byte("old"))
	mkfile(filepath.Join(vols, ".trash-gone-abc", metaFileName), []byte("{"))
	// Meta rewrite interrupted before the rename.
	mkfile(filepath.Join(vols, "keep", metaTmpName), []byte(`{"format":1,"crc`))
	// Foreign entries are left alone.
	mkfile(filepath.Join(vols, ".unknown"), []byte("?"))
	mkfile(filepath.Join(vols, "bad name"), []byte("?"))

	s = openStore(t, dir)
	if got, want := volumeEntries(t, s), []string{".unknown", "bad name", "keep"}; !slices.Equal(got, want) {
		t.Fatalf("entries after open = %v, want %v", got, want)
	}
	if l := s.List(); len(l) != 1 || l[0].Name != "keep" {
		t.Fatalf("List = %+v", l)
	}
	if b := s.Broken(); len(b) != 0 {
		t.Fatalf("Broken = %v", b)
	}
	if _, err := s.Get("half"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("interrupted create visible: %v", err)
	}
	v, err = s.Get("keep")
	if err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, v, 0, 7); string(got) != "keep me" {
		t.Fatalf("read %q", got)
	}
	metaAfter, err := os.ReadFile(filepath.Join(vols, "keep", metaFileName))
	if err != nil || !bytes.Equal(metaBefore, metaAfter) {
		t.Fatalf("meta.json changed: %v", err)
	}
	// A name only used by a leftover is free.
	mustCreate(t, s, "half", MiB)
	// An entry that appeared behind the store's back blocks its name
	// rather than being replaced.
	mkfile(filepath.Join(vols, "squat"), []byte("?"))
	_, err = s.Create(Meta{Name: "squat", Size: MiB})
	wantErr(t, "Create over foreign entry", err, ErrExists)
}

// TestReconcileLength simulates crashes inside Resize: the data file is
// longer than the committed size (stale bytes past it) or shorter.
func TestReconcileLength(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s, err := Open(dir, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	mustWrite(t, mustCreate(t, s, "long", MiB), []byte("head"), 0)
	mustWrite(t, mustCreate(t, s, "short", MiB), []byte("head"), 0)
	s.Close()

	long := filepath.Join(dir, volumesDirName, "long", dataFileName)
	f, err := os.OpenFile(long, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("stale"), MiB+100); err != nil {
		t.Fatal(err)
	}
	f.Close()
	short := filepath.Join(dir, volumesDirName, "short", dataFileName)
	if err := os.Truncate(short, 64*KiB); err != nil {
		t.Fatal(err)
	}

	s = openStore(t, dir)
	for _, name := range []string{"long", "short"} {
		v, err := s.Get(name)
		if err != nil {
			t.Fatal(err)
		}
		if v.Size() != MiB {
			t.Fatalf("%s: size %d", name, v.Size())
		}
		if fi, err := os.Stat(filepath.Join(dir, volumesDirName, name, dataFileName)); err != nil || fi.Size() != MiB {
			t.Fatalf("%s: data file not reconciled: %v %v", name, fi.Size(), err)
		}
		if got := mustRead(t, v, 0, 4); string(got) != "head" {
			t.Fatalf("%s: read %q", name, got)
		}
		wantZeros(t, v, 4, MiB-4)
		if err := s.Resize(name, 2*MiB); err != nil {
			t.Fatal(err)
		}
		wantZeros(t, v, MiB, MiB) // the stale bytes must not come back
	}
}

func TestResize(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s, err := Open(dir, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	v := mustCreate(t, s, "v", MiB)
	tail := bytes.Repeat([]byte{0x5A}, 4096)
	mustWrite(t, v, tail, MiB-4096)

	// Grow: old data kept, new area zero, I/O allowed up to the new size.
	if err := s.Resize("v", 3*MiB); err != nil {
		t.Fatal(err)
	}
	if v.Size() != 3*MiB || v.Meta().Size != 3*MiB {
		t.Fatalf("size after grow = %d", v.Size())
	}
	if got := mustRead(t, v, MiB-4096, 4096); !bytes.Equal(got, tail) {
		t.Fatal("data lost by grow")
	}
	wantZeros(t, v, MiB, 2*MiB)
	mustWrite(t, v, tail, 3*MiB-4096)

	// Shrink: I/O past the new size fails, and growing again reads zeros.
	if err := s.Resize("v", MiB-8192); err != nil {
		t.Fatal(err)
	}
	_, err = v.ReadAt(make([]byte, 4096), MiB-8192)
	wantErr(t, "read past shrunk size", err, ErrOutOfRange)
	if err := s.Resize("v", 4*MiB); err != nil {
		t.Fatal(err)
	}
	wantZeros(t, v, MiB-8192, 3*MiB+8192)

	// No-op and invalid sizes.
	if err := s.Resize("v", 4*MiB); err != nil {
		t.Fatalf("same-size resize: %v", err)
	}
	for _, size := range []int64{0, -4096, 4097, MaxSize + 4096} {
		wantErr(t, "Resize", s.Resize("v", size), ErrInvalidSize)
	}
	if v.Size() != 4*MiB {
		t.Fatalf("failed resizes changed size to %d", v.Size())
	}

	// The size is persistent.
	s.Close()
	s = openStore(t, dir)
	v, err = s.Get("v")
	if err != nil {
		t.Fatal(err)
	}
	if v.Size() != 4*MiB {
		t.Fatalf("size after reopen = %d", v.Size())
	}
	if fi, err := os.Stat(filepath.Join(dir, volumesDirName, "v", dataFileName)); err != nil || fi.Size() != 4*MiB {
		t.Fatalf("data file: %v", err)
	}
}

// TestDeleteDuringIO deletes a volume while goroutines hammer it: every
// operation either succeeds or fails with ErrClosed, and after Delete
// returns all of them fail.
func TestDeleteDuringIO(t *testing.T) {
	t.Parallel()
	s := newStore(t)
	v := mustCreate(t, s, "v", 4*MiB)
	var wg sync.WaitGroup
	started := make(chan struct{}, 8)
	errs := make(chan error, 8)
	ops := []func(i int) error{
		func(i int) error { _, err := v.WriteAt(make([]byte, 4096), int64(i%1024)*4096); return err },
		func(i int) error { _, err := v.ReadAt(make([]byte, 4096), int64(i%1024)*4096); return err },
		func(i int) error { return v.Trim(int64(i%64)*64*KiB, 64*KiB) },
		func(i int) error { return v.WriteZeroes(int64(i%64)*64*KiB, 64*KiB, true) },
		func(i int) error { _, err := v.BlockStatus(0, v.Size()); return err },
		func(i int) error { return v.Sync() },
		func(i int) error { return v.Hash(0, 2*MiB, nopHash{}) },
	}
	for _, op := range ops {
		wg.Go(func() {
			var once sync.Once
			signal := func() { once.Do(func() { started <- struct{}{} }) }
			defer signal()
			for i := 0; ; i++ {
				if i == 10 {
					signal()
				}
				if err := op(i); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	for range ops {
		<-started
	}
	if err := s.Delete("v"); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		wantErr(t, "I/O during delete", err, ErrClosed)
	}
	_, err := v.WriteAt([]byte{1}, 0)
	wantErr(t, "WriteAt after delete", err, ErrClosed)
	if _, err := s.Get("v"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get after delete: %v", err)
	}
}

// nopHash is a hash.Hash that discards its input.
type nopHash struct{}

func (nopHash) Write(p []byte) (int, error) { return len(p), nil }
func (nopHash) Sum(b []byte) []byte         { return b }
func (nopHash) Reset()                      {}
func (nopHash) Size() int                   { return 0 }
func (nopHash) BlockSize() int              { return 1 }

// TestConcurrentStoreOps runs namespace operations from many goroutines.
func TestConcurrentStoreOps(t *testing.T) {
	t.Parallel()
	s := newStore(t)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			name := string(rune('a' + g))
			for i := range 5 {
				v, err := s.Create(Meta{Name: name, Size: MiB})
				if err != nil {
					t.Error(err)
					return
				}
				if _, err := v.WriteAt([]byte{byte(i)}, 0); err != nil {
					t.Error(err)
				}
				if err := s.Resize(name, int64(i+2)*MiB); err != nil {
					t.Error(err)
				}
				_ = s.List()
				if err := s.Delete(name); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	if l := s.List(); len(l) != 0 {
		t.Fatalf("List = %v", l)
	}
	if got := volumeEntries(t, s); len(got) != 0 {
		t.Fatalf("entries left: %v", got)
	}
}

// TestResizeBeyondFilesystemLimit grows to MaxSize. Filesystems with a lower
// file size limit (ext4) refuse; then the volume must be unchanged.
func TestResizeBeyondFilesystemLimit(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s := openStore(t, dir)
	v := mustCreate(t, s, "v", MiB)
	mustWrite(t, v, []byte("data"), MiB-4)
	if err := s.Resize("v", MaxSize); err != nil {
		t.Logf("Resize(MaxSize) failed as the filesystem allows: %v", err)
		if v.Size() != MiB {
			t.Fatalf("size after failed grow = %d", v.Size())
		}
		fi, err := os.Stat(filepath.Join(dir, volumesDirName, "v", dataFileName))
		if err != nil || fi.Size() != MiB {
			t.Fatalf("data file after failed grow: %v %v", fi.Size(), err)
		}
	} else if v.Size() != MaxSize {
		t.Fatalf("size after grow = %d", v.Size())
	}
	if got := mustRead(t, v, MiB-4, 4); string(got) != "data" {
		t.Fatalf("read %q", got)
	}
	s.Close()
	s = openStore(t, dir)
	if l := s.List(); len(l) != 1 || l[0].Size != v.Size() {
		t.Fatalf("after reopen List = %+v, want size %d", l, v.Size())
	}
}

// TestShortDataFile shrinks the data file behind a live volume's back (as a
// failed truncate or outside damage could): the missing tail still reads as
// zeros and is reported as a hole, but the stored sums of the cut blocks no
// longer match, so reads report exactly those blocks damaged; writing there
// works, and a full-block write heals a block.
func TestShortDataFile(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s := openStore(t, dir)
	v := mustCreate(t, s, "v", MiB)
	mustWrite(t, v, bytes.Repeat([]byte{7}, MiB), 0)
	if err := os.Truncate(filepath.Join(dir, volumesDirName, "v", dataFileName), 256*KiB); err != nil {
		t.Fatal(err)
	}
	wantDamage(t, v, 256*KiB, 768*KiB, []Range{{256 * KiB, 768 * KiB}})
	p := make([]byte, 8*KiB)
	bad, err := v.ReadHealthy(p, 256*KiB-4*KiB)
	if err != nil || !slices.Equal(bad, []Range{{256 * KiB, 4 * KiB}}) {
		t.Fatalf("ReadHealthy across EOF = %v, %v", bad, err)
	}
	if !bytes.Equal(p[:4*KiB], bytes.Repeat([]byte{7}, 4*KiB)) {
		t.Fatal("ReadHealthy: healthy block before EOF differs")
	}
	exts, err := v.BlockStatus(0, MiB)
	if err != nil {
		t.Fatal(err)
	}
	checkExtents(t, exts, 0, MiB)
	if !holeAt(exts, MiB-1) || holeAt(exts, 0) {
		t.Fatalf("BlockStatus = %+v", exts)
	}
	if err := v.Hash(0, MiB, nopHash{}); err != nil {
		t.Fatal(err)
	}
	// A partial write to a damaged block writes but does not heal.
	mustWrite(t, v, []byte{9}, MiB-1)
	wantDamage(t, v, MiB-2, 2, []Range{{MiB - 4096, 4096}})
	// A full-block write heals it.
	blk := bytes.Repeat([]byte{3}, 4096)
	blk[4095] = 9
	mustWrite(t, v, blk, MiB-4096)
	if got := mustRead(t, v, MiB-2, 2); !bytes.Equal(got, []byte{3, 9}) {
		t.Fatalf("read = %v", got)
	}
}

// TestGrowDiscardsStaleTail leaves stale bytes past Size in a live volume's
// data file (as a shrink whose truncate failed would) and checks that growing
// over them exposes zeros.
func TestGrowDiscardsStaleTail(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s := openStore(t, dir)
	v := mustCreate(t, s, "v", MiB)
	data := filepath.Join(dir, volumesDirName, "v", dataFileName)
	f, err := os.OpenFile(data, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.WriteAt(bytes.Repeat([]byte{0xEE}, 64*KiB), MiB)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Resize("v", 2*MiB); err != nil {
		t.Fatal(err)
	}
	wantZeros(t, v, MiB, MiB)
}
