package nbdfront

// Wire constants and pure (I/O free) encoders and decoders of the NBD
// protocol, as described in doc/proto.md of github.com/NetworkBlockDevice/nbd.
// Everything here is safe for concurrent use and suitable for fuzzing.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"
)

// Magic numbers.
const (
	magicNBD             uint64 = 0x4e42444d41474943 // "NBDMAGIC", also INIT_PASSWD
	magicOption          uint64 = 0x49484156454f5054 // "IHAVEOPT"
	magicOptionReply     uint64 = 0x0003e889045565a9
	magicRequest         uint32 = 0x25609513
	magicSimpleReply     uint32 = 0x67446698
	magicStructuredReply uint32 = 0x668e33ef
)

// Handshake flags (server, 16 bits).
const (
	hsFlagFixedNewstyle uint16 = 1 << 0
	hsFlagNoZeroes      uint16 = 1 << 1
)

// Client flags (32 bits).
const (
	clientFlagFixedNewstyle uint32 = 1 << 0
	clientFlagNoZeroes      uint32 = 1 << 1
	clientFlagsKnown               = clientFlagFixedNewstyle | clientFlagNoZeroes
)

// Transmission flags (16 bits).
const (
	tFlagHasFlags        uint16 = 1 << 0
	tFlagReadOnly        uint16 = 1 << 1
	tFlagSendFlush       uint16 = 1 << 2
	tFlagSendFUA         uint16 = 1 << 3
	tFlagRotational      uint16 = 1 << 4
	tFlagSendTrim        uint16 = 1 << 5
	tFlagSendWriteZeroes uint16 = 1 << 6
	tFlagSendDF          uint16 = 1 << 7
	tFlagCanMultiConn    uint16 = 1 << 8
	tFlagSendResize      uint16 = 1 << 9
	tFlagSendCache       uint16 = 1 << 10
	tFlagSendFastZero    uint16 = 1 << 11
)

// Option types.
const (
	optExportName      uint32 = 1
	optAbort           uint32 = 2
	optList            uint32 = 3
	optPeekExport      uint32 = 4
	optStartTLS        uint32 = 5
	optInfo            uint32 = 6
	optGo              uint32 = 7
	optStructuredReply uint32 = 8
	optListMetaContext uint32 = 9
	optSetMetaContext  uint32 = 10
	optExtendedHeaders uint32 = 11
)

// Option reply types.
const (
	repAck              uint32 = 1
	repServer           uint32 = 2
	repInfo             uint32 = 3
	repMetaContext      uint32 = 4
	repErrBit           uint32 = 1 << 31
	repErrUnsup         uint32 = repErrBit | 1
	repErrPolicy        uint32 = repErrBit | 2
	repErrInvalid       uint32 = repErrBit | 3
	repErrPlatform      uint32 = repErrBit | 4
	repErrTLSReqd       uint32 = repErrBit | 5
	repErrUnknown       uint32 = repErrBit | 6
	repErrShutdown      uint32 = repErrBit | 7
	repErrBlockSizeReqd uint32 = repErrBit | 8
	repErrTooBig        uint32 = repErrBit | 9
)

// NBD_INFO types used in NBD_REP_INFO replies.
const (
	infoExport      uint16 = 0
	infoName        uint16 = 1
	infoDescription uint16 = 2
	infoBlockSize   uint16 = 3
)

// Command types.
const (
	cmdRead        uint16 = 0
	cmdWrite       uint16 = 1
	cmdDisc        uint16 = 2
	cmdFlush       uint16 = 3
	cmdTrim        uint16 = 4
	cmdCache       uint16 = 5
	cmdWriteZeroes uint16 = 6
	cmdBlockStatus uint16 = 7
)

// Command flags.
const (
	cmdFlagFUA      uint16 = 1 << 0
	cmdFlagNoHole   uint16 = 1 << 1
	cmdFlagDF       uint16 = 1 << 2
	cmdFlagReqOne   uint16 = 1 << 3
	cmdFlagFastZero uint16 = 1 << 4
)

// Structured reply flags and chunk types.
const (
	replyFlagDone        uint16 = 1 << 0
	replyTypeNone        uint16 = 0
	replyTypeOffsetData  uint16 = 1
	replyTypeOffsetHole  uint16 = 2
	replyTypeBlockStatus uint16 = 5
	replyTypeError       uint16 = 1<<15 | 1
	replyTypeErrorOffset uint16 = 1<<15 | 2
)

// base:allocation status flags.
const (
	stateHole uint32 = 1 << 0
	stateZero uint32 = 1 << 1
)

// Metadata context names.
const (
	metaBaseNamespace  = "base:"
	metaBaseAllocation = "base:allocation"
)

// Fixed sizes of wire messages, in bytes.
const (
	greetingLen         = 8 + 8 + 2             // NBDMAGIC, IHAVEOPT, handshake flags
	optionHeaderLen     = 8 + 4 + 4             // magic, option, length
	optionReplyLen      = 8 + 4 + 4 + 4         // magic, option, reply type, length
	exportNameReplyLen  = 8 + 2                 // size, transmission flags (+124 zeroes unless NO_ZEROES)
	exportNamePadding   = 124                   // zeroes after NBD_OPT_EXPORT_NAME reply
	requestHeaderLen    = 4 + 2 + 2 + 8 + 8 + 4 // magic, flags, type, cookie, offset, length
	simpleReplyLen      = 4 + 4 + 8             // magic, error, cookie
	structuredHeaderLen = 4 + 2 + 2 + 8 + 4     // magic, flags, type, cookie, length
)

// maxStringLen is the protocol's hard limit on strings (export names,
// error messages, metadata context names).
const maxStringLen = 4096

var (
	errBadMagic  = errors.New("nbd: bad magic")
	errMalformed = errors.New("nbd: malformed option data")
)

// optionHeader is the fixed part of a client option request.
type optionHeader struct {
	Option uint32
	Length uint32 // length of the option data that follows
}

// parseOptionHeader decodes a client option header. b must hold
// optionHeaderLen bytes.
func parseOptionHeader(b []byte) (optionHeader, error) {
	if len(b) != optionHeaderLen {
		return optionHeader{}, fmt.Errorf("option header: %d bytes: %w", len(b), errMalformed)
	}
	if m := binary.BigEndian.Uint64(b[0:8]); m != magicOption {
		return optionHeader{}, fmt.Errorf("option header magic %#x: %w", m, errBadMagic)
	}
	return optionHeader{
		Option: binary.BigEndian.Uint32(b[8:12]),
		Length: binary.BigEndian.Uint32(b[12:16]),
	}, nil
}

// request is a decoded transmission request header.
type request struct {
	Flags  uint16
	Type   uint16
	Cookie uint64
	Offset uint64
	Length uint32
}

// parseRequestHeader decodes a transmission request header. b must hold
// requestHeaderLen bytes.
func parseRequestHeader(b []byte) (request, error) {
	if len(b) != requestHeaderLen {
		return request{}, fmt.Errorf("request header: %d bytes: %w", len(b), errMalformed)
	}
	if m := binary.BigEndian.Uint32(b[0:4]); m != magicRequest {
		return request{}, fmt.Errorf("request magic %#x: %w", m, errBadMagic)
	}
	return request{
		Flags:  binary.BigEndian.Uint16(b[4:6]),
		Type:   binary.BigEndian.Uint16(b[6:8]),
		Cookie: binary.BigEndian.Uint64(b[8:16]),
		Offset: binary.BigEndian.Uint64(b[16:24]),
		Length: binary.BigEndian.Uint32(b[24:28]),
	}, nil
}

// infoRequest is the data of NBD_OPT_INFO and NBD_OPT_GO.
type infoRequest struct {
	Name  string
	Infos []uint16 // requested NBD_INFO types, in client order
}

// parseInfoRequest decodes the data of NBD_OPT_INFO / NBD_OPT_GO:
// u32 name length, name, u16 count, count × u16 info type. The data must be
// consumed exactly.
func parseInfoRequest(data []byte) (infoRequest, error) {
	d := decoder{b: data}
	name, ok := d.string32()
	if !ok {
		return infoRequest{}, fmt.Errorf("export name: %w", errMalformed)
	}
	n, ok := d.u16()
	if !ok {
		return infoRequest{}, fmt.Errorf("info request count: %w", errMalformed)
	}
	if len(d.b) != 2*int(n) {
		return infoRequest{}, fmt.Errorf("%d info requests in %d bytes: %w", n, len(d.b), errMalformed)
	}
	infos := make([]uint16, n)
	for i := range infos {
		infos[i], _ = d.u16()
	}
	return infoRequest{Name: name, Infos: infos}, nil
}

// metaRequest is the data of NBD_OPT_LIST_META_CONTEXT and
// NBD_OPT_SET_META_CONTEXT.
type metaRequest struct {
	Name    string
	Queries []string
}

// parseMetaRequest decodes the data of NBD_OPT_{LIST,SET}_META_CONTEXT:
// u32 name length, name, u32 query count, then per query u32 length and
// string. The data must be consumed exactly. Queries must be at most
// maxStringLen bytes and contain a namespace colon.
func parseMetaRequest(data []byte) (metaRequest, error) {
	d := decoder{b: data}
	name, ok := d.string32()
	if !ok {
		return metaRequest{}, fmt.Errorf("export name: %w", errMalformed)
	}
	n, ok := d.u32()
	if !ok {
		return metaRequest{}, fmt.Errorf("query count: %w", errMalformed)
	}
	// Each query needs at least 4 bytes, which bounds the allocation by
	// the (already bounded) option length rather than the client's count.
	if uint64(n) > uint64(len(d.b)/4) {
		return metaRequest{}, fmt.Errorf("%d queries in %d bytes: %w", n, len(d.b), errMalformed)
	}
	queries := make([]string, 0, n)
	for i := uint32(0); i < n; i++ {
		q, ok := d.string32()
		if !ok {
			return metaRequest{}, fmt.Errorf("query %d: %w", i, errMalformed)
		}
		if len(q) > maxStringLen || !strings.Contains(q, ":") {
			return metaRequest{}, fmt.Errorf("query %q: %w", truncate(q, 64), errMalformed)
		}
		queries = append(queries, q)
	}
	if len(d.b) != 0 {
		return metaRequest{}, fmt.Errorf("%d trailing bytes: %w", len(d.b), errMalformed)
	}
	return metaRequest{Name: name, Queries: queries}, nil
}

// decoder reads big-endian fields from a byte slice.
type decoder struct{ b []byte }

func (d *decoder) u16() (uint16, bool) {
	if len(d.b) < 2 {
		return 0, false
	}
	v := binary.BigEndian.Uint16(d.b)
	d.b = d.b[2:]
	return v, true
}

func (d *decoder) u32() (uint32, bool) {
	if len(d.b) < 4 {
		return 0, false
	}
	v := binary.BigEndian.Uint32(d.b)
	d.b = d.b[4:]
	return v, true
}

// string32 reads a u32 length followed by that many bytes. Names longer
// than maxStringLen are rejected.
func (d *decoder) string32() (string, bool) {
	n, ok := d.u32()
	if !ok || uint64(n) > uint64(len(d.b)) || n > maxStringLen {
		return "", false
	}
	s := string(d.b[:n])
	d.b = d.b[n:]
	return s, true
}

// appendOptionReply appends an option reply header announcing length bytes
// of reply data.
func appendOptionReply(b []byte, opt, typ uint32, length int) []byte {
	b = binary.BigEndian.AppendUint64(b, magicOptionReply)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, typ)
	return binary.BigEndian.AppendUint32(b, uint32(length))
}

// appendSimpleReply appends a simple reply header.
func appendSimpleReply(b []byte, errno uint32, cookie uint64) []byte {
	b = binary.BigEndian.AppendUint32(b, magicSimpleReply)
	b = binary.BigEndian.AppendUint32(b, errno)
	return binary.BigEndian.AppendUint64(b, cookie)
}

// appendChunkHeader appends a structured reply chunk header announcing
// length bytes of chunk payload.
func appendChunkHeader(b []byte, flags, typ uint16, cookie uint64, length int) []byte {
	b = binary.BigEndian.AppendUint32(b, magicStructuredReply)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	return binary.BigEndian.AppendUint32(b, uint32(length))
}

// sanitizeString makes s a valid protocol string: valid UTF-8, no NUL,
// at most max bytes (cut at a rune boundary).
func sanitizeString(s string, max int) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	s = strings.ReplaceAll(s, "\x00", "")
	return truncate(s, max)
}

// truncate cuts s to at most max bytes without splitting a UTF-8 sequence
// (if s is valid UTF-8).
func truncate(s string, max int) string {
	if len(s) <= max {
		return s
	}
	i := max
	for i > 0 && !utf8.RuneStart(s[i]) {
		i--
	}
	return s[:i]
}
