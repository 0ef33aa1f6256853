package dcdlog

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"time"

	"github.com/hashicorp/raft"
)

// The byte format is described (and frozen) in DESIGN.md; testdata/segment-v1.golden
// pins it.

const (
	formatVersion = 1

	segMagic   = "RBDCDSEG"
	segHdrSize = 64 // segment header; the first record starts here
	recHdrSize = 40 // record header; data, then extensions, then zero padding to 8 bytes follow
	recAlign   = 8

	metaMagic    = "RBDCDMET"
	metaSlotSize = 52
	metaSlotGap  = 4096 // slot i lives at offset i*metaSlotGap

	flagAppendedAt = 1 << 0 // the record carries AppendedAt (else the zero time)
	knownFlags     = flagAppendedAt
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// segHeader is the first segHdrSize bytes of a segment file.
type segHeader struct {
	Seq      uint64 // the generation: unique per use of a file, never reused in one directory
	Base     uint64 // index of the segment's first record
	Capacity uint64 // pre-zeroed size the segment was prepared with (informational)
}

func (h segHeader) encode(b []byte) {
	_ = b[segHdrSize-1]
	clear(b[:segHdrSize])
	copy(b[0:8], segMagic)
	binary.LittleEndian.PutUint32(b[8:], formatVersion)
	binary.LittleEndian.PutUint32(b[12:], segHdrSize)
	binary.LittleEndian.PutUint64(b[16:], h.Seq)
	binary.LittleEndian.PutUint64(b[24:], h.Base)
	binary.LittleEndian.PutUint64(b[32:], h.Capacity)
	binary.LittleEndian.PutUint32(b[60:], crc32.Checksum(b[:60], castagnoli))
}

// decodeSegHeader returns ok=false for anything that is not a valid header
// (zeros of a fresh spare, an invalidated recycled file, a torn first
// write), and an error wrapping ErrFormat for a valid header of a version
// this code does not read.
func decodeSegHeader(b []byte) (h segHeader, ok bool, err error) {
	if len(b) < segHdrSize || string(b[0:8]) != segMagic {
		return h, false, nil
	}
	if crc32.Checksum(b[:60], castagnoli) != binary.LittleEndian.Uint32(b[60:]) {
		return h, false, nil
	}
	if v := binary.LittleEndian.Uint32(b[8:]); v != formatVersion || binary.LittleEndian.Uint32(b[12:]) != segHdrSize {
		return h, false, fmt.Errorf("%w: segment format version %d (header %d bytes), this build reads version %d", ErrFormat, v, binary.LittleEndian.Uint32(b[12:]), formatVersion)
	}
	h.Seq = binary.LittleEndian.Uint64(b[16:])
	h.Base = binary.LittleEndian.Uint64(b[24:])
	h.Capacity = binary.LittleEndian.Uint64(b[32:])
	if h.Seq == 0 || h.Base == 0 {
		return h, false, nil
	}
	return h, true, nil
}

// recordLen is the on-disk size of a record holding l, padding included.
func recordLen(l *raft.Log) int64 {
	return padded(recHdrSize + int64(len(l.Data)) + int64(len(l.Extensions)))
}

func padded(n int64) int64 { return (n + recAlign - 1) &^ (recAlign - 1) }

// genSeed is the checksum of the 8-byte generation: each record's crc32c
// starts from it, so it covers the generation without storing it.
func genSeed(gen uint64) uint32 {
	var g [8]byte
	binary.LittleEndian.PutUint64(g[:], gen)
	return crc32.Update(0, castagnoli, g[:])
}

// encodeRecordHeader fills hdr (recHdrSize bytes) for l and returns it; the
// checksum covers the generation, hdr[4:] and then data and extensions.
func encodeRecordHeader(hdr []byte, seed uint32, l *raft.Log) {
	_ = hdr[recHdrSize-1]
	binary.LittleEndian.PutUint32(hdr[4:], uint32(len(l.Data)))
	binary.LittleEndian.PutUint32(hdr[8:], uint32(len(l.Extensions)))
	hdr[12] = byte(l.Type)
	hdr[13] = 0
	var at int64
	if !l.AppendedAt.IsZero() {
		hdr[13] = flagAppendedAt
		at = l.AppendedAt.UnixNano()
	}
	hdr[14], hdr[15] = 0, 0
	binary.LittleEndian.PutUint64(hdr[16:], l.Index)
	binary.LittleEndian.PutUint64(hdr[24:], l.Term)
	binary.LittleEndian.PutUint64(hdr[32:], uint64(at))
	c := crc32.Update(seed, castagnoli, hdr[4:recHdrSize])
	c = crc32.Update(c, castagnoli, l.Data)
	c = crc32.Update(c, castagnoli, l.Extensions)
	binary.LittleEndian.PutUint32(hdr[0:], c)
}

// appendRecord appends l's whole record (header, data, extensions, padding)
// to b: the single-buffer form, used by tests and the golden file.
func appendRecord(b []byte, gen uint64, l *raft.Log) []byte {
	var hdr [recHdrSize]byte
	encodeRecordHeader(hdr[:], genSeed(gen), l)
	n := len(b)
	b = append(b, hdr[:]...)
	b = append(b, l.Data...)
	b = append(b, l.Extensions...)
	for int64(len(b)-n) < recordLen(l) {
		b = append(b, 0)
	}
	return b
}

// decodeRecord checks the record at the start of b against generation gen
// and index want (0: any index) and returns its length, or ok=false if it
// is not a valid record (bad checksum, length past b, wrong index, unknown
// flags). l's Data and Extensions alias b.
func decodeRecord(b []byte, seed uint32, want uint64, l *raft.Log) (n int64, ok bool) {
	if len(b) < recHdrSize {
		return 0, false
	}
	dl := int64(binary.LittleEndian.Uint32(b[4:]))
	el := int64(binary.LittleEndian.Uint32(b[8:]))
	flags := b[13]
	idx := binary.LittleEndian.Uint64(b[16:])
	at := binary.LittleEndian.Uint64(b[32:])
	if flags&^knownFlags != 0 || b[14] != 0 || b[15] != 0 || idx == 0 || (want != 0 && idx != want) ||
		(flags&flagAppendedAt == 0 && at != 0) {
		return 0, false
	}
	n = padded(recHdrSize + dl + el)
	if n > int64(len(b)) {
		return 0, false
	}
	if crc32.Update(seed, castagnoli, b[4:recHdrSize+dl+el]) != binary.LittleEndian.Uint32(b[0:]) {
		return 0, false
	}
	l.Index = idx
	l.Term = binary.LittleEndian.Uint64(b[24:])
	l.Type = raft.LogType(b[12])
	l.Data = b[recHdrSize : recHdrSize+dl : recHdrSize+dl]
	l.Extensions = b[recHdrSize+dl : recHdrSize+dl+el : recHdrSize+dl+el]
	if dl == 0 {
		l.Data = nil
	}
	if el == 0 {
		l.Extensions = nil
	}
	l.AppendedAt = time.Time{}
	if flags&flagAppendedAt != 0 {
		l.AppendedAt = time.Unix(0, int64(at))
	}
	return n, true
}

// scanned is what parseSegment found in one segment's bytes.
type scanned struct {
	hdr  segHeader
	offs []int64 // offs[i]: offset of the record of index hdr.Base+i; offs[len-1] is the end
}

// parseSegment scans a segment image in memory (see scanSegment).
func parseSegment(b []byte, visit func(*raft.Log)) (scanned, bool, error) {
	return scanSegment(bytes.NewReader(b), int64(len(b)), visit)
}

const scanChunk = 1 << 20

// scanSegment reads a segment of size bytes from r: its header, then
// records of consecutive indexes from the header's base, stopping at the
// first record that is not valid (torn or stale bytes, zeros). ok=false:
// no valid header. With visit non-nil, each valid record is passed to it
// (its slices alias a buffer reused for the next records). It reads about
// as far as the valid records go, not the whole file.
func scanSegment(r io.ReaderAt, size int64, visit func(*raft.Log)) (s scanned, ok bool, err error) {
	var win []byte // file bytes [at, at+len(win))
	var at int64
	// get returns n bytes at off, or nil past size or on a read error.
	get := func(off, n int64) ([]byte, error) {
		if n < 0 || off+n > size {
			return nil, nil
		}
		if off >= at && off+n <= at+int64(len(win)) {
			return win[off-at : off-at+n], nil
		}
		m := min(max(n, scanChunk), size-off)
		if int64(cap(win)) < m {
			win = make([]byte, m)
		}
		win = win[:m]
		if _, err := r.ReadAt(win, off); err != nil && !errors.Is(err, io.EOF) {
			return nil, err
		}
		at = off
		return win[:n], nil
	}
	b, err := get(0, segHdrSize)
	if b == nil || err != nil {
		return s, false, err
	}
	h, ok, err := decodeSegHeader(b)
	if !ok || err != nil {
		return s, false, err
	}
	s.hdr = h
	seed := genSeed(h.Seq)
	off := int64(segHdrSize)
	s.offs = append(s.offs, off)
	want := h.Base
	var l raft.Log
	for {
		hb, err := get(off, recHdrSize)
		if err != nil {
			return s, false, err
		}
		if hb == nil {
			break
		}
		n := padded(recHdrSize + int64(binary.LittleEndian.Uint32(hb[4:])) + int64(binary.LittleEndian.Uint32(hb[8:])))
		rb, err := get(off, n)
		if err != nil {
			return s, false, err
		}
		if rb == nil {
			break
		}
		if _, ok := decodeRecord(rb, seed, want, &l); !ok {
			break
		}
		if visit != nil {
			visit(&l)
		}
		off += n
		s.offs = append(s.offs, off)
		want++
		if want == 0 { // index wrapped: nothing valid can follow
			break
		}
	}
	return s, true, nil
}

// meta is the directory's durable state outside segments (see DESIGN.md).
type meta struct {
	Counter  uint64 // bumped on every write; the valid slot with the highest wins
	First    uint64 // entries below First are deleted (0: no bound)
	MinSeq   uint64 // segments with a lower generation are deleted
	SeqLimit uint64 // every generation ever used is below SeqLimit
}

func (m meta) encode(b []byte) {
	_ = b[metaSlotSize-1]
	clear(b[:metaSlotSize])
	copy(b[0:8], metaMagic)
	binary.LittleEndian.PutUint32(b[8:], formatVersion)
	binary.LittleEndian.PutUint64(b[16:], m.Counter)
	binary.LittleEndian.PutUint64(b[24:], m.First)
	binary.LittleEndian.PutUint64(b[32:], m.MinSeq)
	binary.LittleEndian.PutUint64(b[40:], m.SeqLimit)
	binary.LittleEndian.PutUint32(b[48:], crc32.Checksum(b[:48], castagnoli))
}

func decodeMeta(b []byte) (m meta, ok bool, err error) {
	if len(b) < metaSlotSize || string(b[0:8]) != metaMagic ||
		crc32.Checksum(b[:48], castagnoli) != binary.LittleEndian.Uint32(b[48:]) {
		return m, false, nil
	}
	if v := binary.LittleEndian.Uint32(b[8:]); v != formatVersion {
		return m, false, fmt.Errorf("%w: meta format version %d, this build reads version %d", ErrFormat, v, formatVersion)
	}
	m.Counter = binary.LittleEndian.Uint64(b[16:])
	m.First = binary.LittleEndian.Uint64(b[24:])
	m.MinSeq = binary.LittleEndian.Uint64(b[32:])
	m.SeqLimit = binary.LittleEndian.Uint64(b[40:])
	return m, true, nil
}
