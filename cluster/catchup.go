package cluster

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"

	"github.com/robib/robib/fsm"
	"github.com/robib/robib/volume"
)

// Catch-up proportional to what changed (DESIGN.md, "Catch-up"): before
// raft streams a snapshot to a follower, the leader asks the follower for
// its base (GET /internal/v1/catchup-base: its durable index and its
// volumes' incarnations) and has the snapshot stream send keep records for
// every chunk no entry after that index touched.

const (
	pathCatchUpBase = "/internal/v1/catchup-base"
	// catchUpBaseVersion is the version of the catch-up base JSON,
	// frozen by testdata/catchup-base.v1.json.
	catchUpBaseVersion = 1
	// catchUpBaseTimeout bounds the leader's question: on any failure it
	// sends the whole snapshot, as before.
	catchUpBaseTimeout = 5 * time.Second
)

// catchUpBaseJSON is the JSON of a site's catch-up base (version 1):
//
//	{"version":1,"index":N,"volumes":[{"name":..,"size":..,"block_size":..,
//	 "created_ns":..,"sync_writes":..},...]}
//
// index is the site's durable base (fsm.CatchUpBase.Index), volumes its
// volumes' incarnations and sizes, sorted by name. "volumes" is [] when
// there are none; index 0 with no volumes means "no base". The decoder
// refuses other versions, unknown fields, invalid volume metadata and
// duplicate names.
type catchUpBaseJSON struct {
	Version int                 `json:"version"`
	Index   uint64              `json:"index"`
	Volumes []catchUpVolumeJSON `json:"volumes"`
}

type catchUpVolumeJSON struct {
	Name       string `json:"name"`
	Size       int64  `json:"size"`
	BlockSize  int    `json:"block_size"`
	CreatedNs  int64  `json:"created_ns"`
	SyncWrites bool   `json:"sync_writes"`
}

func encodeCatchUpBase(b fsm.CatchUpBase) catchUpBaseJSON {
	out := catchUpBaseJSON{Version: catchUpBaseVersion, Index: b.Index, Volumes: []catchUpVolumeJSON{}}
	for _, m := range b.Volumes {
		out.Volumes = append(out.Volumes, catchUpVolumeJSON{Name: m.Name, Size: m.Size, BlockSize: m.BlockSize,
			CreatedNs: m.Created.UnixNano(), SyncWrites: m.SyncWrites})
	}
	return out
}

// decodeCatchUpBase parses and checks a catch-up base; errors wrap
// ErrBadCatchUpBase.
func decodeCatchUpBase(data []byte) (fsm.CatchUpBase, error) {
	var in catchUpBaseJSON
	d := json.NewDecoder(bytes.NewReader(data))
	d.DisallowUnknownFields()
	if err := d.Decode(&in); err != nil {
		return fsm.CatchUpBase{}, fmt.Errorf("%w: %v", ErrBadCatchUpBase, err)
	}
	if d.More() {
		return fsm.CatchUpBase{}, fmt.Errorf("%w: data after the object", ErrBadCatchUpBase)
	}
	if in.Version != catchUpBaseVersion {
		return fsm.CatchUpBase{}, fmt.Errorf("%w: version %d (this build reads %d)", ErrBadCatchUpBase, in.Version, catchUpBaseVersion)
	}
	if in.Volumes == nil {
		return fsm.CatchUpBase{}, fmt.Errorf("%w: no volume list", ErrBadCatchUpBase)
	}
	out := fsm.CatchUpBase{Index: in.Index, Volumes: make([]volume.Meta, 0, len(in.Volumes))}
	seen := make(map[string]bool, len(in.Volumes))
	for _, v := range in.Volumes {
		m := volume.Meta{Name: v.Name, Size: v.Size, BlockSize: v.BlockSize, Created: time.Unix(0, v.CreatedNs).UTC(), SyncWrites: v.SyncWrites}
		if err := volume.ValidateMeta(m); err != nil {
			return fsm.CatchUpBase{}, fmt.Errorf("%w: %v", ErrBadCatchUpBase, err)
		}
		if seen[m.Name] {
			return fsm.CatchUpBase{}, fmt.Errorf("%w: volume %q listed twice", ErrBadCatchUpBase, m.Name)
		}
		seen[m.Name] = true
		out.Volumes = append(out.Volumes, m)
	}
	return out, nil
}

// catchUpSource is what the endpoint reads (the FSM).
type catchUpSource interface {
	CatchUpBase() fsm.CatchUpBase
}

// handleCatchUpBase serves this site's catch-up base.
func handleCatchUpBase(src catchUpSource) http.HandlerFunc {
	return func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, encodeCatchUpBase(src.CatchUpBase()))
	}
}

// fetchCatchUpBase asks the site at addr (its API address) for its base.
func fetchCatchUpBase(ctx context.Context, rpc jsonGetter, addr string) (fsm.CatchUpBase, error) {
	var raw json.RawMessage
	if err := rpc.getJSON(ctx, addr, pathCatchUpBase, &raw); err != nil {
		return fsm.CatchUpBase{}, err
	}
	return decodeCatchUpBase(raw)
}

// thinStream is the consumer's view of the snapshot stream the FSM's
// snapshot store opens (fsm's full stream): SetBase re-plans it against a
// follower's base and returns its new exact length.
type thinStream interface {
	SetBase(fsm.CatchUpBase) (int64, error)
}

// plannedStream reports what a stream sends, for the log.
type plannedStream interface {
	Plan() fsm.CatchUpPlan
}

// catchUpPeers resolves a follower's API address and calls it; set once the
// roles are wired (Raft, hence this transport, starts before gossip).
type catchUpPeers struct {
	book addressBook
	rpc  jsonGetter
}

// catchUpTransport makes InstallSnapshot a catch-up: it asks the target
// for its base and re-plans the stream (keep records for every chunk the
// target already holds), setting args.Size to the new length. Any failure
// (no address, no answer within catchUpBaseTimeout, a bad answer, a stream
// without SetBase) sends the stream as raft opened it, with a warning.
// Every other method is the wrapped transport's.
type catchUpTransport struct {
	guardedTransport
	log     *slog.Logger
	timeout time.Duration
	peers   atomic.Pointer[catchUpPeers]
}

func (t *catchUpTransport) setPeers(book addressBook, rpc jsonGetter) {
	t.peers.Store(&catchUpPeers{book: book, rpc: rpc})
}

// base fetches id's catch-up base. A follower that just restarted may not
// be back in gossip yet: its address is looked up until the timeout.
func (t *catchUpTransport) base(id raft.ServerID) (fsm.CatchUpBase, error) {
	ctx, cancel := context.WithTimeout(context.Background(), t.timeout)
	defer cancel()
	for {
		if p := t.peers.Load(); p != nil {
			if meta, ok := p.book.memberMeta(string(id)); ok && meta.API != "" {
				return fetchCatchUpBase(ctx, p.rpc, meta.API)
			}
		}
		select {
		case <-ctx.Done():
			return fsm.CatchUpBase{}, fmt.Errorf("%w: site %s has no known API address", ErrUnknownSite, id)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// InstallSnapshot plans the stream against the target's base, then sends
// it.
func (t *catchUpTransport) InstallSnapshot(id raft.ServerID, target raft.ServerAddress, args *raft.InstallSnapshotRequest,
	resp *raft.InstallSnapshotResponse, data io.Reader) error {
	who := []any{"target", string(id), "snapshot_index", args.LastLogIndex}
	if thin, ok := data.(thinStream); ok {
		if b, err := t.base(id); err != nil {
			t.log.Warn("catch-up: cannot get the follower's base; sending the whole snapshot", append(who, "err", err)...)
		} else if size, err := thin.SetBase(b); err != nil {
			t.log.Warn("catch-up: cannot plan the snapshot against the follower's base; sending the whole snapshot", append(who, "err", err)...)
		} else {
			args.Size = size
		}
	} else {
		t.log.Info("catch-up: the snapshot is a stored stream; sending it as it is", append(who, "bytes", args.Size)...)
	}
	start := time.Now()
	err := t.guardedTransport.InstallSnapshot(id, target, args, resp, data)
	if p, ok := data.(plannedStream); ok {
		plan := p.Plan()
		attrs := append(who, "chunks_sent", plan.DataChunks, "bytes_sent", args.Size, "bytes_kept", plan.KeptBytes,
			"base_index", plan.Base, "duration", time.Since(start).Round(time.Millisecond))
		if plan.Reason != "" {
			attrs = append(attrs, "full_because", plan.Reason)
		}
		if err != nil {
			attrs = append(attrs, "err", err)
		}
		t.log.Info("catch-up: snapshot sent", attrs...)
	}
	return err
}

// CatchUpStatus is a snapshot install in progress at a site, as status
// shows it (from fsm.Stats.CatchUp): bytes done of the stream's length
// since the start, so a rate and an ETA follow.
type CatchUpStatus struct {
	// Phase: "receiving" (storing the leader's stream; its length is not
	// known yet) or "restoring" (installing the stored stream).
	Phase      string    `json:"phase"`
	BytesDone  int64     `json:"bytes_done"`
	BytesTotal int64     `json:"bytes_total,omitempty"` // 0: unknown
	Started    time.Time `json:"started"`
	// ElapsedNanos is the time since Started on the site's own clock (the
	// reader's may differ): rate = BytesDone / elapsed.
	ElapsedNanos int64 `json:"elapsed_ns"`
}

// catchUpStatus reads the install in progress from f, if it reports one.
func catchUpStatus(f any) *CatchUpStatus {
	s, ok := f.(interface{ Stats() fsm.Stats })
	if !ok {
		return nil
	}
	p := s.Stats().CatchUp
	if p.Phase == "" {
		return nil
	}
	return &CatchUpStatus{Phase: p.Phase, BytesDone: p.Done, BytesTotal: p.Total, Started: p.Started,
		ElapsedNanos: int64(time.Since(p.Started))}
}
