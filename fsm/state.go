package fsm

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/robib/robib/volume"
)

// errCorruptState is wrapped by every failure to decode a state file or a
// snapshot's state record.
var errCorruptState = errors.New("corrupt fsm state")

// session is one writer session's dedup state.
type session struct {
	LastSeq   uint64 // Seq of the last batch applied (or rejected) for it
	LastIndex uint64 // log index of that batch; the LRU eviction key
	// Failed is the ErrorCode of the first batch of this session that was
	// rejected, "" while none was. A rejected batch is lost data for its
	// writer, so every later batch of the session — a resend of any Seq
	// included — gets the same verdict: a writer whose answer was lost
	// can never see a resend succeed as a duplicate.
	Failed string
	// Volume and Epoch are those of the session's first batch. While
	// Volume's lease is held at Epoch the session is pinned: it is never
	// evicted and EndSession keeps it, so a late copy of any of its
	// batches is answered as a duplicate; once the lease is released or
	// taken at a new epoch, the session is dropped, and the epoch check
	// rejects every late copy (DESIGN.md, "Late copies of a batch").
	// Sessions recorded by state versions 1 and 2 have neither.
	Volume string
	Epoch  uint64
}

// sessionEntry is a session with its ID, as stored.
type sessionEntry struct {
	ID uint64
	session
}

// stateImage is the FSM state that is persisted: in the state file at each
// checkpoint (Volumes empty) and in the state record of a snapshot
// (Restoring false, FuzzyUntil 0).
//
// Encoding (version 3; version 2 is the same without each session's volume
// and epoch and without the cluster ID; version 1 also without the lease
// list):
// version 1 byte, flags 1 byte (bit 0 Restoring),
// applied uv, fuzzyUntil uv, volume count uv, per volume name str, size uv,
// blockSize uv, created sv (Unix ns), flags 1 byte (bit 0 SyncWrites),
// session count uv, per session id uv, lastSeq uv, lastIndex uv,
// failed str, volume str, epoch uv, lease count uv, per lease volume str,
// holder str, epoch uv, cluster ID str ("" while none is set, else valid
// for CheckClusterID).
// Volumes and leases are sorted by name, sessions by ID, all without
// duplicates, so equal states encode to equal bytes.
type stateImage struct {
	Applied    uint64 // every entry with Index <= Applied is reflected
	FuzzyUntil uint64 // see FSM.fuzzyUntil
	Restoring  bool   // a Restore started and has not finished
	Volumes    []volume.Meta
	Sessions   []sessionEntry
	Leases     []leaseEntry
	ClusterID  string // "" until a SetClusterID was applied
}

const (
	stateVersion      byte = 3
	stateVersionV2    byte = 2
	stateVersionV1    byte = 1
	stateFlagRestore  byte = 1
	stateFileName          = "state"
	stateTmpName           = "state.tmp"
	stateFileMagic         = "RBFS"
	maxStateFileBytes      = 64 << 20
)

func encodeState(img *stateImage) []byte {
	var e encoder
	e.byte(stateVersion)
	var flags byte
	if img.Restoring {
		flags |= stateFlagRestore
	}
	e.byte(flags)
	e.uvarint(img.Applied)
	e.uvarint(img.FuzzyUntil)
	e.uvarint(uint64(len(img.Volumes)))
	for _, m := range img.Volumes {
		e.string(m.Name)
		e.uvarint(uint64(m.Size))
		e.uvarint(uint64(m.BlockSize))
		e.varint(m.Created.UnixNano())
		var flags byte
		if m.SyncWrites {
			flags |= createFlagSyncWrites
		}
		e.byte(flags)
	}
	e.uvarint(uint64(len(img.Sessions)))
	for _, s := range img.Sessions {
		e.uvarint(s.ID)
		e.uvarint(s.LastSeq)
		e.uvarint(s.LastIndex)
		e.string(s.Failed)
		e.string(s.Volume)
		e.uvarint(s.Epoch)
	}
	e.uvarint(uint64(len(img.Leases)))
	for _, l := range img.Leases {
		e.string(l.Volume)
		e.string(l.Holder)
		e.uvarint(l.Epoch)
	}
	e.string(img.ClusterID)
	return e.buf
}

// decodeState parses encodeState's output. Errors wrap errCorruptState.
func decodeState(b []byte) (*stateImage, error) {
	d := decoder{buf: b, kind: errCorruptState}
	version := d.byte()
	if d.err == nil && (version < stateVersionV1 || version > stateVersion) {
		return nil, fmt.Errorf("%w: unsupported state version %d", errCorruptState, version)
	}
	flags := d.byte()
	if flags&^stateFlagRestore != 0 {
		d.fail("unknown flags 0x%02x", flags)
	}
	img := &stateImage{Restoring: flags&stateFlagRestore != 0, Applied: d.uvarint(), FuzzyUntil: d.uvarint()}
	// A volume takes at least 6 bytes, a session 4.
	if n := d.uvarint(); n > uint64(d.remaining()/6) {
		d.fail("%d volumes cannot fit in %d bytes", n, d.remaining())
	} else if n > 0 {
		img.Volumes = make([]volume.Meta, n)
		for i := range img.Volumes {
			m := volume.Meta{Name: d.name(), Size: d.int64("size")}
			bs := d.uvarint()
			created := d.varint()
			vflags := d.byte()
			if d.err != nil {
				break
			}
			if vflags&^createFlagSyncWrites != 0 {
				d.fail("unknown volume flags 0x%02x", vflags)
				break
			}
			m.SyncWrites = vflags&createFlagSyncWrites != 0
			if bs > 1<<30 {
				d.fail("block size %d out of range", bs)
				break
			}
			m.BlockSize = int(bs)
			m.Created = time.Unix(0, created).UTC()
			if err := volume.ValidateMeta(m); err != nil {
				d.err = fmt.Errorf("%w: %w", errCorruptState, err)
				break
			}
			if i > 0 && strings.Compare(img.Volumes[i-1].Name, m.Name) >= 0 {
				d.fail("volumes not sorted by name at %q", m.Name)
				break
			}
			img.Volumes[i] = m
		}
	}
	if n := d.uvarint(); n > uint64(d.remaining()/4) {
		d.fail("%d sessions cannot fit in %d bytes", n, d.remaining())
	} else if n > 0 {
		img.Sessions = make([]sessionEntry, n)
		for i := range img.Sessions {
			s := sessionEntry{ID: d.uvarint()}
			s.LastSeq = d.uvarint()
			s.LastIndex = d.uvarint()
			s.Failed = string(d.str())
			if version >= stateVersion {
				if v := d.str(); len(v) > 0 {
					if err := volume.ValidateName(string(v)); err != nil {
						d.fail("session volume: %v", err)
						break
					}
					s.Volume = string(v)
				}
				s.Epoch = d.uvarint()
			}
			if d.err != nil {
				break
			}
			if s.ID == 0 || s.LastSeq == 0 {
				d.fail("session %d with seq %d", s.ID, s.LastSeq)
				break
			}
			if i > 0 && img.Sessions[i-1].ID >= s.ID {
				d.fail("sessions not sorted at %d", s.ID)
				break
			}
			img.Sessions[i] = s
		}
	}
	if version >= stateVersionV2 {
		// A lease takes at least 3 bytes.
		if n := d.uvarint(); n > uint64(d.remaining()/3) {
			d.fail("%d leases cannot fit in %d bytes", n, d.remaining())
		} else if n > 0 {
			img.Leases = make([]leaseEntry, n)
			for i := range img.Leases {
				l := leaseEntry{Volume: d.name()}
				holder := d.str()
				l.Epoch = d.uvarint()
				if d.err != nil {
					break
				}
				if len(holder) > 0 {
					if err := checkSite(string(holder)); err != nil {
						d.fail("lease holder: %v", err)
						break
					}
				}
				l.Holder = string(holder)
				if l.Epoch == 0 {
					d.fail("lease on %q with epoch 0", l.Volume)
					break
				}
				if i > 0 && strings.Compare(img.Leases[i-1].Volume, l.Volume) >= 0 {
					d.fail("leases not sorted by volume at %q", l.Volume)
					break
				}
				img.Leases[i] = l
			}
		}
	}
	if version >= stateVersion {
		id := d.str()
		if d.err == nil && len(id) > 0 {
			if err := CheckClusterID(string(id)); err != nil {
				d.fail("%v", err)
			}
		}
		img.ClusterID = string(id)
	}
	if d.err != nil {
		return nil, d.err
	}
	if d.remaining() != 0 {
		return nil, fmt.Errorf("%w: %d trailing bytes", errCorruptState, d.remaining())
	}
	return img, nil
}

// sessionList returns the session table as a list sorted by ID.
func sessionList(m map[uint64]*session) []sessionEntry {
	out := make([]sessionEntry, 0, len(m))
	for id, s := range m {
		out = append(out, sessionEntry{ID: id, session: *s})
	}
	slices.SortFunc(out, func(a, b sessionEntry) int { return cmp.Compare(a.ID, b.ID) })
	return out
}

// sessionMap builds a session table from a list.
func sessionMap(list []sessionEntry) map[uint64]*session {
	m := make(map[uint64]*session, len(list))
	for _, s := range list {
		m[s.ID] = &session{LastSeq: s.LastSeq, LastIndex: s.LastIndex, Failed: s.Failed, Volume: s.Volume, Epoch: s.Epoch}
	}
	return m
}

// State file: stateFileMagic, encodeState output, crc32c (LE) of both.

// readStateFile loads dir's state file. It returns (nil, nil) if there is
// none.
func readStateFile(dir string) (*stateImage, error) {
	path := filepath.Join(dir, stateFileName)
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxStateFileBytes+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	img, err := parseStateFile(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return img, nil
}

func parseStateFile(b []byte) (*stateImage, error) {
	if len(b) > maxStateFileBytes {
		return nil, fmt.Errorf("%w: file exceeds %d bytes", errCorruptState, maxStateFileBytes)
	}
	if len(b) < len(stateFileMagic)+4 || string(b[:len(stateFileMagic)]) != stateFileMagic {
		return nil, fmt.Errorf("%w: bad magic or too short (%d bytes)", errCorruptState, len(b))
	}
	end := len(b) - 4
	if got, want := binary.LittleEndian.Uint32(b[end:]), crc32.Checksum(b[:end], castagnoli); got != want {
		return nil, fmt.Errorf("%w: checksum mismatch: stored %08x, computed %08x", errCorruptState, got, want)
	}
	img, err := decodeState(b[len(stateFileMagic):end])
	if err != nil {
		return nil, err
	}
	if len(img.Volumes) != 0 {
		return nil, fmt.Errorf("%w: state file lists volumes", errCorruptState)
	}
	return img, nil
}

// writeStateFile atomically replaces dir's state file with img: write a
// temporary file, fsync it, rename it into place, fsync dir. When it
// returns nil the new state is durable; after a crash the file is either
// the old or the new state.
func writeStateFile(dir string, img *stateImage) error {
	body := encodeState(img)
	b := make([]byte, 0, len(stateFileMagic)+len(body)+4)
	b = append(b, stateFileMagic...)
	b = append(b, body...)
	b = binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
	tmp := filepath.Join(dir, stateTmpName)
	if err := volume.WriteFileSync(tmp, b); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("write state: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, stateFileName)); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("write state: %w", err)
	}
	if err := volume.SyncDir(dir); err != nil {
		return fmt.Errorf("write state: %w", err)
	}
	return nil
}
