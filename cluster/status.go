package cluster

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"
)

// SiteStatus is one site's view of itself, as `robib cluster status` shows
// it. Fields other than Name are filled from the site itself when it
// answers, else from the Raft configuration and gossip.
type SiteStatus struct {
	Name  string `json:"name"`
	State string `json:"state"` // Leader, Follower, Candidate, Shutdown, unreachable, not-a-voter
	Voter bool   `json:"voter"`
	// Suffrage is "voter", "non-voter" (catching up: promoted once
	// caught up) or "" (not in the Raft configuration).
	Suffrage string `json:"suffrage,omitempty"`
	// ClusterID is the cluster ID this site's state holds ("" while it
	// does not know it yet).
	ClusterID string `json:"cluster_id,omitempty"`
	// Fresh: the site joined with an empty Raft directory and takes no
	// part in elections until it has been a non-voter.
	Fresh             bool   `json:"fresh,omitempty"`
	Gossip            string `json:"gossip"` // alive or gone
	RaftAddr          string `json:"raft_addr"`
	APIAddr           string `json:"api_addr,omitempty"`
	NBDAddr           string `json:"nbd_addr,omitempty"`
	Term              uint64 `json:"term"`
	AppliedIndex      uint64 `json:"applied_index"` // last Raft entry this site applied
	FSMIndex          uint64 `json:"fsm_index"`     // last command entry its state machine applied
	CommitIndex       uint64 `json:"commit_index"`
	LastLogIndex      uint64 `json:"last_log_index"`
	LastSnapshotIndex uint64 `json:"last_snapshot_index"`
	Lag               uint64 `json:"lag"` // entries behind the leader's commit index
	Leader            string `json:"leader,omitempty"`
	// Security is how this site's links are protected: "mtls" (TLS with
	// mutual authentication on every link) or "insecure" (plaintext).
	Security string `json:"security,omitempty"`
	// CertNotAfter is when this site's certificate expires (mtls only).
	CertNotAfter *time.Time `json:"cert_not_after,omitempty"`
	Error        string     `json:"error,omitempty"`
	// Stages: where writes spend their time at this site (stages.go).
	Stages []StageLatency `json:"stages,omitempty"`
	// CatchUp: the snapshot install running at this site, if any
	// (catchup.go).
	CatchUp *CatchUpStatus `json:"catch_up,omitempty"`
	// Degraded lists the volumes whose copy at this site has damaged
	// blocks (failed checksums, I/O errors): reads of them are served
	// from other sites and the site rebuilds them in the background.
	Degraded []DegradedVolume `json:"degraded,omitempty"`
	// RemoteReadBytes and RepairedBytes count, since the site started,
	// the bytes of damaged blocks it read from other sites and the bytes
	// it wrote back into its copy.
	RemoteReadBytes int64 `json:"remote_read_bytes,omitempty"`
	RepairedBytes   int64 `json:"repaired_bytes,omitempty"`
}

// Status is the cluster as seen from the site that answered.
type Status struct {
	Leader      string       `json:"leader"`     // leading site's name, "" when none
	ClusterID   string       `json:"cluster_id"` // as the answering site's state holds it
	CommitIndex uint64       `json:"commit_index"`
	Sites       []SiteStatus `json:"sites"`
}

// statusRaft is what status reads of Raft (all lock-free or internally
// locked in Raft).
type statusRaft interface {
	configReader
	Stats() map[string]string
	State() raft.RaftState
	AppliedIndex() uint64
}

// statusFSM is what status reads of the FSM.
type statusFSM interface {
	AppliedIndex() uint64
	ClusterID() string
}

// statusReporter is cluster status: this site's own view and the
// collection of every site's. It has no state of its own.
type statusReporter struct {
	cfg     Config // Name and the advertised addresses
	raft    statusRaft
	leader  leadership
	fsm     statusFSM
	fresh   *atomic.Bool
	stages  *Stages
	members memberLister
	rpc     jsonGetter
	heal    *healer // nil: no repair path (tests)
}

// LocalStatus implements Node.LocalStatus.
func (r *statusReporter) LocalStatus() SiteStatus {
	st := r.raft.Stats()
	num := func(k string) uint64 { v, _ := strconv.ParseUint(st[k], 10, 64); return v }
	security, certNotAfter := r.security()
	s := SiteStatus{
		Name:              r.cfg.Name,
		State:             r.raft.State().String(),
		RaftAddr:          r.cfg.RaftAddr,
		APIAddr:           r.cfg.APIAddr,
		NBDAddr:           r.cfg.NBDAddr,
		Term:              num("term"),
		AppliedIndex:      r.raft.AppliedIndex(), // counts no-op and configuration entries too, unlike the FSM's
		FSMIndex:          r.fsm.AppliedIndex(),
		CommitIndex:       num("commit_index"),
		LastLogIndex:      num("last_log_index"),
		LastSnapshotIndex: num("last_snapshot_index"),
		Leader:            r.leader.Leader(),
		Gossip:            "alive",
		ClusterID:         r.fsm.ClusterID(),
		Fresh:             r.fresh.Load(),
		Stages:            r.stages.Snapshot(),
		Security:          security,
		CertNotAfter:      certNotAfter,
		CatchUp:           catchUpStatus(r.fsm),
	}
	if r.heal != nil {
		s.Degraded = r.heal.degraded()
		s.RemoteReadBytes, s.RepairedBytes = r.heal.remoteBytes.Load(), r.heal.repairedBytes.Load()
	}
	return s
}

// security is how this site's links are protected and when its
// certificate expires (nil: no certificate), from Config.Security.
func (r *statusReporter) security() (string, *time.Time) {
	if r.cfg.Security == nil {
		return "insecure", nil
	}
	mode, notAfter := r.cfg.Security()
	if mode == "" {
		mode = "insecure"
	}
	if notAfter.IsZero() {
		return mode, nil
	}
	return mode, &notAfter
}

// Status implements Node.Status.
func (r *statusReporter) Status(ctx context.Context) (Status, error) {
	voters := map[string]raft.Server{}
	if fut := r.raft.GetConfiguration(); fut.Error() == nil {
		for _, s := range fut.Configuration().Servers {
			voters[string(s.ID)] = s
		}
	}
	gossip := map[string]member{}
	for _, m := range r.members.members() {
		gossip[m.Name] = m
	}
	names := []string{}
	for name := range voters {
		names = append(names, name)
	}
	for name := range gossip {
		if _, ok := voters[name]; !ok {
			names = append(names, name)
		}
	}
	slices.Sort(names)

	sites := make([]SiteStatus, len(names))
	var wg sync.WaitGroup
	for i, name := range names {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sites[i] = r.siteStatus(ctx, name, voters, gossip)
		}()
	}
	wg.Wait()

	out := Status{Leader: r.leader.Leader(), ClusterID: r.fsm.ClusterID(), Sites: sites}
	for _, s := range sites {
		if s.Name == out.Leader {
			out.CommitIndex = s.CommitIndex
		}
	}
	if out.CommitIndex == 0 {
		for _, s := range sites {
			out.CommitIndex = max(out.CommitIndex, s.CommitIndex)
		}
	}
	for i := range out.Sites {
		if s := &out.Sites[i]; s.AppliedIndex < out.CommitIndex && s.Error == "" {
			s.Lag = out.CommitIndex - s.AppliedIndex
		}
	}
	return out, nil
}

func (r *statusReporter) siteStatus(ctx context.Context, name string, voters map[string]raft.Server, gossip map[string]member) SiteStatus {
	var s SiteStatus
	m, inGossip := gossip[name]
	if name == r.cfg.Name {
		s = r.LocalStatus()
	} else if inGossip {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		err := r.rpc.getJSON(cctx, m.Meta.API, pathLocalStatus, &s)
		cancel()
		if err != nil {
			s = SiteStatus{Name: name, State: "unreachable", RaftAddr: m.Meta.Raft, APIAddr: m.Meta.API, NBDAddr: m.Meta.NBD, Error: err.Error()}
		}
	} else {
		s = SiteStatus{Name: name, State: "unreachable", Error: "not in gossip (down or cut off)"}
	}
	s.Name = name
	switch {
	case name == r.cfg.Name:
		s.Gossip = "alive"
	case !inGossip:
		s.Gossip = "gone"
	default:
		s.Gossip = "alive"
	}
	s.Suffrage = ""
	if v, ok := voters[name]; ok {
		s.Voter = v.Suffrage == raft.Voter
		s.Suffrage = "non-voter"
		if s.Voter {
			s.Suffrage = "voter"
		}
		s.RaftAddr = string(v.Address)
	} else if s.State != "unreachable" {
		s.State = "not-a-voter"
	}
	if inGossip && foreign(r.fsm.ClusterID(), m.Meta.Cluster) {
		s.State = "refused"
		s.Error = fmt.Sprintf("%v: its cluster ID is %s", ErrForeignCluster, m.Meta.Cluster)
	}
	return s
}
