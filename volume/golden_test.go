package volume

// Golden files freeze meta.json, the one byte format this package stores.
// Each test decodes a file under testdata/golden, checks every Meta field
// against the value written here, re-encodes and compares the bytes
// exactly.
//
// Regenerating: `go test ./volume -run Golden -update` (or
// ROBIB_UPDATE_GOLDEN=1) rewrites the files of the current format from the
// values below. That is allowed only together with a bump of metaFormat and
// the compatibility rule of DESIGN.md ("Format versions"): the old
// format's files then move to *_vN names, are never regenerated, and must
// keep decoding.

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

var updateGolden = flag.Bool("update", false, "rewrite the golden files of the current format (only with a format bump)")

const goldenDir = "testdata/golden"

func goldenMetas() []struct {
	file string
	meta Meta
	body string // the "meta" value, as documented: field order, omitempty, RFC 3339 with nanoseconds
} {
	return []struct {
		file string
		meta Meta
		body string
	}{
		{"meta.json", Meta{Name: "vm1", Size: 10 << 30, BlockSize: 4096, Created: time.Date(2024, 5, 6, 7, 8, 9, 0, time.UTC)},
			`{"name":"vm1","size":10737418240,"block_size":4096,"created":"2024-05-06T07:08:09Z"}`},
		{"meta_sync.json", Meta{Name: "db.data_2", Size: 64 << 10, BlockSize: 512, Created: time.Date(2024, 5, 6, 7, 8, 9, 123456789, time.UTC), SyncWrites: true},
			`{"name":"db.data_2","size":65536,"block_size":512,"created":"2024-05-06T07:08:09.123456789Z","sync_writes":true}`},
	}
}

func TestGoldenMeta(t *testing.T) {
	for _, g := range goldenMetas() {
		t.Run(g.file, func(t *testing.T) {
			path := filepath.Join(goldenDir, g.file)
			if *updateGolden || os.Getenv("ROBIB_UPDATE_GOLDEN") == "1" {
				b, err := encodeMeta(g.meta)
				if err != nil {
					t.Fatal(err)
				}
				if err := os.MkdirAll(goldenDir, 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, b, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			golden, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			// The documented layout, by hand.
			crc := fmt.Sprintf("%08x", crc32.Checksum([]byte(g.body), crc32.MakeTable(crc32.Castagnoli)))
			if want := `{"format":1,"crc32c":"` + crc + `","meta":` + g.body + "}\n"; string(golden) != want {
				t.Errorf("%s does not follow the documented layout:\nfile   %s\nlayout %s", g.file, golden, want)
			}

			m, err := decodeMeta(golden)
			if err != nil {
				t.Fatalf("decodeMeta: %v", err)
			}
			if m.Name != g.meta.Name {
				t.Errorf("Name = %q, want %q", m.Name, g.meta.Name)
			}
			if m.Size != g.meta.Size {
				t.Errorf("Size = %d, want %d", m.Size, g.meta.Size)
			}
			if m.BlockSize != g.meta.BlockSize {
				t.Errorf("BlockSize = %d, want %d", m.BlockSize, g.meta.BlockSize)
			}
			if !m.Created.Equal(g.meta.Created) || m.Created.Location() != time.UTC {
				t.Errorf("Created = %v, want %v (UTC)", m.Created, g.meta.Created)
			}
			if m.SyncWrites != g.meta.SyncWrites {
				t.Errorf("SyncWrites = %v, want %v", m.SyncWrites, g.meta.SyncWrites)
			}
			re, err := encodeMeta(m)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(re, golden) {
				t.Errorf("re-encoding differs from the golden file:\ngot    %s\ngolden %s", re, golden)
			}
		})
	}
}

// TestNewerMetaFormatRefused checks the compatibility rule: a meta.json of
// a newer format is refused with an error naming the format version, and
// the store reports that volume broken (leaving its files alone) instead
// of serving it.
func TestNewerMetaFormatRefused(t *testing.T) {
	body := goldenMetas()[0].body
	newer := envelope(metaFormat+1, "", body)
	_, err := decodeMeta(newer)
	if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), fmt.Sprintf("version %d", metaFormat+1)) {
		t.Fatalf("decodeMeta of format %d: %v", metaFormat+1, err)
	}

	dir := t.TempDir()
	s := openStore(t, dir)
	if _, err := s.Create(Meta{Name: "new", Size: 4096, BlockSize: 4096}); err != nil {
		t.Fatal(err)
	}
	s.Close()
	path := filepath.Join(dir, volumesDirName, "new", metaFileName)
	if err := os.WriteFile(path, newer, 0o600); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, dir)
	defer s.Close()
	if _, err := s.Get("new"); err == nil {
		t.Fatal("volume with a newer meta format is served")
	}
	if err := s.Broken()["new"]; err == nil || !strings.Contains(err.Error(), fmt.Sprintf("version %d", metaFormat+1)) {
		t.Fatalf("Broken[new] = %v, want an error naming version %d", err, metaFormat+1)
	}
	if b, err := os.ReadFile(path); err != nil || !bytes.Equal(b, newer) {
		t.Fatalf("the newer meta.json was changed: %v", err)
	}
}
