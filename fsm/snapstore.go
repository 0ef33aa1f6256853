package fsm

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"

	"github.com/robib/robib/volume"
)

// Snapshot store layout:
//
//	<dir>/<id>/meta.json   raft.SnapshotMeta plus kind, checksummed
//	<dir>/<id>/state       kind "state": a state stream (local snapshot)
//	<dir>/<id>/full        kind "full": a full stream received from a leader
//	<dir>/<id>.tmp/        a snapshot being written; removed at start-up
//
// A snapshot becomes visible when its directory is renamed from <id>.tmp to
// <id> (after data and meta were fsynced; the parent is fsynced after the
// rename), so a crash never leaves a half-written snapshot in List.
const (
	snapMetaFile  = "meta.json"
	snapDataTmp   = "data.tmp"
	snapTmpSuffix = ".tmp"
	snapFormat    = 1
	kindNameState = "state"
	kindNameFull  = "full"
	maxSnapMeta   = 1 << 20
)

// snapshotStore implements raft.SnapshotStore; see FSM.SnapshotStore.
// Create, List and Open may be called from any goroutine (raft calls them
// from its snapshot, replication and FSM goroutines); mu serializes the
// directory changes (commit and reap) with listing.
type snapshotStore struct {
	fsm    *FSM
	dir    string
	retain int
	log    *slog.Logger
	seq    atomic.Uint64 // makes IDs created in the same millisecond unique
	mu     sync.Mutex
}

// storedMeta is the content of meta.json's "meta" field.
type storedMeta struct {
	Kind string `json:"kind"`
	raft.SnapshotMeta
}

// snapEnvelope is meta.json: the meta and the CRC-32C of its exact bytes.
type snapEnvelope struct {
	Format int             `json:"format"`
	CRC32C string          `json:"crc32c"`
	Meta   json.RawMessage `json:"meta"`
}

// SnapshotStore returns the raft.SnapshotStore to give raft, keeping
// snapshots in dir and the retain newest of them (retain >= 1). Call it
// once, after New and before raft.NewRaft.
//
// Local snapshots (those this FSM's Snapshot produced) store only the small
// state record; Open turns them into a full stream read from the live
// volumes. Snapshots received from a leader (InstallSnapshot) are stored as
// the full stream they are; only the newest snapshot is ever used, so an
// older received one is removed as soon as a newer snapshot exists.
//
// Start-up recovery: if the newest snapshot was received but not (or not
// completely) restored into the FSM, because the site crashed between
// raft committing the snapshot and Restore finishing, SnapshotStore
// restores it now: raft (with NoSnapshotRestoreOnStart) would otherwise
// resume after the snapshot's index with volumes that never saw it. It
// fails if the newest local snapshot is ahead of the FSM's state file (the
// state directory was lost or rolled back), or if an interrupted restore
// cannot be finished.
func (f *FSM) SnapshotStore(dir string, retain int) (raft.SnapshotStore, error) {
	if retain < 1 {
		return nil, fmt.Errorf("fsm: snapshot store: retain must be at least 1, got %d", retain)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("fsm: snapshot store: %w", err)
	}
	s := &snapshotStore{fsm: f, dir: dir, retain: retain, log: f.log}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("fsm: snapshot store: %w", err)
	}
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), snapTmpSuffix) {
			s.log.Info("fsm: removing unfinished snapshot", "path", filepath.Join(dir, e.Name()))
			if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
				return nil, fmt.Errorf("fsm: snapshot store: %w", err)
			}
		}
	}
	if err := s.recover(); err != nil {
		return nil, fmt.Errorf("fsm: snapshot store: %w", err)
	}
	return s, nil
}

// recover finishes an interrupted snapshot installation; see SnapshotStore.
func (s *snapshotStore) recover() error {
	f := s.fsm
	snaps := s.load()
	if len(snaps) == 0 {
		if f.restoring {
			return errors.New("an interrupted snapshot restore cannot be finished: no snapshot is stored")
		}
		return nil
	}
	newest := snaps[0]
	path := s.dataPath(newest)
	file, err := os.Open(path)
	if err != nil {
		return err
	}
	defer file.Close()
	h, img, err := newRecordReader(file).readPrologue()
	if err != nil {
		return fmt.Errorf("snapshot %s: %w", newest.ID, err)
	}
	switch {
	case newest.Kind == kindNameState && f.restoring:
		return fmt.Errorf("an interrupted snapshot restore cannot be finished: the newest snapshot %s is local", newest.ID)
	case newest.Kind == kindNameState && img.Applied > f.checkpointed:
		return fmt.Errorf("local snapshot %s covers index %d but the fsm state file only %d: "+
			"the state directory was lost or rolled back; the volumes cannot be trusted", newest.ID, img.Applied, f.checkpointed)
	case newest.Kind == kindNameFull && (f.restoring || max(img.Applied, h.Index) > f.checkpointed):
		s.log.Warn("fsm: installing a received snapshot that was not restored before the last shutdown",
			"id", newest.ID, "index", newest.Index, "checkpoint", f.checkpointed)
		if _, err := file.Seek(0, io.SeekStart); err != nil {
			return err
		}
		return f.Restore(file)
	}
	return nil
}

// Create implements raft.SnapshotStore. Only snapshot version 1 is
// supported (as raft's FileSnapshotStore).
func (s *snapshotStore) Create(version raft.SnapshotVersion, index, term uint64, configuration raft.Configuration,
	configurationIndex uint64, _ raft.Transport) (raft.SnapshotSink, error) {
	if version != 1 {
		return nil, fmt.Errorf("fsm: unsupported snapshot version %d", version)
	}
	id := fmt.Sprintf("%d-%d-%d-%d", term, index, time.Now().UnixMilli(), s.seq.Add(1))
	tmp := filepath.Join(s.dir, id+snapTmpSuffix)
	if err := os.MkdirAll(tmp, 0o700); err != nil {
		return nil, fmt.Errorf("fsm: create snapshot: %w", err)
	}
	file, err := os.OpenFile(filepath.Join(tmp, snapDataTmp), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		os.RemoveAll(tmp)
		return nil, fmt.Errorf("fsm: create snapshot: %w", err)
	}
	return &snapshotSink{
		store: s,
		tmp:   tmp,
		file:  file,
		bw:    bufio.NewWriterSize(file, 1<<20),
		meta: storedMeta{SnapshotMeta: raft.SnapshotMeta{
			Version:            version,
			ID:                 id,
			Index:              index,
			Term:               term,
			Configuration:      configuration,
			ConfigurationIndex: configurationIndex,
		}},
	}, nil
}

// List implements raft.SnapshotStore: the stored snapshots, newest (highest
// index, then term) first. Unreadable snapshots are logged and left out.
// Size is the stored size; Open reports the size of the stream it returns.
func (s *snapshotStore) List() ([]*raft.SnapshotMeta, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	snaps := s.load()
	out := make([]*raft.SnapshotMeta, len(snaps))
	for i, sm := range snaps {
		m := sm.SnapshotMeta
		out[i] = &m
	}
	return out, nil
}

// Open implements raft.SnapshotStore. It always returns a full stream: a
// received snapshot's file as it is, or for a local snapshot a stream
// generated from its state record and the live volumes, whose exact length
// is the returned meta's Size (raft sends exactly Size bytes).
func (s *snapshotStore) Open(id string) (*raft.SnapshotMeta, io.ReadCloser, error) {
	if id == "" || id == "." || id == ".." || filepath.Base(id) != id || strings.HasSuffix(id, snapTmpSuffix) {
		return nil, nil, fmt.Errorf("fsm: open snapshot: invalid id %q", id)
	}
	sm, err := s.readMeta(id)
	if err != nil {
		return nil, nil, fmt.Errorf("fsm: open snapshot: %w", err)
	}
	meta := sm.SnapshotMeta
	file, err := os.Open(s.dataPath(sm))
	if err != nil {
		return nil, nil, fmt.Errorf("fsm: open snapshot: %w", err)
	}
	if sm.Kind == kindNameFull {
		st, err := file.Stat()
		if err != nil {
			file.Close()
			return nil, nil, fmt.Errorf("fsm: open snapshot: %w", err)
		}
		meta.Size = st.Size()
		return &meta, file, nil
	}
	defer file.Close()
	b, err := io.ReadAll(io.LimitReader(file, maxStatePayload+4096))
	if err != nil {
		return nil, nil, fmt.Errorf("fsm: open snapshot: %w", err)
	}
	_, img, err := validateStream(bytes.NewReader(b))
	if err != nil {
		return nil, nil, fmt.Errorf("fsm: open snapshot %s: %w", id, err)
	}
	stream, err := newFullStream(s.fsm.store, meta.Index, img, s.fsm.fuzzyBound)
	if err != nil {
		return nil, nil, fmt.Errorf("fsm: open snapshot %s: %w", id, err)
	}
	meta.Size = stream.Size()
	return &meta, stream, nil
}

// dataPath is the path of a snapshot's stream file.
func (s *snapshotStore) dataPath(sm *storedMeta) string {
	return filepath.Join(s.dir, sm.ID, sm.Kind)
}

// load reads the metadata of every stored snapshot, newest first.
func (s *snapshotStore) load() []*storedMeta {
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		s.log.Error("fsm: cannot list snapshots", "dir", s.dir, "err", err)
		return nil
	}
	var snaps []*storedMeta
	for _, e := range entries {
		if !e.IsDir() || strings.HasSuffix(e.Name(), snapTmpSuffix) {
			continue
		}
		sm, err := s.readMeta(e.Name())
		if err != nil {
			s.log.Warn("fsm: ignoring unreadable snapshot", "id", e.Name(), "err", err)
			continue
		}
		snaps = append(snaps, sm)
	}
	slices.SortFunc(snaps, func(a, b *storedMeta) int {
		switch {
		case a.Index != b.Index:
			return cmpDesc(a.Index, b.Index)
		case a.Term != b.Term:
			return cmpDesc(a.Term, b.Term)
		}
		return -strings.Compare(a.ID, b.ID)
	})
	return snaps
}

func cmpDesc(a, b uint64) int {
	if a > b {
		return -1
	}
	return 1
}

// readMeta reads and checks <dir>/<id>/meta.json.
func (s *snapshotStore) readMeta(id string) (*storedMeta, error) {
	f, err := os.Open(filepath.Join(s.dir, id, snapMetaFile))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxSnapMeta+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxSnapMeta {
		return nil, fmt.Errorf("snapshot %s: meta exceeds %d bytes", id, maxSnapMeta)
	}
	var env snapEnvelope
	if err := json.Unmarshal(b, &env); err != nil {
		return nil, fmt.Errorf("snapshot %s: meta: %w", id, err)
	}
	if env.Format != snapFormat {
		return nil, fmt.Errorf("snapshot %s: unsupported meta format %d", id, env.Format)
	}
	if want := fmt.Sprintf("%08x", crc32.Checksum(env.Meta, castagnoli)); env.CRC32C != want {
		return nil, fmt.Errorf("snapshot %s: meta checksum mismatch: stored %q, computed %q", id, env.CRC32C, want)
	}
	var sm storedMeta
	if err := json.Unmarshal(env.Meta, &sm); err != nil {
		return nil, fmt.Errorf("snapshot %s: meta: %w", id, err)
	}
	if sm.ID != id || (sm.Kind != kindNameState && sm.Kind != kindNameFull) {
		return nil, fmt.Errorf("snapshot %s: meta names id %q kind %q", id, sm.ID, sm.Kind)
	}
	return &sm, nil
}

// encodeSnapMeta returns the meta.json contents for sm.
func encodeSnapMeta(sm *storedMeta) ([]byte, error) {
	body, err := json.Marshal(sm)
	if err != nil {
		return nil, err
	}
	b, err := json.Marshal(snapEnvelope{
		Format: snapFormat,
		CRC32C: fmt.Sprintf("%08x", crc32.Checksum(body, castagnoli)),
		Meta:   body,
	})
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// commit moves a finished snapshot directory into place and reaps old
// snapshots.
func (s *snapshotStore) commit(tmp, id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := os.Rename(tmp, filepath.Join(s.dir, id)); err != nil {
		return err
	}
	if err := volume.SyncDir(s.dir); err != nil {
		return err
	}
	s.reapLocked()
	return nil
}

// reapLocked removes all but the retain newest snapshots, and every
// received (full) snapshot that is not the newest. The caller holds mu.
func (s *snapshotStore) reapLocked() {
	for i, sm := range s.load() {
		if i < s.retain && (i == 0 || sm.Kind != kindNameFull) {
			continue
		}
		s.log.Info("fsm: removing old snapshot", "id", sm.ID, "index", sm.Index, "kind", sm.Kind)
		if err := os.RemoveAll(filepath.Join(s.dir, sm.ID)); err != nil {
			s.log.Warn("fsm: cannot remove old snapshot", "id", sm.ID, "err", err)
		}
	}
}

// snapshotSink implements raft.SnapshotSink. Raft writes either a state
// stream (FSMSnapshot.Persist) or a leader's full stream (InstallSnapshot)
// into it; Close validates the whole stream (checksums, structure, end
// marker) before the snapshot becomes visible, so a truncated or corrupt
// transfer is never listed, and keeps it under the kind it turned out to
// be. A sink is used by one goroutine.
type snapshotSink struct {
	store  *snapshotStore
	tmp    string // the snapshot's temporary directory
	file   *os.File
	bw     *bufio.Writer
	meta   storedMeta
	closed bool
}

// ID implements raft.SnapshotSink.
func (k *snapshotSink) ID() string { return k.meta.ID }

// Write implements io.Writer.
func (k *snapshotSink) Write(p []byte) (int, error) {
	if k.closed {
		return 0, errors.New("fsm: write to a closed snapshot sink")
	}
	return k.bw.Write(p)
}

// Cancel implements raft.SnapshotSink: the snapshot is discarded.
func (k *snapshotSink) Cancel() error {
	if k.closed {
		return nil
	}
	k.closed = true
	k.file.Close()
	return os.RemoveAll(k.tmp)
}

// Close implements raft.SnapshotSink: the snapshot is validated, made
// durable and published. On error it is discarded.
func (k *snapshotSink) Close() error {
	if k.closed {
		return nil
	}
	k.closed = true
	if err := k.finish(); err != nil {
		k.file.Close()
		os.RemoveAll(k.tmp)
		return fmt.Errorf("fsm: snapshot %s: %w", k.meta.ID, err)
	}
	k.store.log.Info("fsm: snapshot stored", "id", k.meta.ID, "index", k.meta.Index, "kind", k.meta.Kind, "bytes", k.meta.Size)
	return nil
}

func (k *snapshotSink) finish() error {
	if err := k.bw.Flush(); err != nil {
		return err
	}
	if err := k.file.Sync(); err != nil {
		return err
	}
	if err := k.file.Close(); err != nil {
		return err
	}
	data := filepath.Join(k.tmp, snapDataTmp)
	r, err := os.Open(data)
	if err != nil {
		return err
	}
	h, _, err := validateStream(r)
	st, serr := r.Stat()
	r.Close()
	if err != nil {
		return err
	}
	if serr != nil {
		return serr
	}
	switch h.Kind {
	case kindState:
		k.meta.Kind = kindNameState
	case kindFull:
		if h.Index != k.meta.Index {
			return fmt.Errorf("full stream is for index %d, snapshot for %d", h.Index, k.meta.Index)
		}
		k.meta.Kind = kindNameFull
	}
	k.meta.Size = st.Size()
	if err := os.Rename(data, filepath.Join(k.tmp, k.meta.Kind)); err != nil {
		return err
	}
	b, err := encodeSnapMeta(&k.meta)
	if err != nil {
		return err
	}
	if err := volume.WriteFileSync(filepath.Join(k.tmp, snapMetaFile), b); err != nil {
		return err
	}
	if err := volume.SyncDir(k.tmp); err != nil {
		return err
	}
	return k.store.commit(k.tmp, k.meta.ID)
}
