package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

// Frame layout (DESIGN.md, "Frame format"): a 32-byte header, then the
// metadata section, then the payload section (every Log's Data and
// Extensions, in entry order).
const (
	headerSize = 32
	// Version is the frame format version this package speaks.
	Version = 1
	// DefaultMaxFrame is the default cap on a frame's body (metadata +
	// payload): 64 MiB of entries plus room for their metadata.
	DefaultMaxFrame = 64<<20 + 1<<20

	flagPayloadCRC = 1 << 0
	knownFlags     = flagPayloadCRC

	// nilLen is the length written for a nil byte slice or entry list, to
	// keep nil and empty apart.
	nilLen = 0xFFFFFFFF
)

// magic opens every frame; with the version after it, these 6 bytes are
// the same in every version of the format.
var magic = [4]byte{'R', 'B', 'W', 'F'}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Frame kinds. A response's kind is its request's with respFlag set.
const (
	kindAppendEntries  uint8 = 1
	kindRequestVote    uint8 = 2
	kindInstallSnap    uint8 = 3
	kindTimeoutNow     uint8 = 4
	kindRequestPreVote uint8 = 5
	kindReject         uint8 = 0x7F
	respFlag           uint8 = 0x80
)

func knownKind(k uint8) bool {
	switch k &^ respFlag {
	case kindAppendEntries, kindRequestVote, kindInstallSnap, kindTimeoutNow, kindRequestPreVote:
		return true
	}
	return k == kindReject
}

// header is the decoded fixed header of a frame.
type header struct {
	version    uint16
	kind       uint8
	flags      uint8
	metaLen    uint32
	payloadLen uint32
	metaCRC    uint32
	payloadCRC uint32
}

func (h *header) put(b []byte) {
	copy(b[0:4], magic[:])
	binary.LittleEndian.PutUint16(b[4:], h.version)
	b[6] = h.kind
	b[7] = h.flags
	binary.LittleEndian.PutUint32(b[8:], h.metaLen)
	binary.LittleEndian.PutUint32(b[12:], h.payloadLen)
	binary.LittleEndian.PutUint32(b[16:], h.metaCRC)
	binary.LittleEndian.PutUint32(b[20:], h.payloadCRC)
	binary.LittleEndian.PutUint32(b[24:], 0)
	binary.LittleEndian.PutUint32(b[28:], crc32.Checksum(b[:28], castagnoli))
}

// parseHeader checks a header in the order that keeps errors meaningful:
// magic, then version (a later version may lay the rest out differently),
// then the header checksum, then the fields.
func parseHeader(b []byte, maxFrame int) (header, error) {
	var h header
	if err := checkPrefix(b[:prefixSize]); err != nil {
		return h, err
	}
	h.version = binary.LittleEndian.Uint16(b[4:])
	if got, want := binary.LittleEndian.Uint32(b[28:]), crc32.Checksum(b[:28], castagnoli); got != want {
		return h, fmt.Errorf("%w: header crc %08x, computed %08x", ErrChecksum, got, want)
	}
	h.kind, h.flags = b[6], b[7]
	h.metaLen = binary.LittleEndian.Uint32(b[8:])
	h.payloadLen = binary.LittleEndian.Uint32(b[12:])
	h.metaCRC = binary.LittleEndian.Uint32(b[16:])
	h.payloadCRC = binary.LittleEndian.Uint32(b[20:])
	if !knownKind(h.kind) {
		return h, fmt.Errorf("%w: unknown kind 0x%02x", ErrMalformed, h.kind)
	}
	if h.flags&^knownFlags != 0 {
		return h, fmt.Errorf("%w: unknown flags 0x%02x", ErrMalformed, h.flags)
	}
	if h.flags&flagPayloadCRC == 0 && h.payloadCRC != 0 {
		return h, fmt.Errorf("%w: payload crc set without its flag", ErrMalformed)
	}
	if r := binary.LittleEndian.Uint32(b[24:]); r != 0 {
		return h, fmt.Errorf("%w: reserved header field %08x", ErrMalformed, r)
	}
	if size := uint64(h.metaLen) + uint64(h.payloadLen); size > uint64(maxFrame) {
		return h, fmt.Errorf("%w: body of %d bytes, limit %d", ErrTooLarge, size, maxFrame)
	}
	return h, nil
}

// prefixSize is the part of the header that is the same in every version:
// magic and version.
const prefixSize = 6

// checkPrefix checks the magic of b (at least 4 bytes) and, if b holds
// it, the version.
func checkPrefix(b []byte) error {
	if [4]byte(b[0:4]) != magic {
		return fmt.Errorf("%w: first bytes %x", ErrMagic, b[0:4])
	}
	if len(b) >= prefixSize {
		if v := binary.LittleEndian.Uint16(b[4:]); v != Version {
			return fmt.Errorf("%w: peer speaks version %d, this side version %d", ErrVersion, v, Version)
		}
	}
	return nil
}

// frame is a decoded frame: its header and its body (metadata then
// payload) in one buffer that the decoded message slices into.
type frame struct {
	header
	body []byte
}

func (f *frame) meta() []byte    { return f.body[:f.metaLen] }
func (f *frame) payload() []byte { return f.body[f.metaLen:] }

// readBody reads and checks the body announced by h: one allocation, one
// read into it, then the checksums.
func readBody(r io.Reader, h header) (frame, error) {
	f := frame{header: h, body: make([]byte, int(h.metaLen)+int(h.payloadLen))}
	if _, err := io.ReadFull(r, f.body); err != nil {
		return f, truncated(err, "body")
	}
	return f, f.check()
}

// check verifies the body's checksums.
func (f *frame) check() error {
	if got := crc32.Checksum(f.meta(), castagnoli); got != f.metaCRC {
		return fmt.Errorf("%w: metadata crc %08x, computed %08x", ErrChecksum, f.metaCRC, got)
	}
	if f.flags&flagPayloadCRC != 0 {
		if got := crc32.Checksum(f.payload(), castagnoli); got != f.payloadCRC {
			return fmt.Errorf("%w: payload crc %08x, computed %08x", ErrChecksum, f.payloadCRC, got)
		}
	}
	return nil
}

// decodeFrame parses a whole frame held in b (tests and fuzzing; the
// transport reads from a connection with parseHeader and readBody). The
// frame's body aliases b.
func decodeFrame(b []byte, maxFrame int) (frame, error) {
	if len(b) < headerSize {
		return frame{}, fmt.Errorf("%w: %d bytes, header needs %d", ErrTruncated, len(b), headerSize)
	}
	h, err := parseHeader(b[:headerSize], maxFrame)
	if err != nil {
		return frame{}, err
	}
	rest, size := b[headerSize:], uint64(h.metaLen)+uint64(h.payloadLen)
	if uint64(len(rest)) < size {
		return frame{}, fmt.Errorf("%w: body of %d bytes, header says %d", ErrTruncated, len(rest), size)
	}
	if uint64(len(rest)) > size {
		return frame{}, fmt.Errorf("%w: %d bytes after the frame", ErrMalformed, uint64(len(rest))-size)
	}
	f := frame{header: h, body: rest}
	return f, f.check()
}

// readHeader fills hdr, of which the first n bytes are already read. It
// checks magic and version as soon as it has them, so that a stranger is
// told at once, not after the rest of a header it may never send. A
// clean EOF before the first byte is io.EOF (a peer closing between
// frames); an EOF after it is ErrTruncated.
func readHeader(r io.Reader, hdr *[headerSize]byte, n int) error {
	if n < prefixSize {
		m, err := io.ReadFull(r, hdr[n:prefixSize])
		n += m
		if err != nil {
			return headerErr(hdr[:n], err)
		}
	}
	if err := checkPrefix(hdr[:prefixSize]); err != nil {
		return err
	}
	if m, err := io.ReadFull(r, hdr[n:]); err != nil {
		return headerErr(hdr[:n+m], err)
	}
	return nil
}

func headerErr(got []byte, err error) error {
	if len(got) >= len(magic) {
		if e := checkPrefix(got); e != nil {
			return e
		}
	}
	if len(got) == 0 && errors.Is(err, io.EOF) {
		return io.EOF
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("%w: connection ended inside a frame header (%d of %d bytes)", ErrTruncated, len(got), headerSize)
	}
	return err
}

// truncated turns an EOF inside a frame's body into ErrTruncated.
func truncated(err error, what string) error {
	if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		return fmt.Errorf("%w: connection ended inside the frame %s", ErrTruncated, what)
	}
	return err
}
