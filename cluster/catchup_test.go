package cluster

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/robib/robib/fsm"
	"github.com/robib/robib/volume"
)

// ---- the catch-up base JSON ----

func goldenCatchUpBase() fsm.CatchUpBase {
	return fsm.CatchUpBase{Index: 1234, Volumes: []volume.Meta{
		{Name: "a", Size: 8 << 20, BlockSize: 4096, Created: time.Date(2026, 1, 2, 3, 4, 5, 123456789, time.UTC)},
		{Name: "db-1", Size: 1 << 30, BlockSize: 512, Created: time.Unix(0, 42).UTC(), SyncWrites: true},
	}}
}

// TestCatchUpBaseGolden freezes the JSON of the catch-up base (version
// 1) as the endpoint writes it, and checks that it decodes back.
func TestCatchUpBaseGolden(t *testing.T) {
	path := filepath.Join("testdata", "catchup-base.v1.json")
	rec := httptest.NewRecorder()
	handleCatchUpBase(fixedBase(goldenCatchUpBase()))(rec, httptest.NewRequest(http.MethodGet, pathCatchUpBase, nil))
	got := rec.Body.Bytes()
	if *updateGolden {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("encoding changed:\n%s\nwant (frozen):\n%s", got, want)
	}
	const layout = `{"version":1,"index":1234,"volumes":[{"name":"a","size":8388608,"block_size":4096,` +
		`"created_ns":1767323045123456789,"sync_writes":false},{"name":"db-1","size":1073741824,"block_size":512,` +
		`"created_ns":42,"sync_writes":true}]}` + "\n"
	if string(want) != layout {
		t.Fatalf("unexpected layout:\n%s", want)
	}
	b, err := decodeCatchUpBase(want)
	if err != nil || !reflect.DeepEqual(b, goldenCatchUpBase()) {
		t.Fatalf("golden file decodes to %+v, %v", b, err)
	}
	// No base: an empty list, not null.
	rec = httptest.NewRecorder()
	handleCatchUpBase(fixedBase(fsm.CatchUpBase{}))(rec, httptest.NewRequest(http.MethodGet, pathCatchUpBase, nil))
	if s := rec.Body.String(); s != `{"version":1,"index":0,"volumes":[]}`+"\n" {
		t.Fatalf("no base: %s", s)
	}
}

type fixedBase fsm.CatchUpBase

func (b fixedBase) CatchUpBase() fsm.CatchUpBase { return fsm.CatchUpBase(b) }

// TestCatchUpBaseRefusesBadInput: other versions, unknown fields, invalid
// volume metadata, duplicates, overflowing numbers and trailing data are
// refused with ErrBadCatchUpBase.
func TestCatchUpBaseRefusesBadInput(t *testing.T) {
	vol := func(s string) string {
		return `{"version":1,"index":7,"volumes":[` + s + `]}`
	}
	good := `{"name":"a","size":1048576,"block_size":4096,"created_ns":1,"sync_writes":false}`
	if _, err := decodeCatchUpBase([]byte(vol(good))); err != nil {
		t.Fatalf("good: %v", err)
	}
	for name, in := range map[string]string{
		"not json":          `{"version":1,`,
		"version 2":         `{"version":2,"index":7,"volumes":[]}`,
		"no version":        `{"index":7,"volumes":[]}`,
		"no volume list":    `{"version":1,"index":7}`,
		"null volumes":      `{"version":1,"index":7,"volumes":null}`,
		"unknown field":     `{"version":1,"index":7,"volumes":[],"extra":1}`,
		"unknown vol field": vol(`{"name":"a","size":1048576,"block_size":4096,"created_ns":1,"sync_writes":false,"x":1}`),
		"negative index":    `{"version":1,"index":-1,"volumes":[]}`,
		"index overflow":    `{"version":1,"index":18446744073709551616,"volumes":[]}`,
		"size overflow":     vol(`{"name":"a","size":9223372036854775808,"block_size":4096,"created_ns":1}`),
		"negative size":     vol(`{"name":"a","size":-4096,"block_size":4096,"created_ns":1}`),
		"zero size":         vol(`{"name":"a","size":0,"block_size":4096,"created_ns":1}`),
		"unaligned size":    vol(`{"name":"a","size":1000,"block_size":4096,"created_ns":1}`),
		"too large":         vol(`{"name":"a","size":2251799813685248,"block_size":4096,"created_ns":1}`),
		"bad block size":    vol(`{"name":"a","size":1048576,"block_size":3000,"created_ns":1}`),
		"bad name":          vol(`{"name":"../x","size":1048576,"block_size":4096,"created_ns":1}`),
		"empty name":        vol(`{"name":"","size":1048576,"block_size":4096,"created_ns":1}`),
		"duplicate":         vol(good + "," + good),
		"trailing data":     vol(good) + `{}`,
		"string index":      `{"version":1,"index":"7","volumes":[]}`,
	} {
		if _, err := decodeCatchUpBase([]byte(in)); !errors.Is(err, ErrBadCatchUpBase) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// TestCatchUpBaseEndpoint serves a real FSM's base behind the peer gate.
func TestCatchUpBaseEndpoint(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	dir := t.TempDir()
	st, err := volume.Open(filepath.Join(dir, "volumes"), log)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	f, err := fsm.New(st, filepath.Join(dir, "fsm"), fsm.Options{Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	data, _ := fsm.Encode(&fsm.CreateVolume{Name: "v", Size: 2 << 20, BlockSize: 4096, Created: 5})
	f.Apply(&raft.Log{Index: 1, Type: raft.LogCommand, Data: data})
	n := &Node{cfg: Config{PeerName: testPeerName, RequirePeer: true}, fsm: f}
	srv := httptest.NewServer(n.Handler())
	defer srv.Close()
	addr := srv.Listener.Addr().String()
	b, err := fetchCatchUpBase(context.Background(), clientAs("b"), addr)
	if err != nil {
		t.Fatal(err)
	}
	if want := f.CatchUpBase(); b.Index != 1 || !reflect.DeepEqual(b, want) || len(b.Volumes) != 1 {
		t.Fatalf("base %+v, want %+v", b, want)
	}
	if _, err := fetchCatchUpBase(context.Background(), clientAs(""), addr); !errors.Is(err, ErrForbidden) {
		t.Fatalf("without a site identity: %v", err)
	}
}

// ---- the transport wrapper ----

// recordingTransport is the transport under catchUpTransport: it records
// what InstallSnapshot was asked to send.
type recordingTransport struct {
	guardedTransport
	mu   sync.Mutex
	size int64
	sent []byte
}

func (r *recordingTransport) InstallSnapshot(_ raft.ServerID, _ raft.ServerAddress, args *raft.InstallSnapshotRequest,
	_ *raft.InstallSnapshotResponse, data io.Reader) error {
	b, err := io.ReadAll(io.LimitReader(data, args.Size))
	r.mu.Lock()
	r.size, r.sent = args.Size, b
	r.mu.Unlock()
	return err
}

// fakeThin is a stream with SetBase: it records the base it got.
type fakeThin struct {
	io.Reader
	got    *fsm.CatchUpBase
	size   int64
	setErr error
}

func (f *fakeThin) SetBase(b fsm.CatchUpBase) (int64, error) {
	f.got = &b
	return f.size, f.setErr
}

func (f *fakeThin) Plan() fsm.CatchUpPlan { return fsm.CatchUpPlan{Size: f.size, KeptBytes: 99} }

type bookOf map[string]siteMeta

func (b bookOf) memberMeta(site string) (siteMeta, bool) { m, ok := b[site]; return m, ok }

// TestCatchUpTransport: the wrapper fetches the target's base, re-plans the
// stream and sends the new size; when the base cannot be had (no address,
// an error, a bad answer, SetBase failing) it sends the stream as raft
// opened it, with a warning.
func TestCatchUpTransport(t *testing.T) {
	base := goldenCatchUpBase()
	good := httptest.NewServer(handleCatchUpBase(fixedBase(base)))
	defer good.Close()
	garbage := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Write([]byte(`{"version":9,"index":1,"volumes":[]}`))
	}))
	defer garbage.Close()
	failing := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusInternalServerError, map[string]string{"error": "boom"})
	}))
	defer failing.Close()
	book := bookOf{
		"good":    {API: good.Listener.Addr().String()},
		"garbage": {API: garbage.Listener.Addr().String()},
		"failing": {API: failing.Listener.Addr().String()},
		"noapi":   {Raft: "x:1"},
	}
	for _, tc := range []struct {
		target string
		setErr error
		thin   bool // SetBase used and the size changed
	}{
		{"good", nil, true},
		{"good", errors.New("started"), false},
		{"garbage", nil, false},
		{"failing", nil, false},
		{"noapi", nil, false},
		{"unknown", nil, false},
	} {
		t.Run(fmt.Sprintf("%s/%v", tc.target, tc.setErr), func(t *testing.T) {
			logs := &logRecords{}
			inner := &recordingTransport{}
			tr := &catchUpTransport{guardedTransport: inner, log: slog.New(logs), timeout: 300 * time.Millisecond}
			tr.setPeers(book, &rpcClient{http: &http.Client{}})
			stream := &fakeThin{Reader: strings.NewReader("0123456789"), size: 4, setErr: tc.setErr}
			args := &raft.InstallSnapshotRequest{Size: 10, LastLogIndex: 77}
			if err := tr.InstallSnapshot(raft.ServerID(tc.target), "x:1", args, &raft.InstallSnapshotResponse{}, stream); err != nil {
				t.Fatal(err)
			}
			wantSize, wantSent := int64(10), "0123456789"
			if tc.thin {
				wantSize, wantSent = 4, "0123"
			}
			if inner.size != wantSize || string(inner.sent) != wantSent {
				t.Fatalf("sent %d bytes %q, want %d %q", inner.size, inner.sent, wantSize, wantSent)
			}
			if tc.target == "good" && (stream.got == nil || !reflect.DeepEqual(*stream.got, base)) {
				t.Fatalf("SetBase got %+v", stream.got)
			}
			if warned := logs.count(slog.LevelWarn, "sending the whole snapshot"); (warned == 0) != tc.thin {
				t.Fatalf("warnings: %d\n%s", warned, logs.texts())
			}
			if logs.count(slog.LevelInfo, "catch-up: snapshot sent") != 1 || !strings.Contains(logs.texts(), "bytes_kept=99") {
				t.Fatalf("no install record:\n%s", logs.texts())
			}
		})
	}
	// A stored stream (no SetBase) goes as it is.
	inner := &recordingTransport{}
	tr := &catchUpTransport{guardedTransport: inner, log: slog.New(slog.DiscardHandler), timeout: time.Second}
	args := &raft.InstallSnapshotRequest{Size: 3}
	if err := tr.InstallSnapshot("good", "x:1", args, &raft.InstallSnapshotResponse{}, strings.NewReader("abc")); err != nil || string(inner.sent) != "abc" {
		t.Fatalf("stored stream: %q, %v", inner.sent, err)
	}
}

// ---- three sites ----

// catchUpSite is a whole Node on loopback with fixed addresses, so it can
// be stopped and started again on the same data.
type catchUpSite struct {
	name, dir                     string
	raftAddr, apiAddr, gossipAddr string
	join                          []string
	logs                          *logRecords

	node  *Node
	f     *fsm.FSM
	store *volume.Store
	srv   *http.Server
}

func (s *catchUpSite) start(t *testing.T) {
	t.Helper()
	quiet := slog.New(slog.DiscardHandler)
	store, err := volume.Open(filepath.Join(s.dir, "volumes"), quiet)
	if err != nil {
		t.Fatal(err)
	}
	f, err := fsm.New(store, filepath.Join(s.dir, "fsm"), fsm.Options{Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	raftLn, err := net.Listen("tcp", s.raftAddr)
	if err != nil {
		t.Fatal(err)
	}
	apiLn, err := net.Listen("tcp", s.apiAddr)
	if err != nil {
		t.Fatal(err)
	}
	n, err := Open(Config{
		Name: s.name, DataDir: s.dir, RaftAddr: s.raftAddr, GossipAddr: s.gossipAddr, APIAddr: s.apiAddr,
		Join: s.join, BootstrapExpect: 3,
		// No automatic snapshots; a snapshot keeps only 4 entries, so a
		// stopped site needs one.
		SnapshotThreshold: 1 << 40, SnapshotInterval: time.Hour, TrailingLogs: 4,
		RaftListener: raftLn,
		Dial: func(ctx context.Context, addr string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "tcp", addr)
		},
		HTTPClient: &http.Client{Timeout: 30 * time.Second},
		Logger:     slog.New(s.logs),
	}, f)
	if err != nil {
		t.Fatal(err)
	}
	s.node, s.f, s.store = n, f, store
	s.srv = &http.Server{Handler: n.Handler()}
	go s.srv.Serve(apiLn)
}

func (s *catchUpSite) stop() {
	if s.node == nil {
		return
	}
	s.srv.Close()
	s.node.Close()
	s.f.Close()
	s.store.Close()
	s.node = nil
}

func (s *catchUpSite) read(t *testing.T, name string) []byte {
	t.Helper()
	v, err := s.store.Get(name)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, v.Size())
	if _, err := v.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

// installRecord returns the attributes of the leader's last "snapshot
// sent" log record for a successful install at target, if any (attempts
// while the target was down fail, and, without an answer to the base
// request, send everything).
func installRecord(l *logRecords, target string) map[string]slog.Value {
	l.mu.Lock()
	defer l.mu.Unlock()
	var last map[string]slog.Value
	for _, r := range l.recs {
		if r.Message != "catch-up: snapshot sent" {
			continue
		}
		attrs := map[string]slog.Value{}
		r.Attrs(func(a slog.Attr) bool { attrs[a.Key] = a.Value; return true })
		if _, failed := attrs["err"]; attrs["target"].String() == target && !failed {
			last = attrs
		}
	}
	return last
}

// TestCatchUpSendsOnlyChangedChunks: three sites; an 8 MiB volume is
// written; a follower stops; the leader changes 2 chunks, snapshots and
// compacts its log; the follower restarts and catches up through a
// snapshot that carries those 2 chunks and keeps the other 6, ending with
// the leader's bytes.
func TestCatchUpSendsOnlyChangedChunks(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const size, chunk = 8 << 20, 1 << 20
	var sites []*catchUpSite
	for _, name := range []string{"s1", "s2", "s3"} {
		sites = append(sites, &catchUpSite{name: name, dir: t.TempDir(), raftAddr: freeAddr(t), apiAddr: freeAddr(t),
			gossipAddr: freeAddr(t), logs: &logRecords{}})
	}
	for _, s := range sites {
		for _, o := range sites {
			if o != s {
				s.join = append(s.join, o.gossipAddr)
			}
		}
		s.start(t)
		defer s.stop()
	}
	leaderName, err := sites[0].node.WaitForLeader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var leader, follower *catchUpSite
	for _, s := range sites {
		if s.name == leaderName {
			leader = s
		} else if follower == nil {
			follower = s
		}
	}
	apply := func(cmd fsm.Command) uint64 {
		t.Helper()
		res, err := leader.node.Apply(ctx, cmd)
		if err != nil || res.Err != nil {
			t.Fatalf("%T: %v, %+v", cmd, err, res)
		}
		return res.Index
	}
	apply(&fsm.CreateVolume{Name: "v", Size: size, BlockSize: 4096, Created: 7})
	data := make([]byte, size)
	rand.Read(data)
	var last uint64
	seq := uint64(0)
	for off := 0; off < size; off += 512 << 10 {
		seq++
		last = apply(&fsm.WriteBatch{Volume: "v", Session: 1, Seq: seq,
			Ops: []fsm.Op{{Kind: fsm.OpWrite, Off: int64(off), Len: 512 << 10, Data: data[off : off+512<<10]}}})
	}
	for _, s := range sites {
		if err := s.node.WaitApplied(ctx, last); err != nil {
			t.Fatal(err)
		}
	}
	follower.stop()

	// Two chunks change, and the log moves on past what a snapshot keeps.
	seq++
	apply(&fsm.WriteBatch{Volume: "v", Session: 1, Seq: seq, Ops: []fsm.Op{{Kind: fsm.OpWrite, Off: chunk + 4096, Len: 5, Data: []byte("chunk")}}})
	seq++
	apply(&fsm.WriteBatch{Volume: "v", Session: 1, Seq: seq, Ops: []fsm.Op{{Kind: fsm.OpTrim, Off: 5 * chunk, Len: 64 << 10}}})
	for i := range 12 {
		last = apply(&fsm.EndSession{Session: uint64(1000 + i)})
	}
	if err := leader.node.raft.Snapshot().Error(); err != nil {
		t.Fatal(err)
	}

	follower.start(t)
	var rec map[string]slog.Value
	waitFor(t, "the follower to catch up through a snapshot", time.Minute, func() bool {
		rec = installRecord(leader.logs, follower.name)
		return follower.f.AppliedIndex() >= last && rec != nil
	})
	st := follower.f.Stats()
	if st.Restores != 1 || st.Failed != nil || st.CatchUp.Phase != "" {
		t.Fatalf("follower stats %+v", st)
	}
	sent, kept, chunks := rec["bytes_sent"].Int64(), rec["bytes_kept"].Int64(), rec["chunks_sent"].Int64()
	t.Logf("catch-up of %s: %d chunks, %d bytes sent, %d bytes kept (leader %d, restore wrote %d, skipped %d, kept %d)",
		follower.name, chunks, sent, kept, leader.f.AppliedIndex(), st.RestoreBytesWritten, st.RestoreBytesSkipped, st.RestoreBytesKept)
	if chunks != 2 || sent < 2*chunk || sent > 2*chunk+64<<10 || kept != 6*chunk || st.RestoreBytesKept != 6*chunk {
		t.Fatalf("catch-up sent %d chunks, %d bytes, kept %d (restore kept %d); want 2 chunks, about 2 MiB, 6 MiB kept",
			chunks, sent, kept, st.RestoreBytesKept)
	}
	if !bytes.Equal(follower.read(t, "v"), leader.read(t, "v")) {
		t.Fatal("the follower's volume differs from the leader's")
	}
	// And it keeps replicating.
	seq++
	last = apply(&fsm.WriteBatch{Volume: "v", Session: 1, Seq: seq, Ops: []fsm.Op{{Kind: fsm.OpWrite, Off: 7 * chunk, Len: 5, Data: []byte("after")}}})
	if err := follower.node.WaitApplied(ctx, last); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(follower.read(t, "v"), leader.read(t, "v")) {
		t.Fatal("the follower's volume differs from the leader's after a later write")
	}
}

type statsOf fsm.Stats

func (s statsOf) Stats() fsm.Stats { return fsm.Stats(s) }

// TestCatchUpStatus: the site status shows the install in progress from
// the FSM's stats, with the elapsed time on the site's clock.
func TestCatchUpStatus(t *testing.T) {
	if c := catchUpStatus(statsOf{}); c != nil {
		t.Fatalf("no install: %+v", c)
	}
	if c := catchUpStatus(statusIDs{}); c != nil {
		t.Fatalf("an FSM without stats: %+v", c)
	}
	started := time.Now().Add(-3 * time.Second)
	c := catchUpStatus(statsOf{CatchUp: fsm.CatchUpProgress{Phase: "restoring", Started: started, Done: 5, Total: 9}})
	if c == nil || c.Phase != "restoring" || c.BytesDone != 5 || c.BytesTotal != 9 || !c.Started.Equal(started) ||
		c.ElapsedNanos < int64(3*time.Second) || c.ElapsedNanos > int64(time.Minute) {
		t.Fatalf("status %+v", c)
	}
}

// FuzzDecodeCatchUpBase: the decoder never panics, refuses only with
// ErrBadCatchUpBase, and what it accepts encodes and decodes to the same
// base.
func FuzzDecodeCatchUpBase(f *testing.F) {
	if golden, err := os.ReadFile(filepath.Join("testdata", "catchup-base.v1.json")); err == nil {
		f.Add(golden)
	}
	f.Add([]byte(`{"version":1,"index":7,"volumes":[]}`))
	f.Add([]byte(`{"version":2,"index":7,"volumes":[]}`))
	f.Add([]byte(`{"version":1,"index":7,"volumes":[{"name":"v","size":4096,"block_size":4096,"created_ns":1,"sync_writes":false}]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		b, err := decodeCatchUpBase(data)
		if err != nil {
			if !errors.Is(err, ErrBadCatchUpBase) {
				t.Fatalf("error %v does not wrap ErrBadCatchUpBase", err)
			}
			return
		}
		enc, err := json.Marshal(encodeCatchUpBase(b))
		if err != nil {
			t.Fatal(err)
		}
		again, err := decodeCatchUpBase(enc)
		if err != nil {
			t.Fatalf("re-encoded base refused: %v\n%s", err, enc)
		}
		if again.Index != b.Index || !slices.EqualFunc(again.Volumes, b.Volumes, func(x, y volume.Meta) bool {
			return x.Name == y.Name && x.Size == y.Size && x.BlockSize == y.BlockSize && x.Created.Equal(y.Created) && x.SyncWrites == y.SyncWrites
		}) {
			t.Fatalf("round trip changed the base: %+v, then %+v", b, again)
		}
	})
}
