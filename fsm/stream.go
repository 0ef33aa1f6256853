package fsm

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"

	"github.com/robib/robib/volume"
)

// Snapshot stream format (versions 1 and 2).
//
//	magic "robibsnp" (8 bytes), then records:
//	type 1 byte | payload length 4 bytes LE | payload | crc32c 4 bytes LE
//
// The CRC (Castagnoli) covers type, length and payload. Record types:
//
//	header  version 1 byte, kind 1 byte, snapshot index 8 bytes LE
//	state   a stateImage (encodeState): applied index, volumes, sessions
//	base    (version 2 only) base index 8 bytes LE, count uv, then per
//	        volume of the state its keep end uv: the stream's keep records
//	        of volume i end at or below keep end i, and one ends exactly
//	        there (0: the volume has none)
//	volume  index uv, name str: the following records cover volume i
//	data    up to 1 MiB of volume bytes at the current offset
//	zero    length 8 bytes LE: that many zero bytes at the current offset
//	keep    (version 2 only) length 8 bytes LE: the receiver keeps its own
//	        bytes for that many bytes at the current offset
//	end     record count 8 bytes LE (records before this one),
//	        fuzzy-until index 8 bytes LE
//
// A "state" stream (kind 1, always version 1) is header, state, end: what
// FSMSnapshot.Persist writes and what a local snapshot stores. A "full"
// stream (kind 2) is header, state, (version 2: base), then for every
// volume of the state in order a volume record followed by data, zero (and,
// version 2, keep) records that cover [0, size) exactly, in order, then
// end. Nothing may follow the end record. The header's snapshot index is
// raft's index of the snapshot (0 in a state stream, where the store keeps
// it in its metadata).
//
// Version 2 is the "thin" full stream (a catch-up against the receiver's
// base, see CatchUpBase and DESIGN.md, "Catch-up proportional to what
// changed"). Its base index is below the snapshot index. A writer writes
// version 2 only for a stream that has a keep record, so a stream planned
// without a base is byte for byte a version 1 stream, which older builds
// read.
const (
	streamMagic     = "robibsnp"
	streamVersion   = 2 // the newest stream version this build reads (and writes, for thin streams)
	streamVersionV1 = 1 // every state stream and every full stream without keep records

	kindState byte = 1
	kindFull  byte = 2

	recHeader byte = 1
	recState  byte = 2
	recVolume byte = 3
	recData   byte = 4
	recZero   byte = 5
	recEnd    byte = 6
	recKeep   byte = 7
	recBase   byte = 8

	recOverhead     = 9 // type, length, crc
	headerPayload   = 10
	endPayload      = 16
	zeroPayload     = 8
	keepPayload     = 8
	baseFixed       = 8       // base index, before the keep ends
	streamChunk     = 1 << 20 // data record size and restore granularity
	maxStatePayload = maxStateFileBytes
)

// errCorruptStream is wrapped by every failure to parse a snapshot stream.
var errCorruptStream = errors.New("corrupt snapshot stream")

func corruptf(format string, args ...any) error {
	return fmt.Errorf("%w: %s", errCorruptStream, fmt.Sprintf(format, args...))
}

// streamHeader is the header record, and in a version 2 stream the base
// record that follows the state record.
type streamHeader struct {
	Version byte // 0 is written as streamVersionV1
	Kind    byte
	Index   uint64      // raft snapshot index (full streams)
	Base    *streamBase // version 2 only
}

// version is the stream version h is written as.
func (h streamHeader) version() byte {
	if h.Version == 0 {
		return streamVersionV1
	}
	return h.Version
}

// streamBase is the base record of a version 2 (thin) stream: the keep
// records assume that each receiver byte of a kept range holds its
// replicated value at Index or a value a later entry gave it.
type streamBase struct {
	Index   uint64
	KeepEnd []int64 // per volume of the state: where its last keep record ends (0: none)
}

// streamEnd is the end record.
type streamEnd struct {
	Records    uint64 // records before the end record
	FuzzyUntil uint64 // the image may hold effects of entries below this index
}

// appendRecord appends one record with payload to b.
func appendRecord(b []byte, typ byte, payload []byte) []byte {
	start := len(b)
	b = append(b, typ)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(payload)))
	b = append(b, payload...)
	return binary.LittleEndian.AppendUint32(b, crc32.Checksum(b[start:], castagnoli))
}

func headerRecordPayload(h streamHeader) []byte {
	p := []byte{h.version(), h.Kind}
	return binary.LittleEndian.AppendUint64(p, h.Index)
}

func baseRecordPayload(b *streamBase) []byte {
	e := encoder{buf: binary.LittleEndian.AppendUint64(nil, b.Index)}
	e.uvarint(uint64(len(b.KeepEnd)))
	for _, k := range b.KeepEnd {
		e.uvarint(uint64(k))
	}
	return e.buf
}

// decodeBase decodes a base record for the volumes of img and checks it
// against the header: base index below the snapshot index, one keep end
// per volume, each within its volume.
func decodeBase(p []byte, h streamHeader, img *stateImage) (*streamBase, error) {
	if len(p) < baseFixed {
		return nil, corruptf("base record of %d bytes", len(p))
	}
	b := &streamBase{Index: binary.LittleEndian.Uint64(p)}
	if b.Index >= h.Index {
		return nil, corruptf("base index %d is not below the snapshot index %d", b.Index, h.Index)
	}
	d := decoder{buf: p[baseFixed:], kind: errCorruptStream}
	n := d.uvarint()
	if d.err == nil && n != uint64(len(img.Volumes)) {
		return nil, corruptf("base record for %d volumes, the state has %d", n, len(img.Volumes))
	}
	b.KeepEnd = make([]int64, 0, len(img.Volumes))
	for i := 0; i < len(img.Volumes) && d.err == nil; i++ {
		k := d.int64("keep end")
		if d.err == nil && k > img.Volumes[i].Size {
			return nil, corruptf("keep end %d in volume %q of size %d", k, img.Volumes[i].Name, img.Volumes[i].Size)
		}
		b.KeepEnd = append(b.KeepEnd, k)
	}
	if d.err != nil {
		return nil, d.err
	}
	if d.remaining() != 0 {
		return nil, corruptf("%d bytes after the base record's keep ends", d.remaining())
	}
	return b, nil
}

func endRecordPayload(e streamEnd) []byte {
	p := binary.LittleEndian.AppendUint64(nil, e.Records)
	return binary.LittleEndian.AppendUint64(p, e.FuzzyUntil)
}

func volumeRecordPayload(i int, name string) []byte {
	var e encoder
	e.uvarint(uint64(i))
	e.string(name)
	return e.buf
}

// encodeStateStream returns the complete state stream for img.
func encodeStateStream(img *stateImage) []byte {
	state := encodeState(img)
	b := make([]byte, 0, len(streamMagic)+3*recOverhead+headerPayload+len(state)+endPayload)
	b = append(b, streamMagic...)
	b = appendRecord(b, recHeader, headerRecordPayload(streamHeader{Kind: kindState}))
	b = appendRecord(b, recState, state)
	return appendRecord(b, recEnd, endRecordPayload(streamEnd{Records: 2}))
}

// recordReader reads records. Payloads are valid until the next call.
type recordReader struct {
	r       *bufio.Reader
	buf     []byte
	records uint64 // records read so far
}

func newRecordReader(r io.Reader) *recordReader {
	return &recordReader{r: bufio.NewReaderSize(r, 256<<10)}
}

// readMagic checks the stream magic.
func (rr *recordReader) readMagic() error {
	var m [len(streamMagic)]byte
	if _, err := io.ReadFull(rr.r, m[:]); err != nil {
		return corruptf("reading magic: %v", err)
	}
	if string(m[:]) != streamMagic {
		return corruptf("bad magic %q", m[:])
	}
	return nil
}

// maxPayload is the largest payload a record of type typ may have; 0 means
// the type is unknown.
func maxPayload(typ byte) int {
	switch typ {
	case recHeader:
		return headerPayload
	case recState:
		return maxStatePayload
	case recVolume:
		return 2*binary.MaxVarintLen64 + 64
	case recData:
		return streamChunk
	case recZero:
		return zeroPayload
	case recKeep:
		return keepPayload
	case recBase:
		return maxStatePayload
	case recEnd:
		return endPayload
	}
	return 0
}

// next reads one record. The payload length is checked against the type's
// limit before anything is allocated.
func (rr *recordReader) next() (byte, []byte, error) {
	var hdr [5]byte
	if _, err := io.ReadFull(rr.r, hdr[:]); err != nil {
		return 0, nil, corruptf("record %d: reading header: %v", rr.records, err)
	}
	typ, n := hdr[0], binary.LittleEndian.Uint32(hdr[1:])
	limit := maxPayload(typ)
	if limit == 0 {
		return 0, nil, corruptf("record %d: unknown type %d", rr.records, typ)
	}
	if int64(n) > int64(limit) {
		return 0, nil, corruptf("record %d: type %d payload of %d bytes exceeds %d", rr.records, typ, n, limit)
	}
	if cap(rr.buf) < int(n)+4 {
		rr.buf = make([]byte, int(n)+4)
	}
	b := rr.buf[:int(n)+4]
	if _, err := io.ReadFull(rr.r, b); err != nil {
		return 0, nil, corruptf("record %d: reading %d payload bytes: %v", rr.records, n, err)
	}
	payload := b[:n]
	crc := crc32.Update(crc32.Checksum(hdr[:], castagnoli), castagnoli, payload)
	if got := binary.LittleEndian.Uint32(b[n:]); got != crc {
		return 0, nil, corruptf("record %d: checksum mismatch: stored %08x, computed %08x", rr.records, got, crc)
	}
	rr.records++
	return typ, payload, nil
}

// expect reads one record that must be of type typ.
func (rr *recordReader) expect(typ byte) ([]byte, error) {
	t, p, err := rr.next()
	if err != nil {
		return nil, err
	}
	if t != typ {
		return nil, corruptf("record %d: type %d, want %d", rr.records-1, t, typ)
	}
	return p, nil
}

// readPrologue reads magic, header and state record.
func (rr *recordReader) readPrologue() (streamHeader, *stateImage, error) {
	var h streamHeader
	if err := rr.readMagic(); err != nil {
		return h, nil, err
	}
	p, err := rr.expect(recHeader)
	if err != nil {
		return h, nil, err
	}
	if len(p) != headerPayload {
		return h, nil, corruptf("header of %d bytes", len(p))
	}
	if p[0] != streamVersionV1 && p[0] != streamVersion {
		return h, nil, corruptf("unsupported stream version %d (this build reads %d to %d)", p[0], streamVersionV1, streamVersion)
	}
	h.Version, h.Kind, h.Index = p[0], p[1], binary.LittleEndian.Uint64(p[2:])
	if h.Kind != kindState && h.Kind != kindFull {
		return h, nil, corruptf("unknown stream kind %d", h.Kind)
	}
	if h.Version != streamVersionV1 && h.Kind != kindFull {
		return h, nil, corruptf("stream version %d of kind %d (only full streams are thin)", h.Version, h.Kind)
	}
	if p, err = rr.expect(recState); err != nil {
		return h, nil, err
	}
	img, err := decodeState(p)
	if err != nil {
		return h, nil, fmt.Errorf("%w: %w", errCorruptStream, err)
	}
	if img.Restoring || img.FuzzyUntil != 0 {
		return h, nil, corruptf("state record carries local-only fields")
	}
	if h.Version == streamVersion {
		if p, err = rr.expect(recBase); err != nil {
			return h, nil, err
		}
		if h.Base, err = decodeBase(p, h, img); err != nil {
			return h, nil, err
		}
	}
	return h, img, nil
}

// readEpilogue reads the end record and checks that nothing follows it.
func (rr *recordReader) readEpilogue() (streamEnd, error) {
	var e streamEnd
	p, err := rr.expect(recEnd)
	if err != nil {
		return e, err
	}
	if len(p) != endPayload {
		return e, corruptf("end record of %d bytes", len(p))
	}
	e.Records, e.FuzzyUntil = binary.LittleEndian.Uint64(p), binary.LittleEndian.Uint64(p[8:])
	if e.Records != rr.records-1 {
		return e, corruptf("end record counts %d records, read %d", e.Records, rr.records-1)
	}
	if _, err := rr.r.ReadByte(); err != io.EOF {
		if err == nil {
			return e, corruptf("data after the end record")
		}
		return e, corruptf("after the end record: %v", err)
	}
	return e, nil
}

// imageSink receives the volume contents of a full stream. Offsets are
// relative to the current volume.
type imageSink interface {
	volume(i int, m volume.Meta) error
	data(off int64, p []byte) error
	zero(off, n int64) error
	keep(off, n int64) error
}

// readImage reads the volume records of a full stream for the volumes of
// img, checking that they cover every volume exactly and in order (keep
// records only in a version 2 stream, where those of each volume must end
// exactly at the base record's keep end), and passes them to sink (nil:
// only validate).
func (rr *recordReader) readImage(h streamHeader, img *stateImage, sink imageSink) error {
	for i, m := range img.Volumes {
		p, err := rr.expect(recVolume)
		if err != nil {
			return err
		}
		d := decoder{buf: p, kind: errCorruptStream}
		idx := d.uvarint()
		name := d.str()
		if d.err != nil || d.remaining() != 0 || idx != uint64(i) || string(name) != m.Name {
			return corruptf("volume record %q (#%d), want %q (#%d)", name, idx, m.Name, i)
		}
		if sink != nil {
			if err := sink.volume(i, m); err != nil {
				return err
			}
		}
		var keepEnd, keptUpTo int64 // declared by the base record; reached by keep records
		if h.Base != nil {
			keepEnd = h.Base.KeepEnd[i]
		}
		for off := int64(0); off < m.Size; {
			typ, p, err := rr.next()
			if err != nil {
				return err
			}
			var n int64
			switch typ {
			case recData:
				n = int64(len(p))
			case recZero, recKeep:
				if typ == recKeep && h.Base == nil {
					return corruptf("keep record in a version %d stream", h.version())
				}
				if len(p) != zeroPayload {
					return corruptf("run record (type %d) of %d bytes", typ, len(p))
				}
				u := binary.LittleEndian.Uint64(p)
				if u > uint64(m.Size) {
					return corruptf("run (type %d) of %d bytes in volume %q of size %d", typ, u, m.Name, m.Size)
				}
				n = int64(u)
			default:
				return corruptf("record type %d inside volume %q", typ, m.Name)
			}
			if n == 0 || n > m.Size-off {
				return corruptf("record of %d bytes at %d in volume %q of size %d", n, off, m.Name, m.Size)
			}
			if typ == recKeep {
				if off+n > keepEnd {
					return corruptf("keep run [%d, +%d) in volume %q past its keep end %d", off, n, m.Name, keepEnd)
				}
				keptUpTo = off + n
			}
			if sink != nil {
				switch typ {
				case recData:
					err = sink.data(off, p)
				case recZero:
					err = sink.zero(off, n)
				case recKeep:
					err = sink.keep(off, n)
				}
				if err != nil {
					return err
				}
			}
			off += n
		}
		if keptUpTo != keepEnd {
			return corruptf("keep records of volume %q end at %d, the base record says %d", m.Name, keptUpTo, keepEnd)
		}
	}
	return nil
}

// validateStream reads a whole stream of either kind and reports whether it
// is well-formed.
func validateStream(r io.Reader) (streamHeader, *stateImage, error) {
	rr := newRecordReader(r)
	h, img, err := rr.readPrologue()
	if err != nil {
		return h, nil, err
	}
	if h.Kind == kindFull {
		if err := rr.readImage(h, img, nil); err != nil {
			return h, nil, err
		}
	}
	if _, err := rr.readEpilogue(); err != nil {
		return h, nil, err
	}
	return h, img, nil
}
