package cluster

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"flag"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
)

var updateGolden = flag.Bool("update", false, "rewrite the golden files under testdata/ (only for a new format version)")

// seqKey is a key of n bytes counting up from first.
func seqKey(first byte, n int) []byte {
	k := make([]byte, n)
	for i := range k {
		k[i] = first + byte(i)
	}
	return k
}

// goldenKeys is the ring stored in testdata/gossip-keyring.v1: a 32-byte
// primary, then a 16- and a 24-byte key.
func goldenKeys() [][]byte {
	return [][]byte{seqKey(0, 32), seqKey(0xA0, 16), seqKey(0x40, 24)}
}

// TestKeyringFileGolden freezes the keyring file format (version 1): the
// golden file decodes to the sample ring, and the sample encodes to the
// golden file's exact bytes.
func TestKeyringFileGolden(t *testing.T) {
	path := filepath.Join("testdata", "gossip-keyring.v1")
	got, err := encodeKeyring(goldenKeys())
	if err != nil {
		t.Fatal(err)
	}
	if *updateGolden {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("encoding changed:\n%s\nwant (frozen):\n%s", got, want)
	}
	keys, err := decodeKeyring(want)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.EqualFunc(keys, goldenKeys(), bytes.Equal) {
		t.Fatalf("golden file decodes to %x", keys)
	}
	// The layout itself, so a change of the encoder's settings shows here
	// and not only as a byte difference.
	if !strings.HasPrefix(string(want), "{\n  \"version\": 1,\n  \"keys\": [\n    \"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\",") ||
		!strings.HasSuffix(string(want), "\n  ]\n}\n") {
		t.Fatalf("unexpected layout:\n%s", want)
	}
}

func TestKeyringFileRefusesBadContents(t *testing.T) {
	b64 := func(k []byte) string { return `"` + base64.StdEncoding.EncodeToString(k) + `"` }
	k16, k32 := b64(seqKey(1, 16)), b64(seqKey(2, 32))
	for name, body := range map[string]string{
		"empty":            ``,
		"not json":         `version 1`,
		"array":            `[1]`,
		"no version":       `{"keys": [` + k16 + `]}`,
		"version 2":        `{"version": 2, "keys": [` + k16 + `]}`,
		"version 0":        `{"version": 0, "keys": [` + k16 + `]}`,
		"version string":   `{"version": "1", "keys": [` + k16 + `]}`,
		"no keys":          `{"version": 1}`,
		"empty keys":       `{"version": 1, "keys": []}`,
		"null key":         `{"version": 1, "keys": [null]}`,
		"short key":        `{"version": 1, "keys": [` + b64(seqKey(1, 15)) + `]}`,
		"odd key":          `{"version": 1, "keys": [` + k16 + `, ` + b64(seqKey(1, 20)) + `]}`,
		"long key":         `{"version": 1, "keys": [` + b64(seqKey(1, 33)) + `]}`,
		"duplicate":        `{"version": 1, "keys": [` + k16 + `, ` + k32 + `, ` + k16 + `]}`,
		"bad base64":       `{"version": 1, "keys": ["not base64!"]}`,
		"unknown field":    `{"version": 1, "keys": [` + k16 + `], "primary": 0}`,
		"trailing data":    `{"version": 1, "keys": [` + k16 + `]} {}`,
		"trailing garbage": `{"version": 1, "keys": [` + k16 + `]}x`,
		"truncated":        `{"version": 1, "keys": [` + k16,
	} {
		if keys, err := decodeKeyring([]byte(body)); !errors.Is(err, ErrBadKeyring) {
			t.Errorf("%s: decoded %x, %v; want ErrBadKeyring", name, keys, err)
		}
	}
	// Whitespace around a valid ring is fine.
	if keys, err := decodeKeyring([]byte("\n{\"version\":1,\"keys\":[" + k32 + "," + k16 + "]}\n\n")); err != nil || len(keys) != 2 {
		t.Fatalf("compact ring: %x, %v", keys, err)
	}
	for name, keys := range map[string][][]byte{
		"no keys":   nil,
		"bad size":  {seqKey(0, 17)},
		"duplicate": {seqKey(0, 16), seqKey(0, 16)},
	} {
		if _, err := encodeKeyring(keys); !errors.Is(err, ErrInvalidRequest) {
			t.Errorf("encoding %s: %v, want ErrInvalidRequest", name, err)
		}
	}
}

// FuzzDecodeKeyring: decoding never panics, and what decodes encodes back
// to a file that decodes to the same ring.
func FuzzDecodeKeyring(f *testing.F) {
	if b, err := os.ReadFile(filepath.Join("testdata", "gossip-keyring.v1")); err == nil {
		f.Add(b)
	}
	f.Add([]byte(`{"version":1,"keys":["AAAAAAAAAAAAAAAAAAAAAA=="]}`))
	f.Add([]byte(`{"version":2}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		keys, err := decodeKeyring(b)
		if err != nil {
			if !errors.Is(err, ErrBadKeyring) {
				t.Fatalf("error %v is not ErrBadKeyring", err)
			}
			return
		}
		again, err := encodeKeyring(keys)
		if err != nil {
			t.Fatalf("decoded ring %x does not encode: %v", keys, err)
		}
		back, err := decodeKeyring(again)
		if err != nil || !slices.EqualFunc(back, keys, bytes.Equal) {
			t.Fatalf("re-encoded ring decodes to %x, %v; want %x", back, err, keys)
		}
	})
}

// logRecords is a slog handler keeping every record's message and level.
type logRecords struct {
	mu   sync.Mutex
	recs []slog.Record
}

func (l *logRecords) Enabled(context.Context, slog.Level) bool { return true }
func (l *logRecords) Handle(_ context.Context, r slog.Record) error {
	l.mu.Lock()
	l.recs = append(l.recs, r.Clone())
	l.mu.Unlock()
	return nil
}
func (l *logRecords) WithAttrs([]slog.Attr) slog.Handler { return l }
func (l *logRecords) WithGroup(string) slog.Handler      { return l }

// count is how many records at level have a message containing msg.
func (l *logRecords) count(level slog.Level, msg string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, r := range l.recs {
		if r.Level == level && strings.Contains(r.Message, msg) {
			n++
		}
	}
	return n
}

// texts is every record's message and attributes, for a test's failure
// message and to check that no key leaks into the log.
func (l *logRecords) texts() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var b strings.Builder
	for _, r := range l.recs {
		b.WriteString(r.Message)
		r.Attrs(func(a slog.Attr) bool {
			b.WriteString(" " + a.String())
			return true
		})
		b.WriteString("\n")
	}
	return b.String()
}

// The keyring at start: configured keys seed the file; a persisted ring
// wins over them (with a warning when the configured primary is not in
// it); no keys at all is plain text; a bad file or key stops the start.
func TestOpenKeyring(t *testing.T) {
	k1, k2, k3 := seqKey(1, 32), seqKey(2, 16), seqKey(3, 24)

	t.Run("configured keys seed the file", func(t *testing.T) {
		dir := t.TempDir()
		k, err := openKeyring(dir, [][]byte{k1, k2, k1}, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		if got := k.hashes(); !slices.Equal(got, []string{keyHash(k1), keyHash(k2)}) {
			t.Fatalf("ring %v", got)
		}
		if p := k.memberlistRing().GetPrimaryKey(); !bytes.Equal(p, k1) {
			t.Fatalf("memberlist primary %x", p)
		}
		fi, err := os.Stat(filepath.Join(dir, keyringFileName))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Fatalf("keyring file mode %v, want 0600", fi.Mode().Perm())
		}
		b, _ := os.ReadFile(filepath.Join(dir, keyringFileName))
		if keys, err := decodeKeyring(b); err != nil || !slices.EqualFunc(keys, [][]byte{k1, k2}, bytes.Equal) {
			t.Fatalf("file holds %x, %v", keys, err)
		}
	})

	t.Run("the persisted ring wins", func(t *testing.T) {
		dir := t.TempDir()
		if _, err := openKeyring(dir, [][]byte{k1}, slog.New(slog.DiscardHandler)); err != nil {
			t.Fatal(err)
		}
		logs := &logRecords{}
		k, err := openKeyring(dir, [][]byte{k2, k3}, slog.New(logs))
		if err != nil {
			t.Fatal(err)
		}
		if got := k.hashes(); !slices.Equal(got, []string{keyHash(k1)}) {
			t.Fatalf("ring %v, want the persisted one", got)
		}
		if logs.count(slog.LevelInfo, "using the persisted ring") != 1 || logs.count(slog.LevelWarn, "configured primary key is not in the persisted ring") != 1 {
			t.Fatalf("log:\n%s", logs.texts())
		}
		// A configured primary that is in the persisted ring: no warning.
		if err := k.change("install", k2); err != nil {
			t.Fatal(err)
		}
		logs = &logRecords{}
		if _, err := openKeyring(dir, [][]byte{k2}, slog.New(logs)); err != nil {
			t.Fatal(err)
		}
		if logs.count(slog.LevelWarn, "") != 0 {
			t.Fatalf("warned:\n%s", logs.texts())
		}
		// No configured keys (insecure mode asked): the persisted ring
		// still encrypts.
		k, err = openKeyring(dir, nil, slog.New(slog.DiscardHandler))
		if err != nil || k.memberlistRing() == nil {
			t.Fatalf("%v, ring %v", err, k.memberlistRing())
		}
		for _, key := range [][]byte{k1, k2, k3} {
			if strings.Contains(logs.texts(), base64.StdEncoding.EncodeToString(key)) {
				t.Fatal("a key reached the log")
			}
		}
	})

	t.Run("no keys is plain text", func(t *testing.T) {
		dir := t.TempDir()
		k, err := openKeyring(dir, nil, slog.New(slog.DiscardHandler))
		if err != nil || k.memberlistRing() != nil {
			t.Fatalf("%v, ring %v", err, k.memberlistRing())
		}
		if _, err := os.Stat(filepath.Join(dir, keyringFileName)); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("a plain-text site wrote a keyring: %v", err)
		}
		for _, op := range []string{"install", "use", "remove"} {
			if err := k.change(op, k1); !errors.Is(err, ErrKeyringRefused) {
				t.Errorf("%s in plain text: %v, want ErrKeyringRefused", op, err)
			}
		}
	})

	t.Run("bad inputs stop the start", func(t *testing.T) {
		if _, err := openKeyring(t.TempDir(), [][]byte{k1, seqKey(0, 12)}, slog.New(slog.DiscardHandler)); !errors.Is(err, ErrInvalidRequest) {
			t.Fatalf("a 12-byte key: %v", err)
		}
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, keyringFileName), []byte(`{"version":9}`), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := openKeyring(dir, [][]byte{k1}, slog.New(slog.DiscardHandler)); !errors.Is(err, ErrBadKeyring) || !strings.Contains(err.Error(), "version 9") {
			t.Fatalf("a future version: %v", err)
		}
	})
}

// Each site's own changes: install, use, remove, persisted at once and
// mirrored in memberlist's ring; the primary cannot be removed and a key
// that is not installed cannot be used.
func TestKeyringChangesPersist(t *testing.T) {
	dir := t.TempDir()
	k1, k2 := seqKey(1, 32), seqKey(2, 16)
	k, err := openKeyring(dir, [][]byte{k1}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	persisted := func() []string {
		t.Helper()
		again, err := openKeyring(dir, nil, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		return again.hashes()
	}
	ringHashes := func() []string {
		var out []string
		for _, key := range k.memberlistRing().GetKeys() {
			out = append(out, keyHash(key))
		}
		return out
	}
	steps := []struct {
		op   string
		key  []byte
		want []string
		err  error
	}{
		{"use", k2, []string{keyHash(k1)}, ErrKeyringRefused},
		{"install", k2, []string{keyHash(k1), keyHash(k2)}, nil},
		{"install", k2, []string{keyHash(k1), keyHash(k2)}, nil},
		{"remove", k1, []string{keyHash(k1), keyHash(k2)}, ErrKeyringRefused},
		{"use", k2, []string{keyHash(k2), keyHash(k1)}, nil},
		{"use", k2, []string{keyHash(k2), keyHash(k1)}, nil},
		{"remove", k1, []string{keyHash(k2)}, nil},
		{"remove", k1, []string{keyHash(k2)}, nil},
		{"install", seqKey(0, 8), []string{keyHash(k2)}, ErrInvalidRequest},
		{"rotate", k1, []string{keyHash(k2)}, ErrInvalidRequest},
	}
	for i, s := range steps {
		err := k.change(s.op, s.key)
		if (s.err == nil) != (err == nil) || (s.err != nil && !errors.Is(err, s.err)) {
			t.Fatalf("step %d (%s): %v, want %v", i, s.op, err, s.err)
		}
		if got := k.hashes(); !slices.Equal(got, s.want) {
			t.Fatalf("step %d (%s): ring %v, want %v", i, s.op, got, s.want)
		}
		if got := ringHashes(); !slices.Equal(got, s.want) {
			t.Fatalf("step %d (%s): memberlist's ring %v, want %v", i, s.op, got, s.want)
		}
		if got := persisted(); !slices.Equal(got, s.want) {
			t.Fatalf("step %d (%s): persisted %v, want %v", i, s.op, got, s.want)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, keyringFileName+".tmp")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a temporary file was left: %v", err)
	}
}

func TestGenerateGossipKey(t *testing.T) {
	a, err := GenerateGossipKey()
	if err != nil {
		t.Fatal(err)
	}
	b, _ := GenerateGossipKey()
	if len(a) != 32 || bytes.Equal(a, b) {
		t.Fatalf("keys %d bytes, equal %v", len(a), bytes.Equal(a, b))
	}
	if fp := KeyFingerprint(seqKey(0, 32)); len(fp) != 8 || fp != keyHash(seqKey(0, 32))[:8] {
		t.Fatalf("fingerprint %q", fp)
	}
}
