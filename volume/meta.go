package volume

import (
	"bytes"
	"encoding/json"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"time"
)

// Meta describes a volume. It is stored in meta.json next to the data file
// and is the single source of truth for the volume's size.
//
// Meta is a plain value; copies are independent.
type Meta struct {
	// Name is the volume name; see ValidateName.
	Name string `json:"name"`
	// Size is the volume size in bytes, a positive multiple of BlockSize
	// and at most MaxSize.
	Size int64 `json:"size"`
	// BlockSize is the preferred I/O granularity advertised to clients:
	// a power of two in [512, 65536].
	BlockSize int `json:"block_size"`
	// Created is the creation time. The replication layer should set it
	// from the replicated command so every site stores the same value.
	Created time.Time `json:"created"`
	// SyncWrites asks writers to acknowledge every write only once it is
	// durable (the "--sync always" mode); the volume itself stores it only.
	SyncWrites bool `json:"sync_writes,omitempty"`
}

const (
	// maxNameLen is the maximum length of a volume name in bytes.
	maxNameLen = 64
	// minBlockSize and maxBlockSize bound Meta.BlockSize.
	minBlockSize = 512
	maxBlockSize = 65536
)

// ValidateName reports whether name is a valid volume name: 1 to 64 bytes,
// the first a letter or digit, the rest letters, digits, '.', '_' or '-'.
// This rules out "", ".", "..", path separators, NUL, spaces and names with
// a leading dot or dash, so a valid name is always a safe single path
// element and never collides with the store's internal ".create-" and
// ".trash-" entries. The error wraps ErrInvalidName and states the reason.
func ValidateName(name string) error {
	if name == "" {
		return fmt.Errorf("%w: empty", ErrInvalidName)
	}
	if len(name) > maxNameLen {
		return fmt.Errorf("%w: %d bytes long, limit is %d", ErrInvalidName, len(name), maxNameLen)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		alnum := 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9'
		if i == 0 && !alnum {
			return fmt.Errorf("%w %q: must start with a letter or digit", ErrInvalidName, name)
		}
		if !alnum && c != '.' && c != '_' && c != '-' {
			return fmt.Errorf("%w %q: invalid character %q at offset %d", ErrInvalidName, name, c, i)
		}
	}
	return nil
}

// ValidateMeta checks m: a valid name (errors wrap ErrInvalidName), and a
// BlockSize that is a power of two in [512, 65536], a Size that is positive,
// a multiple of BlockSize and at most MaxSize (errors wrap ErrInvalidSize).
// Created is not checked. ValidateMeta does not apply defaults: a zero
// BlockSize is invalid here (Store.Create substitutes DefaultBlockSize first).
func ValidateMeta(m Meta) error {
	if err := ValidateName(m.Name); err != nil {
		return err
	}
	bs := m.BlockSize
	if bs < minBlockSize || bs > maxBlockSize || bs&(bs-1) != 0 {
		return fmt.Errorf("volume %q: %w: block size %d is not a power of two in [%d, %d]",
			m.Name, ErrInvalidSize, bs, minBlockSize, maxBlockSize)
	}
	switch {
	case m.Size <= 0:
		return fmt.Errorf("volume %q: %w: size %d is not positive", m.Name, ErrInvalidSize, m.Size)
	case m.Size > MaxSize:
		return fmt.Errorf("volume %q: %w: size %d exceeds maximum %d", m.Name, ErrInvalidSize, m.Size, MaxSize)
	case m.Size%int64(bs) != 0:
		return fmt.Errorf("volume %q: %w: size %d is not a multiple of block size %d", m.Name, ErrInvalidSize, m.Size, bs)
	}
	return nil
}

// On-disk metadata format.
//
// meta.json holds one compact JSON object:
//
//	{"format":1,"crc32c":"<8 hex digits>","meta":{...Meta...}}
//
// crc32c is the Castagnoli CRC of the exact bytes of the "meta" value as
// stored. A torn write, bit rot or a hand edit therefore fails the checksum
// and is reported as ErrCorrupt instead of being misread.
const (
	metaFormat   = 1
	metaFileName = "meta.json"
	metaTmpName  = "meta.json.tmp"
	dataFileName = "data"
	// maxMetaBytes bounds how much of meta.json is read; a real one is
	// about 150 bytes.
	maxMetaBytes = 64 << 10
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// metaEnvelope is the on-disk wrapper around Meta.
type metaEnvelope struct {
	Format int             `json:"format"`
	CRC32C string          `json:"crc32c"`
	Meta   json.RawMessage `json:"meta"`
}

// encodeMeta returns the meta.json contents for m (which should be valid).
func encodeMeta(m Meta) ([]byte, error) {
	body, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	env := metaEnvelope{
		Format: metaFormat,
		CRC32C: fmt.Sprintf("%08x", crc32.Checksum(body, castagnoli)),
		Meta:   body,
	}
	b, err := json.Marshal(env)
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// decodeMeta parses meta.json contents. Every failure wraps ErrCorrupt; it
// never panics on any input. The returned Meta is valid per ValidateMeta and
// its Created time is in UTC.
func decodeMeta(b []byte) (Meta, error) {
	if len(b) > maxMetaBytes {
		return Meta{}, fmt.Errorf("%w: meta is %d bytes, limit is %d", ErrCorrupt, len(b), maxMetaBytes)
	}
	var env metaEnvelope
	if err := json.Unmarshal(b, &env); err != nil {
		return Meta{}, fmt.Errorf("%w: meta envelope: %w", ErrCorrupt, err)
	}
	if env.Format != metaFormat {
		return Meta{}, fmt.Errorf("%w: unsupported meta format version %d (want %d)", ErrCorrupt, env.Format, metaFormat)
	}
	if want := fmt.Sprintf("%08x", crc32.Checksum(env.Meta, castagnoli)); env.CRC32C != want {
		return Meta{}, fmt.Errorf("%w: meta checksum mismatch: stored %q, computed %q", ErrCorrupt, env.CRC32C, want)
	}
	var m Meta
	dec := json.NewDecoder(bytes.NewReader(env.Meta))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		return Meta{}, fmt.Errorf("%w: meta body: %w", ErrCorrupt, err)
	}
	if err := ValidateMeta(m); err != nil {
		return Meta{}, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	m.Created = m.Created.UTC()
	return m, nil
}

// readMetaFile reads and decodes <volPath>/meta.json. Every failure wraps
// ErrCorrupt (a volume directory without readable metadata is unusable).
func readMetaFile(volPath string) (Meta, error) {
	f, err := os.Open(filepath.Join(volPath, metaFileName))
	if err != nil {
		return Meta{}, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxMetaBytes+1))
	if err != nil {
		return Meta{}, fmt.Errorf("%w: read %s: %w", ErrCorrupt, f.Name(), err)
	}
	return decodeMeta(b)
}

// writeMetaFile atomically replaces <volPath>/meta.json with the encoding of
// m: write meta.json.tmp, fsync it, rename it over meta.json, fsync volPath.
// After a crash meta.json is either the old or the new version, never a mix;
// a leftover meta.json.tmp is garbage and is removed when the store opens.
// When writeMetaFile returns nil the new metadata is durable.
func writeMetaFile(volPath string, m Meta) error {
	b, err := encodeMeta(m)
	if err != nil {
		return fmt.Errorf("encode meta: %w", err)
	}
	tmp := filepath.Join(volPath, metaTmpName)
	if err := WriteFileSync(tmp, b); err != nil {
		_ = os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, filepath.Join(volPath, metaFileName)); err != nil {
		_ = os.Remove(tmp)
		return err
	}
	return SyncDir(volPath)
}

// WriteFileSync creates or truncates path, writes b and fsyncs the file.
// The replicated state machine uses it for its own small state files too.
func WriteFileSync(path string, b []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|openFlags, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}
