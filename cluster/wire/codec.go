package wire

//lint:file-ignore SA1019 raft v1.7.3 still fills and reads the deprecated Leader and Candidate fields, so the frame format carries them

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"math"
	"net"
	"time"

	"github.com/hashicorp/raft"
)

// entryMetaSize is the fixed metadata of one Log: Index, Term, Type,
// AppendedAt (seconds, nanoseconds), Data length, Extensions length.
const entryMetaSize = 8 + 8 + 1 + 8 + 4 + 4 + 4

// encoder builds one frame: the header and the metadata in one buffer
// (meta, header first), the payload as the caller's own slices.
type encoder struct {
	meta []byte
	// bufs is what one vectored write sends: bufs[0] is meta (set by
	// finish), the rest the payload slices.
	bufs net.Buffers
	plen uint64
	// out is writeFrame's scratch for connections without vectored
	// writes (TLS).
	out []byte
}

func (e *encoder) reset() {
	if cap(e.meta) < headerSize {
		e.meta = make([]byte, headerSize, 512)
	}
	e.meta = e.meta[:headerSize]
	clear(e.bufs)
	e.bufs = append(e.bufs[:0], nil)
	e.plen = 0
}

// drop forgets the caller's payload slices once written, so that an idle
// pooled connection does not keep entries alive.
func (e *encoder) drop() { clear(e.bufs) }

func (e *encoder) u8(v uint8)   { e.meta = append(e.meta, v) }
func (e *encoder) u32(v uint32) { e.meta = binary.LittleEndian.AppendUint32(e.meta, v) }
func (e *encoder) u64(v uint64) { e.meta = binary.LittleEndian.AppendUint64(e.meta, v) }
func (e *encoder) i64(v int64)  { e.u64(uint64(v)) }

func (e *encoder) bool(v bool) {
	if v {
		e.u8(1)
	} else {
		e.u8(0)
	}
}

// blen is the length field of a byte slice: nilLen for nil.
func blen(b []byte) uint32 {
	if b == nil {
		return nilLen
	}
	return uint32(len(b))
}

// bytes writes a small field inline in the metadata.
func (e *encoder) bytes(b []byte) {
	e.u32(blen(b))
	e.meta = append(e.meta, b...)
}

func (e *encoder) str(s string) {
	e.u32(uint32(len(s)))
	e.meta = append(e.meta, s...)
}

// payloadRef records a large field's length in the metadata and queues the
// caller's slice itself for the write.
func (e *encoder) payloadRef(b []byte) {
	e.u32(blen(b))
	if len(b) > 0 {
		e.bufs = append(e.bufs, b)
		e.plen += uint64(len(b))
	}
}

func (e *encoder) rpcHeader(h raft.RPCHeader) {
	e.i64(int64(h.ProtocolVersion))
	e.bytes(h.ID)
	e.bytes(h.Addr)
}

func (e *encoder) time(t time.Time) {
	e.i64(t.Unix())
	e.u32(uint32(t.Nanosecond()))
}

// message appends msg's fields; a response carries rpcErr first.
func (e *encoder) message(msg any, rpcErr string) (kind uint8, err error) {
	switch m := msg.(type) {
	case *raft.AppendEntriesRequest:
		e.rpcHeader(m.RPCHeader)
		e.u64(m.Term)
		e.bytes(m.Leader)
		e.u64(m.PrevLogEntry)
		e.u64(m.PrevLogTerm)
		e.u64(m.LeaderCommitIndex)
		if m.Entries == nil {
			e.u32(nilLen)
		} else {
			e.u32(uint32(len(m.Entries)))
		}
		var side uint32
		for _, l := range m.Entries {
			if l == nil {
				return 0, fmt.Errorf("%w: nil log entry", ErrInvalidConfig)
			}
			e.u64(l.Index)
			e.u64(l.Term)
			e.u8(uint8(l.Type))
			e.time(l.AppendedAt)
			e.payloadRef(l.Data)
			e.payloadRef(l.Extensions)
			side = sideCRC(side, l)
		}
		e.u32(side)
		return kindAppendEntries, nil
	case *raft.RequestVoteRequest:
		e.rpcHeader(m.RPCHeader)
		e.u64(m.Term)
		e.bytes(m.Candidate)
		e.u64(m.LastLogIndex)
		e.u64(m.LastLogTerm)
		e.bool(m.LeadershipTransfer)
		return kindRequestVote, nil
	case *raft.InstallSnapshotRequest:
		if m.Size < 0 {
			return 0, fmt.Errorf("%w: snapshot size %d", ErrInvalidConfig, m.Size)
		}
		e.rpcHeader(m.RPCHeader)
		e.i64(int64(m.SnapshotVersion))
		e.u64(m.Term)
		e.bytes(m.Leader)
		e.u64(m.LastLogIndex)
		e.u64(m.LastLogTerm)
		e.bytes(m.Peers)
		e.bytes(m.Configuration)
		e.u64(m.ConfigurationIndex)
		e.i64(m.Size)
		return kindInstallSnap, nil
	case *raft.TimeoutNowRequest:
		e.rpcHeader(m.RPCHeader)
		return kindTimeoutNow, nil
	case *raft.RequestPreVoteRequest:
		e.rpcHeader(m.RPCHeader)
		e.u64(m.Term)
		e.u64(m.LastLogIndex)
		e.u64(m.LastLogTerm)
		return kindRequestPreVote, nil
	case *raft.AppendEntriesResponse:
		e.str(rpcErr)
		e.rpcHeader(m.RPCHeader)
		e.u64(m.Term)
		e.u64(m.LastLog)
		e.bool(m.Success)
		e.bool(m.NoRetryBackoff)
		return kindAppendEntries | respFlag, nil
	case *raft.RequestVoteResponse:
		e.str(rpcErr)
		e.rpcHeader(m.RPCHeader)
		e.u64(m.Term)
		e.bytes(m.Peers)
		e.bool(m.Granted)
		return kindRequestVote | respFlag, nil
	case *raft.InstallSnapshotResponse:
		e.str(rpcErr)
		e.rpcHeader(m.RPCHeader)
		e.u64(m.Term)
		e.bool(m.Success)
		return kindInstallSnap | respFlag, nil
	case *raft.TimeoutNowResponse:
		e.str(rpcErr)
		e.rpcHeader(m.RPCHeader)
		return kindTimeoutNow | respFlag, nil
	case *raft.RequestPreVoteResponse:
		e.str(rpcErr)
		e.rpcHeader(m.RPCHeader)
		e.u64(m.Term)
		e.bool(m.Granted)
		return kindRequestPreVote | respFlag, nil
	}
	return 0, fmt.Errorf("%w: cannot encode a %T", ErrInvalidConfig, msg)
}

// encode builds the frame for msg; the result's first buffer is the header
// and metadata, the others are the caller's payload slices (not copied).
// The result is valid until the next encode; writing it (WriteTo) consumes
// the slice header, not the encoder's copy.
// It fails with ErrTooLarge past maxFrame.
func (e *encoder) encode(msg any, rpcErr string, maxFrame int, payloadCRC bool) (net.Buffers, error) {
	e.reset()
	kind, err := e.message(msg, rpcErr)
	if err != nil {
		return nil, err
	}
	return e.finish(kind, maxFrame, payloadCRC)
}

// reject builds a kindReject frame carrying reason.
func (e *encoder) reject(reason string, maxFrame int) (net.Buffers, error) {
	e.reset()
	e.str(reason)
	return e.finish(kindReject, maxFrame, false)
}

func (e *encoder) finish(kind uint8, maxFrame int, payloadCRC bool) (net.Buffers, error) {
	mlen := uint64(len(e.meta) - headerSize)
	if size := mlen + e.plen; size > uint64(maxFrame) || size > math.MaxUint32 {
		return nil, fmt.Errorf("%w: body of %d bytes, limit %d", ErrTooLarge, size, maxFrame)
	}
	h := header{version: Version, kind: kind, metaLen: uint32(mlen), payloadLen: uint32(e.plen)}
	h.metaCRC = crc32.Checksum(e.meta[headerSize:], castagnoli)
	if payloadCRC {
		h.flags |= flagPayloadCRC
		var c uint32
		for _, b := range e.bufs[1:] {
			c = crc32.Update(c, castagnoli, b)
		}
		h.payloadCRC = c
	}
	h.put(e.meta[:headerSize])
	e.bufs[0] = e.meta
	return e.bufs, nil
}

// sideCRC extends crc over the payload bytes of l that robib's own
// end-to-end checksum does not cover: the Data of entries other than
// LogCommand (configurations, no-ops, barriers) and all Extensions. They
// are small; the metadata carries this crc whether or not the frame has a
// payload crc.
func sideCRC(crc uint32, l *raft.Log) uint32 {
	if l.Type != raft.LogCommand {
		crc = crc32.Update(crc, castagnoli, l.Data)
	}
	return crc32.Update(crc, castagnoli, l.Extensions)
}

// decoder reads a frame's metadata and slices the payload section; its
// first error sticks.
type decoder struct {
	meta, payload []byte
	err           error
}

func (d *decoder) fail(format string, args ...any) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: "+format, append([]any{ErrMalformed}, args...)...)
	}
}

func (d *decoder) take(n int) []byte {
	if d.err != nil {
		return nil
	}
	if n > len(d.meta) {
		d.fail("metadata ends %d bytes early", n-len(d.meta))
		return nil
	}
	b := d.meta[:n:n]
	d.meta = d.meta[n:]
	return b
}

func (d *decoder) u8() uint8 {
	if b := d.take(1); b != nil {
		return b[0]
	}
	return 0
}

func (d *decoder) u32() uint32 {
	if b := d.take(4); b != nil {
		return binary.LittleEndian.Uint32(b)
	}
	return 0
}

func (d *decoder) u64() uint64 {
	if b := d.take(8); b != nil {
		return binary.LittleEndian.Uint64(b)
	}
	return 0
}

func (d *decoder) i64() int64 { return int64(d.u64()) }

func (d *decoder) bool() bool {
	switch v := d.u8(); v {
	case 0:
		return false
	case 1:
		return true
	default:
		d.fail("boolean byte %d", v)
		return false
	}
}

// bytes reads an inline field; it aliases the frame buffer.
func (d *decoder) bytes() []byte {
	n := d.u32()
	if n == nilLen || d.err != nil {
		return nil
	}
	if uint64(n) > uint64(len(d.meta)) {
		d.fail("field of %d bytes, %d left in the metadata", n, len(d.meta))
		return nil
	}
	return d.take(int(n))
}

func (d *decoder) str() string {
	n := d.u32()
	if d.err != nil {
		return ""
	}
	if uint64(n) > uint64(len(d.meta)) {
		d.fail("string of %d bytes, %d left in the metadata", n, len(d.meta))
		return ""
	}
	return string(d.take(int(n)))
}

// payloadRef reads a large field's length and slices it off the payload
// section, capacity capped so that an append cannot reach its neighbour.
func (d *decoder) payloadRef() []byte {
	n := d.u32()
	if n == nilLen || d.err != nil {
		return nil
	}
	if uint64(n) > uint64(len(d.payload)) {
		d.fail("payload field of %d bytes, %d left in the payload", n, len(d.payload))
		return nil
	}
	b := d.payload[:n:n]
	d.payload = d.payload[n:]
	return b
}

func (d *decoder) rpcHeader() raft.RPCHeader {
	return raft.RPCHeader{ProtocolVersion: raft.ProtocolVersion(d.i64()), ID: d.bytes(), Addr: d.bytes()}
}

func (d *decoder) time() time.Time {
	sec, nsec := d.i64(), d.u32()
	if nsec >= 1e9 {
		d.fail("nanoseconds %d", nsec)
		return time.Time{}
	}
	return time.Unix(sec, int64(nsec)).UTC()
}

func (d *decoder) done() error {
	if d.err == nil && len(d.meta) != 0 {
		d.fail("%d bytes left in the metadata", len(d.meta))
	}
	if d.err == nil && len(d.payload) != 0 {
		d.fail("%d bytes left in the payload", len(d.payload))
	}
	return d.err
}

// decodeRequest decodes a request frame into a new request struct whose
// byte slices alias the frame's buffer.
func decodeRequest(f frame) (any, error) {
	d := &decoder{meta: f.meta(), payload: f.payload()}
	var msg any
	switch f.kind {
	case kindAppendEntries:
		m := &raft.AppendEntriesRequest{RPCHeader: d.rpcHeader()}
		m.Term = d.u64()
		m.Leader = d.bytes()
		m.PrevLogEntry = d.u64()
		m.PrevLogTerm = d.u64()
		m.LeaderCommitIndex = d.u64()
		if n := d.u32(); n != nilLen && d.err == nil {
			// Bound the count by what the metadata can hold before allocating.
			if uint64(n)*entryMetaSize > uint64(len(d.meta)) {
				d.fail("%d entries in %d bytes of metadata", n, len(d.meta))
				break
			}
			logs := make([]raft.Log, n)
			m.Entries = make([]*raft.Log, n)
			for i := range logs {
				l := &logs[i]
				l.Index = d.u64()
				l.Term = d.u64()
				l.Type = raft.LogType(d.u8())
				l.AppendedAt = d.time()
				l.Data = d.payloadRef()
				l.Extensions = d.payloadRef()
				m.Entries[i] = l
			}
		}
		var side uint32
		for _, l := range m.Entries {
			side = sideCRC(side, l)
		}
		if got := d.u32(); d.err == nil && got != side {
			return nil, fmt.Errorf("%w: crc of the non-command payload %08x, computed %08x", ErrChecksum, got, side)
		}
		msg = m
	case kindRequestVote:
		m := &raft.RequestVoteRequest{RPCHeader: d.rpcHeader()}
		m.Term = d.u64()
		m.Candidate = d.bytes()
		m.LastLogIndex = d.u64()
		m.LastLogTerm = d.u64()
		m.LeadershipTransfer = d.bool()
		msg = m
	case kindInstallSnap:
		m := &raft.InstallSnapshotRequest{RPCHeader: d.rpcHeader()}
		m.SnapshotVersion = raft.SnapshotVersion(d.i64())
		m.Term = d.u64()
		m.Leader = d.bytes()
		m.LastLogIndex = d.u64()
		m.LastLogTerm = d.u64()
		m.Peers = d.bytes()
		m.Configuration = d.bytes()
		m.ConfigurationIndex = d.u64()
		m.Size = d.i64()
		if m.Size < 0 {
			d.fail("snapshot size %d", m.Size)
		}
		msg = m
	case kindTimeoutNow:
		msg = &raft.TimeoutNowRequest{RPCHeader: d.rpcHeader()}
	case kindRequestPreVote:
		m := &raft.RequestPreVoteRequest{RPCHeader: d.rpcHeader()}
		m.Term = d.u64()
		m.LastLogIndex = d.u64()
		m.LastLogTerm = d.u64()
		msg = m
	default:
		return nil, fmt.Errorf("%w: kind 0x%02x is not a request", ErrMalformed, f.kind)
	}
	if err := d.done(); err != nil {
		return nil, err
	}
	return msg, nil
}

// decodeResponse fills resp (a pointer to the raft response struct that
// answers the request of kind req) from f and returns the remote error
// text. A reject frame becomes ErrRejected.
func decodeResponse(f frame, req uint8, resp any) (string, error) {
	d := &decoder{meta: f.meta(), payload: f.payload()}
	if f.kind == kindReject {
		reason := d.str()
		if err := d.done(); err != nil {
			return "", err
		}
		return "", fmt.Errorf("%w: %s", ErrRejected, reason)
	}
	if f.kind != req|respFlag {
		return "", fmt.Errorf("%w: response kind 0x%02x to a request of kind 0x%02x", ErrMalformed, f.kind, req)
	}
	rpcErr := d.str()
	switch m := resp.(type) {
	case *raft.AppendEntriesResponse:
		if req != kindAppendEntries {
			break
		}
		m.RPCHeader = d.rpcHeader()
		m.Term = d.u64()
		m.LastLog = d.u64()
		m.Success = d.bool()
		m.NoRetryBackoff = d.bool()
		return rpcErr, d.done()
	case *raft.RequestVoteResponse:
		if req != kindRequestVote {
			break
		}
		m.RPCHeader = d.rpcHeader()
		m.Term = d.u64()
		m.Peers = d.bytes()
		m.Granted = d.bool()
		return rpcErr, d.done()
	case *raft.InstallSnapshotResponse:
		if req != kindInstallSnap {
			break
		}
		m.RPCHeader = d.rpcHeader()
		m.Term = d.u64()
		m.Success = d.bool()
		return rpcErr, d.done()
	case *raft.TimeoutNowResponse:
		if req != kindTimeoutNow {
			break
		}
		m.RPCHeader = d.rpcHeader()
		return rpcErr, d.done()
	case *raft.RequestPreVoteResponse:
		if req != kindRequestPreVote {
			break
		}
		m.RPCHeader = d.rpcHeader()
		m.Term = d.u64()
		m.Granted = d.bool()
		return rpcErr, d.done()
	}
	return "", fmt.Errorf("%w: response %T to a request of kind 0x%02x", ErrInvalidConfig, resp, req)
}

// responseFor returns a new zero response struct for a request kind.
func responseFor(kind uint8) any {
	switch kind {
	case kindAppendEntries:
		return &raft.AppendEntriesResponse{}
	case kindRequestVote:
		return &raft.RequestVoteResponse{}
	case kindInstallSnap:
		return &raft.InstallSnapshotResponse{}
	case kindTimeoutNow:
		return &raft.TimeoutNowResponse{}
	case kindRequestPreVote:
		return &raft.RequestPreVoteResponse{}
	}
	return nil
}
