package checker

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"strings"
)

// Block layout (all integers big-endian); see the package documentation.
const (
	// BlockMagic is the first 8 bytes of every block the checker writes
	// ("robibCK1").
	BlockMagic uint64 = 0x726f626962434b31
	// HeaderSize is the size of the block header; the payload follows it.
	HeaderSize = 56
	// SectorSize is the unit in which torn blocks are analysed.
	SectorSize = 512

	offMagic     = 0
	offRun       = 8
	offBlock     = 16
	offSeq       = 24
	offWriteID   = 32
	offWriter    = 40
	offSession   = 44
	offBlockSize = 48
	offFlags     = 52

	headerFlagFUA = 1 << 0
	headerFlagRMW = 1 << 1

	// RMWSegments is the number of segments the payload of a
	// read-modify-write block is divided into (see the package
	// documentation).
	RMWSegments = 8
	segTagSize  = 8
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Header is a decoded block header.
type Header struct {
	Run        uint64 `json:"run"`
	Block      uint64 `json:"block"`
	Seq        uint64 `json:"seq"`
	WriteID    uint64 `json:"write_id"`
	Writer     uint32 `json:"writer"`
	Session    uint32 `json:"session"`
	BlockSize  uint32 `json:"block_size"`
	FUA        bool   `json:"fua,omitempty"`
	RMW        bool   `json:"rmw,omitempty"`
	ChecksumOK bool   `json:"checksum_ok"`
}

func (h Header) String() string {
	crc := "checksum ok"
	if !h.ChecksumOK {
		crc = "CHECKSUM BAD"
	}
	return fmt.Sprintf("run %016x block %d seq %d write %d (writer %d, session %d, size %d, fua %v, %s)",
		h.Run, h.Block, h.Seq, h.WriteID, h.Writer, h.Session, h.BlockSize, h.FUA, crc)
}

// ParseHeader decodes the header of a block the checker wrote. ok is false
// when data does not start with BlockMagic (or is too short to hold a
// header and checksum). ChecksumOK tells whether the CRC-32C in the last
// four bytes of data matches the rest of data.
func ParseHeader(data []byte) (h Header, ok bool) {
	if len(data) < HeaderSize+4 || binary.BigEndian.Uint64(data[offMagic:]) != BlockMagic {
		return Header{}, false
	}
	h = Header{
		Run:       binary.BigEndian.Uint64(data[offRun:]),
		Block:     binary.BigEndian.Uint64(data[offBlock:]),
		Seq:       binary.BigEndian.Uint64(data[offSeq:]),
		WriteID:   binary.BigEndian.Uint64(data[offWriteID:]),
		Writer:    binary.BigEndian.Uint32(data[offWriter:]),
		Session:   binary.BigEndian.Uint32(data[offSession:]),
		BlockSize: binary.BigEndian.Uint32(data[offBlockSize:]),
		FUA:       binary.BigEndian.Uint32(data[offFlags:])&headerFlagFUA != 0,
		RMW:       binary.BigEndian.Uint32(data[offFlags:])&headerFlagRMW != 0,
	}
	n := len(data)
	h.ChecksumOK = crc32.Checksum(data[:n-4], castagnoli) == binary.BigEndian.Uint32(data[n-4:])
	return h, true
}

// encodeBlock fills dst (the whole block) with the contents of write w of
// block blk in run run.
func encodeBlock(dst []byte, run, blk uint64, w *WriteRecord) {
	n := len(dst)
	binary.BigEndian.PutUint64(dst[offMagic:], BlockMagic)
	binary.BigEndian.PutUint64(dst[offRun:], run)
	binary.BigEndian.PutUint64(dst[offBlock:], blk)
	binary.BigEndian.PutUint64(dst[offSeq:], w.Seq)
	binary.BigEndian.PutUint64(dst[offWriteID:], w.ID)
	binary.BigEndian.PutUint32(dst[offWriter:], w.Writer)
	binary.BigEndian.PutUint32(dst[offSession:], w.Session)
	binary.BigEndian.PutUint32(dst[offBlockSize:], uint32(n))
	var flags uint32
	if w.FUA {
		flags |= headerFlagFUA
	}
	if w.Segs != nil {
		flags |= headerFlagRMW
	}
	binary.BigEndian.PutUint32(dst[offFlags:], flags)
	if w.Segs == nil {
		fillPayload(dst[HeaderSize:n-4], run, blk, w.Seq)
	} else {
		fillSegments(dst[HeaderSize:n-4], run, blk, w.Segs)
	}
	binary.BigEndian.PutUint32(dst[n-4:], crc32.Checksum(dst[:n-4], castagnoli))
}

// segmentBounds returns the start of each of the RMWSegments segments of a
// payload of n bytes, and n.
func segmentBounds(n int) [RMWSegments + 1]int {
	var b [RMWSegments + 1]int
	for i := range b {
		b[i] = i * n / RMWSegments
	}
	return b
}

// fillSegments writes a read-modify-write payload: segment i holds the
// 8-byte tag segs[i] (the seq of the write that last wrote it) followed by
// the bytes of that write's payload stream at the same positions; a
// segment with tag 0 (never written) is all zeros.
func fillSegments(dst []byte, run, blk uint64, segs []uint64) {
	full := map[uint64][]byte{}
	bounds := segmentBounds(len(dst))
	for i := 0; i < RMWSegments; i++ {
		seg := dst[bounds[i]:bounds[i+1]]
		tag := segs[i]
		if tag == 0 {
			clear(seg)
			continue
		}
		p, ok := full[tag]
		if !ok {
			p = make([]byte, len(dst))
			fillPayload(p, run, blk, tag)
			full[tag] = p
		}
		copy(seg, p[bounds[i]:bounds[i+1]])
		var tb [segTagSize]byte
		binary.BigEndian.PutUint64(tb[:], tag)
		copy(seg, tb[:])
	}
}

// segmentMap tells which write each payload segment of a valid block of
// this run and block came from: for a plain write every segment is its
// own seq; for a read-modify-write block the tags, provided every segment
// matches its tag. ok is false for content that is not such a block
// (torn, foreign, another run) or whose segments do not match their tags.
func segmentMap(data []byte, run, blk uint64) (segs []uint64, seq uint64, ok bool) {
	segs = make([]uint64, RMWSegments)
	if allZero(data) {
		return segs, 0, true
	}
	h, magic := ParseHeader(data)
	if !magic || !h.ChecksumOK || h.Run != run || h.Block != blk || h.BlockSize != uint32(len(data)) {
		return nil, 0, false
	}
	if !h.RMW {
		for i := range segs {
			segs[i] = h.Seq
		}
		return segs, h.Seq, true
	}
	payload := data[HeaderSize : len(data)-4]
	bounds := segmentBounds(len(payload))
	for i := range segs {
		seg := payload[bounds[i]:bounds[i+1]]
		if len(seg) >= segTagSize {
			segs[i] = binary.BigEndian.Uint64(seg)
		}
		if segs[i] > h.Seq {
			return nil, 0, false
		}
	}
	exp := make([]byte, len(payload))
	fillSegments(exp, run, blk, segs)
	if string(exp) != string(payload) {
		return nil, 0, false
	}
	return segs, h.Seq, true
}

// splitmix64 is a bijective 64-bit mixer (Steele, Lea and Flood's
// SplitMix64 finaliser).
func splitmix64(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9
	x = (x ^ (x >> 27)) * 0x94d049bb133111eb
	return x ^ (x >> 31)
}

// fillPayload writes the pseudo-random payload that depends only on (run,
// block, seq).
func fillPayload(dst []byte, run, blk, seq uint64) {
	state := splitmix64(run ^ splitmix64(blk^splitmix64(seq)))
	i := 0
	for ; i+8 <= len(dst); i += 8 {
		state += 0x9e3779b97f4a7c15
		binary.LittleEndian.PutUint64(dst[i:], splitmix64(state))
	}
	if i < len(dst) {
		var tail [8]byte
		state += 0x9e3779b97f4a7c15
		binary.LittleEndian.PutUint64(tail[:], splitmix64(state))
		copy(dst[i:], tail[:])
	}
}

func allZero(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}

// sectorLabels names, for each SectorSize piece of data, where it came
// from: "zero", "seq N" (identical to that sector of write N of this
// block), or "?" (neither). known reports whether every sector was
// identified, distinct how many different origins were found.
func sectorLabels(data []byte, candidates []WriteRecord, expected func(*WriteRecord) []byte) (labels []string, known bool, distinct int) {
	n := len(data) / SectorSize
	labels = make([]string, n)
	known = true
	seen := map[string]bool{}
	for i := 0; i < n; i++ {
		sec := data[i*SectorSize : (i+1)*SectorSize]
		label := "?"
		if allZero(sec) {
			label = "zero"
		} else {
			for j := len(candidates) - 1; j >= 0; j-- {
				exp := expected(&candidates[j])
				if string(exp[i*SectorSize:(i+1)*SectorSize]) == string(sec) {
					label = fmt.Sprintf("seq %d", candidates[j].Seq)
					break
				}
			}
		}
		if label == "?" {
			known = false
		}
		labels[i] = label
		seen[label] = true
	}
	return labels, known, len(seen)
}

// formatLabels compresses sector labels into "0-3:seq 5 4-7:seq 6".
func formatLabels(labels []string) string {
	var b strings.Builder
	for i := 0; i < len(labels); {
		j := i
		for j+1 < len(labels) && labels[j+1] == labels[i] {
			j++
		}
		if b.Len() > 0 {
			b.WriteString(", ")
		}
		if i == j {
			fmt.Fprintf(&b, "%d:%s", i, labels[i])
		} else {
			fmt.Fprintf(&b, "%d-%d:%s", i, j, labels[i])
		}
		i = j + 1
	}
	return "sectors " + b.String()
}
