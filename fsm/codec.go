package fsm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math"

	"github.com/robib/robib/volume"
)

// Command wire format (version 1). Every raft log entry of robib is one
// encoded Command:
//
//	magic    1 byte  0xB7
//	version  1 byte  1
//	type     1 byte  cmdCreate .. cmdVerify
//	body     type-specific, see below
//	crc32c   4 bytes little endian, Castagnoli CRC of everything before it
//
// Body fields are, in order (uv = unsigned LEB128 varint in its shortest
// form, sv = zigzag varint, str = uv length + bytes):
//
//	CreateVolume  name str, size uv, blockSize uv, created sv,
//	              flags 1 byte (bit 0 SyncWrites)
//	DeleteVolume  name str
//	ResizeVolume  name str, size uv
//	WriteBatch    volume str, session uv, seq uv, epoch uv, count uv,
//	              count × op: kind 1 byte, flags 1 byte (bit 0 NoHole),
//	              off uv, len uv, then len bytes of data for OpWrite
//	EndSession    session uv
//	VerifyChunks  id str, volume str, off uv, len uv, chunkSize uv
//	AcquireLease  volume str, site str, created sv, prev uv
//	ReleaseLease  volume str, site str, epoch uv
//	SetClusterID  id str (see CheckClusterID)
//
// Signed fields that must not be negative (sizes, offsets, lengths) are
// sent as uv and must be <= math.MaxInt64. The encoding of a command is
// canonical: Decode accepts exactly the bytes Encode produces, so
// Encode(Decode(b)) == b for every b that decodes.
//
// A new format version must not be proposed until every site runs a build
// that decodes it: a site that cannot decode an entry rejects it with
// ErrUnsupportedVersion while the others apply it, and the sites diverge.
const (
	codecMagic   byte = 0xB7
	codecVersion byte = 1

	codecHeaderLen  = 3 // magic, version, type
	codecTrailerLen = 4 // crc32c

	cmdCreate     byte = 1
	cmdDelete     byte = 2
	cmdResize     byte = 3
	cmdWriteBatch byte = 4
	cmdEndSession byte = 5
	cmdVerify     byte = 6
	cmdAcquire    byte = 7
	cmdRelease    byte = 8
	cmdClusterID  byte = 9

	opFlagNoHole byte = 1

	createFlagSyncWrites byte = 1

	// minOpLen is the smallest encoding of an op (kind, flags, off, len).
	minOpLen = 4
	// maxIDLen bounds VerifyChunks.ID.
	maxIDLen = 128
	// maxSiteLen bounds the site names in lease commands.
	maxSiteLen = 63
	// MaxClusterIDLen bounds a cluster ID.
	MaxClusterIDLen = 64
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Encode returns the wire encoding of cmd. It fails, with an error wrapping
// ErrBadCommand, for a nil or unknown command and for anything Decode would
// reject (invalid names, negative or overflowing offsets and lengths, bad op
// kinds, NoHole on a non-zero op, Len != len(Data) for writes, data on
// non-write ops). The result is written into one buffer of exactly the
// encoded size.
func Encode(cmd Command) ([]byte, error) {
	if err := checkCommand(cmd); err != nil {
		return nil, err
	}
	var sizer encoder
	sizer.sizing = true
	encodeCommand(&sizer, cmd)
	e := encoder{buf: make([]byte, 0, sizer.n)}
	encodeCommand(&e, cmd)
	e.buf = binary.LittleEndian.AppendUint32(e.buf, crc32.Checksum(e.buf, castagnoli))
	if len(e.buf) != sizer.n {
		// A bug in encodeCommand, not a property of cmd.
		panic(fmt.Sprintf("fsm: encoded %d bytes, sized %d", len(e.buf), sizer.n))
	}
	return e.buf, nil
}

// EncodedSize returns the length of Encode(b), so writers can keep entries
// under a size cap before proposing. It does not validate b.
func EncodedSize(b *WriteBatch) int {
	var sizer encoder
	sizer.sizing = true
	encodeCommand(&sizer, b)
	return sizer.n
}

// encoder appends the wire encoding to buf, or with sizing set only counts
// the bytes in n (including the trailer). One code path for both keeps
// EncodedSize and Encode in agreement.
type encoder struct {
	sizing bool
	n      int
	buf    []byte
}

func (e *encoder) byte(b byte) {
	if e.sizing {
		e.n++
		return
	}
	e.buf = append(e.buf, b)
}

func (e *encoder) uvarint(v uint64) {
	if e.sizing {
		e.n += uvarintLen(v)
		return
	}
	e.buf = binary.AppendUvarint(e.buf, v)
}

func (e *encoder) varint(v int64) {
	e.uvarint(uint64(v<<1) ^ uint64(v>>63)) // zigzag, as binary.PutVarint
}

func (e *encoder) bytes(b []byte) {
	if e.sizing {
		e.n += len(b)
		return
	}
	e.buf = append(e.buf, b...)
}

func (e *encoder) string(s string) {
	e.uvarint(uint64(len(s)))
	if e.sizing {
		e.n += len(s)
		return
	}
	e.buf = append(e.buf, s...)
}

// uvarintLen returns the length of the shortest uvarint encoding of v.
func uvarintLen(v uint64) int {
	n := 1
	for v >= 0x80 {
		v >>= 7
		n++
	}
	return n
}

// encodeCommand writes header and body of cmd (already checked); when
// sizing it also counts the trailer.
func encodeCommand(e *encoder, cmd Command) {
	e.byte(codecMagic)
	e.byte(codecVersion)
	switch c := cmd.(type) {
	case *CreateVolume:
		e.byte(cmdCreate)
		e.string(c.Name)
		e.uvarint(uint64(c.Size))
		e.uvarint(uint64(c.BlockSize))
		e.varint(c.Created)
		var flags byte
		if c.SyncWrites {
			flags |= createFlagSyncWrites
		}
		e.byte(flags)
	case *DeleteVolume:
		e.byte(cmdDelete)
		e.string(c.Name)
	case *ResizeVolume:
		e.byte(cmdResize)
		e.string(c.Name)
		e.uvarint(uint64(c.Size))
	case *WriteBatch:
		e.byte(cmdWriteBatch)
		e.string(c.Volume)
		e.uvarint(c.Session)
		e.uvarint(c.Seq)
		e.uvarint(c.Epoch)
		e.varint(c.Created)
		e.uvarint(uint64(len(c.Ops)))
		for i := range c.Ops {
			op := &c.Ops[i]
			e.byte(byte(op.Kind))
			var flags byte
			if op.NoHole {
				flags |= opFlagNoHole
			}
			e.byte(flags)
			e.uvarint(uint64(op.Off))
			e.uvarint(uint64(op.Len))
			if op.Kind == OpWrite {
				e.bytes(op.Data)
			}
		}
	case *EndSession:
		e.byte(cmdEndSession)
		e.uvarint(c.Session)
	case *VerifyChunks:
		e.byte(cmdVerify)
		e.string(c.ID)
		e.string(c.Volume)
		e.uvarint(uint64(c.Off))
		e.uvarint(uint64(c.Len))
		e.uvarint(uint64(c.ChunkSize))
	case *AcquireLease:
		e.byte(cmdAcquire)
		e.string(c.Volume)
		e.string(c.Site)
		e.varint(c.Created)
		e.uvarint(c.Prev)
	case *ReleaseLease:
		e.byte(cmdRelease)
		e.string(c.Volume)
		e.string(c.Site)
		e.uvarint(c.Epoch)
	case *SetClusterID:
		e.byte(cmdClusterID)
		e.string(c.ID)
	}
	if e.sizing {
		e.n += codecTrailerLen
	}
}

// badf returns an error wrapping ErrBadCommand.
func badf(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrBadCommand, fmt.Sprintf(format, args...))
}

// checkCommand applies Decode's structural rules to a command about to be
// encoded.
func checkCommand(cmd Command) error {
	checkName := func(what, name string) error {
		if err := volume.ValidateName(name); err != nil {
			return fmt.Errorf("%w: %s: %w", ErrBadCommand, what, err)
		}
		return nil
	}
	nonNeg := func(what string, v int64) error {
		if v < 0 {
			return badf("%s %d is negative", what, v)
		}
		return nil
	}
	switch c := cmd.(type) {
	case *CreateVolume:
		if c == nil {
			return badf("nil command")
		}
		if c.BlockSize < 0 || c.BlockSize > math.MaxInt32 {
			return badf("block size %d out of range", c.BlockSize)
		}
		if err := checkName("volume name", c.Name); err != nil {
			return err
		}
		return nonNeg("size", c.Size)
	case *DeleteVolume:
		if c == nil {
			return badf("nil command")
		}
		return checkName("volume name", c.Name)
	case *ResizeVolume:
		if c == nil {
			return badf("nil command")
		}
		if err := checkName("volume name", c.Name); err != nil {
			return err
		}
		return nonNeg("size", c.Size)
	case *WriteBatch:
		if c == nil {
			return badf("nil command")
		}
		if err := checkName("volume name", c.Volume); err != nil {
			return err
		}
		for i := range c.Ops {
			if err := checkOp(&c.Ops[i]); err != nil {
				return fmt.Errorf("op %d: %w", i, err)
			}
		}
		return nil
	case *EndSession:
		if c == nil {
			return badf("nil command")
		}
		return nil
	case *VerifyChunks:
		if c == nil {
			return badf("nil command")
		}
		if len(c.ID) == 0 || len(c.ID) > maxIDLen {
			return badf("verify id is %d bytes, want 1 to %d", len(c.ID), maxIDLen)
		}
		if err := checkName("volume name", c.Volume); err != nil {
			return err
		}
		if err := nonNeg("offset", c.Off); err != nil {
			return err
		}
		if err := nonNeg("length", c.Len); err != nil {
			return err
		}
		return nonNeg("chunk size", c.ChunkSize)
	case *AcquireLease:
		if c == nil {
			return badf("nil command")
		}
		if err := checkSite(c.Site); err != nil {
			return err
		}
		return checkName("volume name", c.Volume)
	case *ReleaseLease:
		if c == nil {
			return badf("nil command")
		}
		if err := checkSite(c.Site); err != nil {
			return err
		}
		return checkName("volume name", c.Volume)
	case *SetClusterID:
		if c == nil {
			return badf("nil command")
		}
		if err := CheckClusterID(c.ID); err != nil {
			return fmt.Errorf("%w: %w", ErrBadCommand, err)
		}
		return nil
	case nil:
		return badf("nil command")
	default:
		return badf("unknown command type %T", cmd)
	}
}

// checkOp checks one op's structure (not its range within a volume).
func checkOp(op *Op) error {
	switch op.Kind {
	case OpWrite:
		if op.Len != int64(len(op.Data)) {
			return badf("write length %d but %d data bytes", op.Len, len(op.Data))
		}
	case OpTrim, OpZero:
		if len(op.Data) != 0 {
			return badf("op kind %d carries %d data bytes", op.Kind, len(op.Data))
		}
	default:
		return badf("unknown op kind %d", op.Kind)
	}
	if op.NoHole && op.Kind != OpZero {
		return badf("NoHole set on op kind %d", op.Kind)
	}
	if op.Off < 0 || op.Len < 0 || op.Len > math.MaxInt64-op.Off {
		return badf("op range [%d, +%d) is negative or overflows", op.Off, op.Len)
	}
	return nil
}

// Decode parses one encoded command. Errors wrap ErrBadCommand or
// ErrUnsupportedVersion. Decode never panics and allocates at most a small
// multiple of len(data) (counts are checked against the remaining bytes
// before anything is allocated).
//
// Aliasing: the Data of every OpWrite in a decoded WriteBatch is a
// sub-slice of data, not a copy. The caller must not modify data while the
// command is in use, and must copy Op.Data it wants to keep after data is
// reused. (The FSM applies the ops before Apply returns and keeps nothing.)
func Decode(data []byte) (Command, error) {
	if len(data) < codecHeaderLen+codecTrailerLen {
		return nil, badf("%d bytes is too short for a command", len(data))
	}
	if data[0] != codecMagic {
		return nil, badf("bad magic byte 0x%02x", data[0])
	}
	if data[1] != codecVersion {
		return nil, fmt.Errorf("%w: version %d (this build reads %d)", ErrUnsupportedVersion, data[1], codecVersion)
	}
	end := len(data) - codecTrailerLen
	if got, want := binary.LittleEndian.Uint32(data[end:]), crc32.Checksum(data[:end], castagnoli); got != want {
		return nil, badf("checksum mismatch: stored %08x, computed %08x", got, want)
	}
	d := decoder{buf: data[:end], off: codecHeaderLen}
	var cmd Command
	switch typ := data[2]; typ {
	case cmdCreate:
		c := &CreateVolume{Name: d.name(), Size: d.int64("size")}
		bs := d.uvarint()
		if bs > math.MaxInt32 {
			d.fail("block size %d out of range", bs)
		}
		c.BlockSize = int(bs)
		c.Created = d.varint()
		flags := d.byte()
		if flags&^createFlagSyncWrites != 0 {
			d.fail("unknown create flags 0x%02x", flags)
		}
		c.SyncWrites = flags&createFlagSyncWrites != 0
		cmd = c
	case cmdDelete:
		cmd = &DeleteVolume{Name: d.name()}
	case cmdResize:
		cmd = &ResizeVolume{Name: d.name(), Size: d.int64("size")}
	case cmdWriteBatch:
		cmd = d.writeBatch()
	case cmdEndSession:
		cmd = &EndSession{Session: d.uvarint()}
	case cmdVerify:
		c := &VerifyChunks{}
		id := d.str()
		if d.err == nil && (len(id) == 0 || len(id) > maxIDLen) {
			d.fail("verify id is %d bytes, want 1 to %d", len(id), maxIDLen)
		}
		c.ID = string(id)
		c.Volume = d.name()
		c.Off = d.int64("offset")
		c.Len = d.int64("length")
		c.ChunkSize = d.int64("chunk size")
		cmd = c
	case cmdAcquire:
		cmd = &AcquireLease{Volume: d.name(), Site: d.site(), Created: d.varint(), Prev: d.uvarint()}
	case cmdRelease:
		cmd = &ReleaseLease{Volume: d.name(), Site: d.site(), Epoch: d.uvarint()}
	case cmdClusterID:
		cmd = &SetClusterID{ID: d.clusterID()}
	default:
		return nil, badf("unknown command type %d", typ)
	}
	if d.err != nil {
		return nil, d.err
	}
	if d.off != len(d.buf) {
		return nil, badf("%d trailing bytes after command", len(d.buf)-d.off)
	}
	return cmd, nil
}

// decoder reads fields from buf starting at off. The first failure is kept
// in err; later reads then return zero values, so callers check err once.
// Failures wrap kind, or ErrBadCommand if kind is nil.
type decoder struct {
	buf  []byte
	off  int
	err  error
	kind error
}

func (d *decoder) sentinel() error {
	if d.kind != nil {
		return d.kind
	}
	return ErrBadCommand
}

func (d *decoder) fail(format string, args ...any) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: at byte %d: %s", d.sentinel(), d.off, fmt.Sprintf(format, args...))
	}
}

func (d *decoder) remaining() int { return len(d.buf) - d.off }

func (d *decoder) byte() byte {
	if d.err != nil {
		return 0
	}
	if d.remaining() < 1 {
		d.fail("truncated")
		return 0
	}
	b := d.buf[d.off]
	d.off++
	return b
}

// uvarint reads a uvarint in its shortest form.
func (d *decoder) uvarint() uint64 {
	if d.err != nil {
		return 0
	}
	var v uint64
	for i := 0; i < binary.MaxVarintLen64; i++ {
		if d.off+i >= len(d.buf) {
			d.fail("truncated varint")
			return 0
		}
		b := d.buf[d.off+i]
		if i == binary.MaxVarintLen64-1 && b > 1 {
			d.fail("varint overflows 64 bits")
			return 0
		}
		v |= uint64(b&0x7f) << (7 * i)
		if b < 0x80 {
			if b == 0 && i > 0 {
				d.fail("varint not in shortest form")
				return 0
			}
			d.off += i + 1
			return v
		}
	}
	d.fail("varint too long")
	return 0
}

func (d *decoder) varint() int64 {
	u := d.uvarint()
	return int64(u>>1) ^ -int64(u&1)
}

// int64 reads a uvarint that must fit in a non-negative int64.
func (d *decoder) int64(what string) int64 {
	v := d.uvarint()
	if v > math.MaxInt64 {
		d.fail("%s %d exceeds the int64 range", what, v)
		return 0
	}
	return int64(v)
}

// take returns the next n bytes (aliasing buf).
func (d *decoder) take(n uint64) []byte {
	if d.err != nil {
		return nil
	}
	if n > uint64(d.remaining()) {
		d.fail("%d bytes wanted, %d left", n, d.remaining())
		return nil
	}
	end := d.off + int(n)
	b := d.buf[d.off:end:end] // capped: an append cannot clobber the next field
	d.off = end
	return b
}

func (d *decoder) str() []byte { return d.take(d.uvarint()) }

// site reads a site name (see checkSite).
func (d *decoder) site() string {
	b := d.str()
	if d.err == nil {
		if err := checkSite(string(b)); err != nil {
			d.fail("%v", err)
		}
	}
	return string(b)
}

// checkSite checks a site name in a lease command: 1 to maxSiteLen bytes of
// letters, digits, '.', '_' or '-' (the agent's rule for site names).
func checkSite(s string) error {
	if len(s) == 0 || len(s) > maxSiteLen {
		return badf("site name is %d bytes, want 1 to %d", len(s), maxSiteLen)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-') {
			return badf("site name %q: invalid character %q", s, c)
		}
	}
	return nil
}

// ErrBadClusterID is wrapped by CheckClusterID's errors.
var ErrBadClusterID = errors.New("invalid cluster ID")

// CheckClusterID checks a cluster ID: 1 to MaxClusterIDLen bytes of
// lowercase letters, digits or '-'. The errors wrap ErrBadClusterID.
func CheckClusterID(id string) error {
	if len(id) == 0 || len(id) > MaxClusterIDLen {
		return fmt.Errorf("%w: %d bytes, want 1 to %d", ErrBadClusterID, len(id), MaxClusterIDLen)
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-') {
			return fmt.Errorf("%w: %q: invalid character %q", ErrBadClusterID, id, c)
		}
	}
	return nil
}

// clusterID reads a string that must be a valid cluster ID.
func (d *decoder) clusterID() string {
	b := d.str()
	if d.err == nil {
		if err := CheckClusterID(string(b)); err != nil {
			d.err = fmt.Errorf("%w: at byte %d: %w", d.sentinel(), d.off, err)
		}
	}
	return string(b)
}

// name reads a string that must be a valid volume name.
func (d *decoder) name() string {
	b := d.str()
	if d.err != nil {
		return ""
	}
	if err := volume.ValidateName(string(b)); err != nil {
		d.err = fmt.Errorf("%w: at byte %d: %w", d.sentinel(), d.off, err)
		return ""
	}
	return string(b)
}

func (d *decoder) writeBatch() *WriteBatch {
	b := &WriteBatch{Volume: d.name(), Session: d.uvarint(), Seq: d.uvarint(), Epoch: d.uvarint(), Created: d.varint()}
	n := d.uvarint()
	if d.err != nil {
		return b
	}
	if n > uint64(d.remaining()/minOpLen) {
		d.fail("%d ops cannot fit in %d bytes", n, d.remaining())
		return b
	}
	if n > 0 {
		b.Ops = make([]Op, n)
	}
	for i := range b.Ops {
		op := &b.Ops[i]
		op.Kind = OpKind(d.byte())
		flags := d.byte()
		op.Off = d.int64("offset")
		op.Len = d.int64("length")
		if d.err != nil {
			return b
		}
		if flags&^opFlagNoHole != 0 {
			d.fail("op %d: unknown flags 0x%02x", i, flags)
			return b
		}
		op.NoHole = flags&opFlagNoHole != 0
		if op.Kind == OpWrite && op.Len > 0 {
			op.Data = d.take(uint64(op.Len))
		}
		if d.err != nil {
			return b
		}
		if err := checkOp(op); err != nil {
			d.err = fmt.Errorf("op %d: %w", i, err)
			return b
		}
	}
	return b
}
