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
	// unrestored holds the thin (version 2) snapshots a sink of this
	// process published and that no Open has handed out since: raft opens
	// a received snapshot right after publishing it, to restore it, and
	// that Open must return the stored stream. thin holds the index of
	// every thin snapshot a sink of this process published. Both guarded
	// by mu.
	unrestored map[string]bool
	thin       map[string]uint64
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
	s := &snapshotStore{fsm: f, dir: dir, retain: retain, log: f.log, unrestored: map[string]bool{}, thin: map[string]uint64{}}
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
	f.onThinRefused = s.dropThin
	return s, nil
}

// dropThin removes the thin snapshots of index this process received:
// Restore refused to install them here (their keep records do not apply
// to this site's volumes), so they must neither be restored at the next
// start nor be sent to anyone.
func (s *snapshotStore) dropThin(index uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for id, i := range s.thin {
		if i != index {
			continue
		}
		s.log.Warn("fsm: removing a received thin snapshot that does not apply to this site's volumes", "id", id, "index", i)
		if err := os.RemoveAll(filepath.Join(s.dir, id)); err != nil {
			s.log.Warn("fsm: cannot remove a snapshot", "id", id, "err", err)
			continue
		}
		delete(s.thin, id)
		delete(s.unrestored, id)
	}
	if err := volume.SyncDir(s.dir); err != nil {
		s.log.Warn("fsm: cannot sync the snapshot directory", "err", err)
	}
}

// recover finishes an interrupted snapshot installation; see SnapshotStore.
func (s *snapshotStore) recover() error {
	f := s.fsm
	for {
		snaps := s.load()
		if len(snaps) == 0 {
			if f.restoring {
				return errors.New("an interrupted snapshot restore cannot be finished: no snapshot is stored")
			}
			return nil
		}
		again, err := s.recoverFrom(snaps[0])
		if err != nil || !again {
			return err
		}
	}
}

// recoverFrom finishes the installation of the newest snapshot if needed.
// It reports again when it removed that snapshot instead (a thin stream
// that does not apply to this site's volumes, received but never
// restored: nothing was changed, and raft's log still holds what it held
// before the install), so that the next newest is looked at.
func (s *snapshotStore) recoverFrom(newest *storedMeta) (again bool, err error) {
	f := s.fsm
	path := s.dataPath(newest)
	file, err := os.Open(path)
	if err != nil {
		return false, err
	}
	defer file.Close()
	h, img, err := newRecordReader(file).readPrologue()
	if err != nil {
		return false, fmt.Errorf("snapshot %s: %w", newest.ID, err)
	}
	switch {
	case newest.Kind == kindNameState && f.restoring:
		return false, fmt.Errorf("an interrupted snapshot restore cannot be finished: the newest snapshot %s is local", newest.ID)
	case newest.Kind == kindNameState && img.Applied > f.checkpointed:
		return false, fmt.Errorf("local snapshot %s covers index %d but the fsm state file only %d: "+
			"the state directory was lost or rolled back; the volumes cannot be trusted", newest.ID, img.Applied, f.checkpointed)
	case newest.Kind == kindNameFull && (f.restoring || max(img.Applied, h.Index) > f.checkpointed):
		if h.Base != nil && !f.restoring {
			if terr := f.checkThin(h, img, f.base); terr != nil {
				s.log.Warn("fsm: removing a received thin snapshot that does not apply to this site's volumes; the leader sends another",
					"id", newest.ID, "index", newest.Index, "err", terr)
				file.Close()
				if err := os.RemoveAll(filepath.Join(s.dir, newest.ID)); err != nil {
					return false, err
				}
				return true, volume.SyncDir(s.dir)
			}
		}
		s.log.Warn("fsm: installing a received snapshot that was not restored before the last shutdown",
			"id", newest.ID, "index", newest.Index, "checkpoint", f.checkpointed, "thin", h.Base != nil)
		st, err := file.Stat()
		if err != nil {
			return false, err
		}
		if _, err := file.Seek(0, io.SeekStart); err != nil {
			return false, err
		}
		f.noteRestoreSize(h.Index, st.Size())
		return false, f.Restore(file)
	}
	return false, nil
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
// is the returned meta's Size (raft sends exactly Size bytes). A received
// thin snapshot (keep records, meaningful only at the site it was planned
// for) is streamed from the live volumes like a local one once this site
// installed it; until then Open returns the stored stream, for raft's
// restore. A generated stream has SetBase and Plan (see fullStream).
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
		img, live, err := s.openReceived(id, sm, file)
		if err != nil {
			file.Close()
			return nil, nil, fmt.Errorf("fsm: open snapshot %s: %w", id, err)
		}
		if !live {
			st, err := file.Stat()
			if err != nil {
				file.Close()
				return nil, nil, fmt.Errorf("fsm: open snapshot: %w", err)
			}
			if _, err := file.Seek(0, io.SeekStart); err != nil {
				file.Close()
				return nil, nil, fmt.Errorf("fsm: open snapshot: %w", err)
			}
			meta.Size = st.Size()
			s.fsm.noteRestoreSize(meta.Index, meta.Size)
			return &meta, file, nil
		}
		file.Close()
		return s.openLive(id, meta, img)
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
	return s.openLive(id, meta, img)
}

// openReceived decides how a received snapshot is opened: live (with the
// state record img) if it is thin, installed here (the durable base is at
// or past its index) and not just published by a sink of this process.
func (s *snapshotStore) openReceived(id string, sm *storedMeta, file *os.File) (*stateImage, bool, error) {
	h, img, err := newRecordReader(file).readPrologue()
	if err != nil {
		return nil, false, err
	}
	if h.Base == nil {
		return nil, false, nil
	}
	s.mu.Lock()
	fresh := s.unrestored[id]
	delete(s.unrestored, id)
	s.mu.Unlock()
	s.fsm.mu.Lock()
	installed := s.fsm.base >= sm.Index
	s.fsm.mu.Unlock()
	return img, !fresh && installed, nil
}

// openLive returns the full stream of snapshot id generated from its state
// record img and the live volumes.
func (s *snapshotStore) openLive(id string, meta raft.SnapshotMeta, img *stateImage) (*raft.SnapshotMeta, io.ReadCloser, error) {
	stream, err := newFullStream(s.fsm.store, meta.Index, img, s.fsm.fuzzyBound)
	if err != nil {
		return nil, nil, fmt.Errorf("fsm: open snapshot %s: %w", id, err)
	}
	stream.marks = &s.fsm.marks
	meta.Size = stream.Size()
	return &meta, stream, nil
}

// noteRestoreSize records the length of the stream about to be restored
// for snapshot index (progress in Stats).
func (f *FSM) noteRestoreSize(index uint64, size int64) {
	f.mu.Lock()
	f.restoreSize.index, f.restoreSize.size = index, size
	f.mu.Unlock()
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
func (s *snapshotStore) commit(tmp, id string, index uint64, thin bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := os.Rename(tmp, filepath.Join(s.dir, id)); err != nil {
		return err
	}
	if thin {
		s.unrestored[id] = true
		s.thin[id] = index
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
		delete(s.unrestored, sm.ID)
		delete(s.thin, sm.ID)
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
	head   []byte // the stream's first bytes, up to the header record's kind
	recv   bool   // a full stream (received): its progress is in Stats
	thin   bool   // set by finish: a version 2 stream
}

// sinkHead is how much of a stream tells its kind: magic, then the header
// record's type, length, version and kind.
const sinkHead = len(streamMagic) + 5 + 2

// ID implements raft.SnapshotSink.
func (k *snapshotSink) ID() string { return k.meta.ID }

// Write implements io.Writer.
func (k *snapshotSink) Write(p []byte) (int, error) {
	if k.closed {
		return 0, errors.New("fsm: write to a closed snapshot sink")
	}
	if len(k.head) < sinkHead {
		k.head = append(k.head, p[:min(len(p), sinkHead-len(k.head))]...)
		if len(k.head) == sinkHead && k.head[len(streamMagic)] == recHeader && k.head[sinkHead-1] == kindFull {
			k.recv = true
			k.store.fsm.startProgress(k, "receiving", 0)
		}
	}
	n, err := k.bw.Write(p)
	if k.recv {
		k.store.fsm.prog.done.Add(int64(n))
	}
	return n, err
}

// Cancel implements raft.SnapshotSink: the snapshot is discarded.
func (k *snapshotSink) Cancel() error {
	if k.closed {
		return nil
	}
	k.closed = true
	k.store.fsm.endProgress(k)
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
	defer k.store.fsm.endProgress(k)
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
		k.thin = h.Base != nil
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
	return k.store.commit(k.tmp, k.meta.ID, k.meta.Index, k.thin)
}
