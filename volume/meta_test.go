package volume

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"strings"
	"testing"
	"time"
)

func TestValidateName(t *testing.T) {
	t.Parallel()
	valid := []string{
		"a", "Z", "0", "vol1", "my-volume", "my_volume", "v.1.2", "a..b", "A-",
		strings.Repeat("x", 64),
	}
	for _, name := range valid {
		if err := ValidateName(name); err != nil {
			t.Errorf("ValidateName(%q) = %v, want nil", name, err)
		}
	}
	invalid := []string{
		"", ".", "..", "../x", "a/b", "/", "/abs", "a\\b",
		strings.Repeat("x", 65), ".hidden", "-x", "_x",
		"has space", " lead", "trail ", "nul\x00byte", "\x00",
		"tab\t", "new\nline", "ümlaut", "a:b", "a*b", ".create-x", ".trash-x",
	}
	for _, name := range invalid {
		err := ValidateName(name)
		wantErr(t, fmt.Sprintf("ValidateName(%q)", name), err, ErrInvalidName)
		if err.Error() == ErrInvalidName.Error() {
			t.Errorf("ValidateName(%q): error %q gives no reason", name, err)
		}
	}
}

func TestValidateMeta(t *testing.T) {
	t.Parallel()
	ok := Meta{Name: "v", Size: 1 * MiB, BlockSize: 4096}
	if err := ValidateMeta(ok); err != nil {
		t.Fatalf("ValidateMeta(%+v) = %v", ok, err)
	}
	for _, m := range []Meta{
		{Name: "v", Size: 512, BlockSize: 512},
		{Name: "v", Size: 65536, BlockSize: 65536},
		{Name: "v", Size: MaxSize, BlockSize: 4096},
		{Name: "v", Size: MaxSize, BlockSize: 65536},
	} {
		if err := ValidateMeta(m); err != nil {
			t.Errorf("ValidateMeta(%+v) = %v, want nil", m, err)
		}
	}
	bad := []struct {
		m    Meta
		want error
	}{
		{Meta{Name: "", Size: MiB, BlockSize: 4096}, ErrInvalidName},
		{Meta{Name: "../x", Size: MiB, BlockSize: 4096}, ErrInvalidName},
		{Meta{Name: "v", Size: 0, BlockSize: 4096}, ErrInvalidSize},
		{Meta{Name: "v", Size: -4096, BlockSize: 4096}, ErrInvalidSize},
		{Meta{Name: "v", Size: 4097, BlockSize: 4096}, ErrInvalidSize},
		{Meta{Name: "v", Size: 1000, BlockSize: 512}, ErrInvalidSize},
		{Meta{Name: "v", Size: MaxSize + 4096, BlockSize: 4096}, ErrInvalidSize},
		{Meta{Name: "v", Size: 1 << 62, BlockSize: 4096}, ErrInvalidSize},
		{Meta{Name: "v", Size: MiB, BlockSize: 0}, ErrInvalidSize},
		{Meta{Name: "v", Size: MiB, BlockSize: -4096}, ErrInvalidSize},
		{Meta{Name: "v", Size: MiB, BlockSize: 256}, ErrInvalidSize},
		{Meta{Name: "v", Size: MiB, BlockSize: 1000}, ErrInvalidSize},
		{Meta{Name: "v", Size: MiB, BlockSize: 3 * 4096}, ErrInvalidSize},
		{Meta{Name: "v", Size: MiB, BlockSize: 131072}, ErrInvalidSize},
	}
	for _, tc := range bad {
		err := ValidateMeta(tc.m)
		wantErr(t, fmt.Sprintf("ValidateMeta(%+v)", tc.m), err, tc.want)
		if tc.want == ErrInvalidSize && !strings.Contains(err.Error(), `"v"`) {
			t.Errorf("ValidateMeta(%+v): error %q does not name the volume", tc.m, err)
		}
	}
}

func validMetas() []Meta {
	return []Meta{
		{Name: "v", Size: 4096, BlockSize: 4096, Created: testCreated},
		{Name: "a.b_c-d", Size: MaxSize, BlockSize: 65536, Created: time.Unix(0, 0).UTC()},
		{Name: strings.Repeat("z", 64), Size: 512, BlockSize: 512},
		{Name: "9", Size: 10 * MiB, BlockSize: 1024, Created: time.Date(9999, 12, 31, 23, 59, 59, 999999999, time.UTC)},
	}
}

func TestMetaRoundTrip(t *testing.T) {
	t.Parallel()
	for _, m := range validMetas() {
		b, err := encodeMeta(m)
		if err != nil {
			t.Fatalf("encodeMeta(%+v): %v", m, err)
		}
		got, err := decodeMeta(b)
		if err != nil {
			t.Fatalf("decodeMeta(%s): %v", b, err)
		}
		if got != m {
			t.Errorf("round trip: got %+v, want %+v", got, m)
		}
		if !json.Valid(b) {
			t.Errorf("encoded meta is not valid JSON: %s", b)
		}
	}
}

// envelope builds a meta.json body by hand, with a correct checksum unless
// crc is non-empty.
func envelope(format int, crc, body string) []byte {
	if crc == "" {
		crc = fmt.Sprintf("%08x", crc32.Checksum([]byte(body), castagnoli))
	}
	return fmt.Appendf(nil, `{"format":%d,"crc32c":%q,"meta":%s}`, format, crc, body)
}

func TestDecodeMetaCorrupt(t *testing.T) {
	t.Parallel()
	good, err := encodeMeta(validMetas()[0])
	if err != nil {
		t.Fatal(err)
	}
	goodBody := `{"name":"v","size":4096,"block_size":4096,"created":"2024-05-06T07:08:09Z"}`
	if _, err := decodeMeta(envelope(1, "", goodBody)); err != nil {
		t.Fatalf("hand-built envelope does not decode: %v", err)
	}
	cases := map[string][]byte{
		"empty":             {},
		"garbage":           []byte("this is not json\x00\xff"),
		"json null":         []byte("null"),
		"json array":        []byte("[1,2,3]"),
		"no meta":           []byte(`{"format":1,"crc32c":"00000000"}`),
		"wrong version":     envelope(2, "", goodBody),
		"version zero":      envelope(0, "", goodBody),
		"bad checksum":      envelope(1, "deadbeef", goodBody),
		"edited body":       bytes.Replace(good, []byte(`"size":4096`), []byte(`"size":8192`), 1),
		"unknown field":     envelope(1, "", `{"name":"v","size":4096,"block_size":4096,"extra":1}`),
		"invalid size":      envelope(1, "", `{"name":"v","size":4097,"block_size":4096}`),
		"invalid name":      envelope(1, "", `{"name":"../v","size":4096,"block_size":4096}`),
		"wrong type":        envelope(1, "", `{"name":"v","size":"4096","block_size":4096}`),
		"meta not object":   envelope(1, "", `"v"`),
		"bad time":          envelope(1, "", `{"name":"v","size":4096,"block_size":4096,"created":"yesterday"}`),
		"trailing garbage":  append(bytes.Clone(good), "xx"...),
		"two objects":       append(bytes.Clone(good), good...),
		"oversize":          append(bytes.Clone(good), bytes.Repeat([]byte(" "), maxMetaBytes)...),
		"size overflow":     envelope(1, "", `{"name":"v","size":99999999999999999999,"block_size":4096}`),
		"negative blocksiz": envelope(1, "", `{"name":"v","size":4096,"block_size":-4096}`),
	}
	for i := range len(good) - 1 { // dropping only the final newline is fine
		cases[fmt.Sprintf("truncated at %d", i)] = good[:i]
	}
	for name, b := range cases {
		if m, err := decodeMeta(b); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: decodeMeta(%q) = %+v, %v; want ErrCorrupt", name, b, m, err)
		}
	}
}

// FuzzMeta checks that decodeMeta never panics, that whatever it accepts is
// valid and survives an encode/decode round trip unchanged, and that valid
// metas built from the fuzz input round-trip too.
func FuzzMeta(f *testing.F) {
	for _, m := range validMetas() {
		b, err := encodeMeta(m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, m.Name, m.Size, m.BlockSize, m.Created.UnixNano())
		f.Add(b[:len(b)/2], m.Name, m.Size, m.BlockSize, m.Created.UnixNano())
	}
	f.Add([]byte("garbage"), "", int64(-1), 0, int64(0))
	f.Add(envelope(2, "", `{"name":"v","size":4096,"block_size":4096}`), "x", int64(4096), 512, int64(1))

	f.Fuzz(func(t *testing.T, data []byte, name string, size int64, blockSize int, created int64) {
		if m, err := decodeMeta(data); err == nil {
			if verr := ValidateMeta(m); verr != nil {
				t.Fatalf("decodeMeta accepted invalid meta %+v: %v", m, verr)
			}
			roundTrip(t, m)
		} else if !errors.Is(err, ErrCorrupt) {
			t.Fatalf("decodeMeta error %v does not wrap ErrCorrupt", err)
		}

		m := Meta{Name: name, Size: size, BlockSize: blockSize, Created: time.Unix(0, created).UTC()}
		if ValidateMeta(m) == nil {
			roundTrip(t, m)
		}
	})
}

func roundTrip(t *testing.T, m Meta) {
	t.Helper()
	b, err := encodeMeta(m)
	if err != nil {
		t.Fatalf("encodeMeta(%+v): %v", m, err)
	}
	got, err := decodeMeta(b)
	if err != nil {
		t.Fatalf("decodeMeta(encodeMeta(%+v)) = %v", m, err)
	}
	if got.Name != m.Name || got.Size != m.Size || got.BlockSize != m.BlockSize || !got.Created.Equal(m.Created) {
		t.Fatalf("round trip: got %+v, want %+v", got, m)
	}
	b2, err := encodeMeta(got)
	if err != nil || !bytes.Equal(b, b2) {
		t.Fatalf("re-encoding differs: %s vs %s (%v)", b, b2, err)
	}
}
