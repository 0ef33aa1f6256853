package cluster

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"sync"
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
	Error             string `json:"error,omitempty"`
	// Stages: where writes spend their time at this site (stages.go).
	Stages []StageLatency `json:"stages,omitempty"`
}

// Status is the cluster as seen from the site that answered.
type Status struct {
	Leader      string       `json:"leader"`     // leading site's name, "" when none
	ClusterID   string       `json:"cluster_id"` // as the answering site's state holds it
	CommitIndex uint64       `json:"commit_index"`
	Sites       []SiteStatus `json:"sites"`
}

// LocalStatus is this site's own view.
func (n *Node) LocalStatus() SiteStatus {
	st := n.raft.Stats()
	num := func(k string) uint64 { v, _ := strconv.ParseUint(st[k], 10, 64); return v }
	return SiteStatus{
		Name:              n.cfg.Name,
		State:             n.raft.State().String(),
		RaftAddr:          n.cfg.RaftAddr,
		APIAddr:           n.cfg.APIAddr,
		NBDAddr:           n.cfg.NBDAddr,
		Term:              num("term"),
		AppliedIndex:      n.raft.AppliedIndex(), // counts no-op and configuration entries too, unlike the FSM's
		FSMIndex:          n.fsm.AppliedIndex(),
		CommitIndex:       num("commit_index"),
		LastLogIndex:      num("last_log_index"),
		LastSnapshotIndex: num("last_snapshot_index"),
		Leader:            n.Leader(),
		Gossip:            "alive",
		ClusterID:         n.fsm.ClusterID(),
		Fresh:             n.fresh.Load(),
		Stages:            n.cfg.Stages.Snapshot(),
	}
}

// Status collects every site's view: the Raft voters plus any gossiping
// site not (yet) a voter. Unreachable sites are listed with State
// "unreachable".
func (n *Node) Status(ctx context.Context) (Status, error) {
	voters := map[string]raft.Server{}
	if fut := n.raft.GetConfiguration(); fut.Error() == nil {
		for _, s := range fut.Configuration().Servers {
			voters[string(s.ID)] = s
		}
	}
	gossip := map[string]member{}
	for _, m := range n.members() {
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
			sites[i] = n.siteStatus(ctx, name, voters, gossip)
		}()
	}
	wg.Wait()

	out := Status{Leader: n.Leader(), ClusterID: n.fsm.ClusterID(), Sites: sites}
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

func (n *Node) siteStatus(ctx context.Context, name string, voters map[string]raft.Server, gossip map[string]member) SiteStatus {
	var s SiteStatus
	m, inGossip := gossip[name]
	if name == n.cfg.Name {
		s = n.LocalStatus()
	} else if inGossip {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		err := n.rpc.getJSON(cctx, m.Meta.API, pathLocalStatus, &s)
		cancel()
		if err != nil {
			s = SiteStatus{Name: name, State: "unreachable", RaftAddr: m.Meta.Raft, APIAddr: m.Meta.API, NBDAddr: m.Meta.NBD, Error: err.Error()}
		}
	} else {
		s = SiteStatus{Name: name, State: "unreachable", Error: "not in gossip (down or cut off)"}
	}
	s.Name = name
	switch {
	case name == n.cfg.Name:
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
	if inGossip && foreign(n.fsm.ClusterID(), m.Meta.Cluster) {
		s.State = "refused"
		s.Error = fmt.Sprintf("%v: its cluster ID is %s", ErrForeignCluster, m.Meta.Cluster)
	}
	return s
}

// removeServerLocal removes a site from the Raft configuration; leader only.
func (n *Node) removeServerLocal(site string) error {
	if !n.IsLeader() {
		return ErrNotLeader
	}
	fut := n.raft.GetConfiguration()
	if err := fut.Error(); err != nil {
		return raftErr(err)
	}
	if !slices.ContainsFunc(fut.Configuration().Servers, func(s raft.Server) bool { return string(s.ID) == site }) {
		return fmt.Errorf("%w: %q is not a member", ErrUnknownSite, site)
	}
	if err := n.raft.RemoveServer(raft.ServerID(site), 0, 10*time.Second).Error(); err != nil {
		return raftErr(err)
	}
	n.log.Info("removed site from the cluster", "site", site)
	return nil
}

// onLeader runs fn locally when this site leads, else asks the leader's
// internal endpoint path with body. Transient failures are retried until
// ctx ends.
func (n *Node) onLeader(ctx context.Context, local func() error, path string, body any) error {
	backoff := 50 * time.Millisecond
	for {
		var err error
		if n.IsLeader() {
			err = local()
		} else if leader := n.Leader(); leader == "" {
			err = ErrNoLeader
		} else if meta, ok := n.memberMeta(leader); !ok {
			err = ErrNoLeader
		} else {
			err = n.rpc.postJSON(ctx, meta.API, path, body)
		}
		if err == nil || !IsRetryable(err) {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last: %v)", ctx.Err(), err)
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, time.Second)
	}
}

// RemoveSite removes a dead site from the cluster (an operator's decision:
// nothing removes a voter silently). A site that is alive must leave by
// itself with Leave, so that gossip does not add it back.
func (n *Node) RemoveSite(ctx context.Context, site string) error {
	if site == n.cfg.Name {
		return fmt.Errorf("%w: use leave to remove the site you are talking to", ErrInvalidRequest)
	}
	for _, m := range n.members() {
		if m.Name == site {
			return fmt.Errorf("%w: site %s is alive; run `robib cluster leave` against it", ErrInvalidRequest, site)
		}
	}
	return n.onLeader(ctx, func() error { return n.removeServerLocal(site) }, pathRemoveServer, siteRequest{Site: site})
}

// Leave removes this site from the cluster cleanly: it leaves gossip (so
// the leader does not add it back), then has the leader remove it from the
// Raft configuration. Its data stays on disk; the agent should be stopped
// afterwards.
func (n *Node) Leave(ctx context.Context) error {
	n.leftMu.Lock()
	defer n.leftMu.Unlock()
	if n.left.Load() {
		return nil
	}
	if n.IsLeader() {
		if err := n.raft.LeadershipTransfer().Error(); err != nil {
			return fmt.Errorf("handing over leadership before leaving: %w", raftErr(err))
		}
	}
	n.leaving.Store(true) // stop the gossip loop from rejoining
	if err := n.ml.Leave(5 * time.Second); err != nil {
		n.leaving.Store(false)
		return fmt.Errorf("leaving gossip: %w", err)
	}
	if err := n.onLeader(ctx, func() error { return n.removeServerLocal(n.cfg.Name) }, pathRemoveServer, siteRequest{Site: n.cfg.Name}); err != nil {
		return err
	}
	n.left.Store(true)
	n.log.Info("left the cluster", "site", n.cfg.Name)
	return nil
}

// transferLocal hands leadership to site (or to any voter when empty);
// leader only.
func (n *Node) transferLocal(site string) error {
	if !n.IsLeader() {
		return ErrNotLeader
	}
	var fut raft.Future
	if site == "" {
		fut = n.raft.LeadershipTransfer()
	} else {
		cfg := n.raft.GetConfiguration()
		if err := cfg.Error(); err != nil {
			return raftErr(err)
		}
		var target *raft.Server
		for _, s := range cfg.Configuration().Servers {
			if string(s.ID) == site {
				target = &s
			}
		}
		if target == nil {
			return fmt.Errorf("%w: %q is not a member", ErrUnknownSite, site)
		}
		if site == n.cfg.Name {
			return nil
		}
		fut = n.raft.LeadershipTransferToServer(target.ID, target.Address)
	}
	if err := fut.Error(); err != nil {
		return fmt.Errorf("leadership transfer: %w", err)
	}
	return nil
}

// TransferLeadership moves leadership to site ("" lets Raft pick) and
// waits until a new leader is known.
func (n *Node) TransferLeadership(ctx context.Context, site string) (string, error) {
	old := n.Leader()
	if site != "" && site == old {
		return old, nil
	}
	if err := n.onLeader(ctx, func() error { return n.transferLocal(site) }, pathTransfer, siteRequest{Site: site}); err != nil {
		return "", err
	}
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		l := n.Leader()
		if l != "" && l != old && (site == "" || l == site) {
			return l, nil
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("waiting for the new leader: %w", ctx.Err())
		case <-t.C:
		}
	}
}
