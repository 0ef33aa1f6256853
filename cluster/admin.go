package cluster

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"
)

// adminRaft is what the admin role needs of Raft.
type adminRaft interface {
	configReader
	RemoveServer(id raft.ServerID, prevIndex uint64, timeout time.Duration) raft.IndexFuture
	LeadershipTransfer() raft.Future
	LeadershipTransferToServer(id raft.ServerID, address raft.ServerAddress) raft.Future
}

// gossipLeaver announces this site's departure to gossip (membership).
type gossipLeaver interface {
	leave(timeout time.Duration) error
}

// jsonPoster posts to another site's internal endpoint (rpcClient).
type jsonPoster interface {
	postJSON(ctx context.Context, addr, path string, in any) error
}

// admin is membership administration: leave, remove, leadership transfer,
// each run on the leader or sent to it. leftMu serialises Leave; left and
// leaving are atomics read by the gossip and placement loops (hasLeft).
type admin struct {
	self    string
	log     *slog.Logger
	raft    adminRaft
	leader  leadership
	book    addressBook
	members memberLister
	gossip  gossipLeaver
	rpc     jsonPoster

	leftMu  sync.Mutex  // serialises Leave
	left    atomic.Bool // Leave finished
	leaving atomic.Bool // Leave started: gossip must not rejoin
}

// hasLeft reports whether this site left (or is leaving) the cluster.
func (a *admin) hasLeft() bool { return a.leaving.Load() || a.left.Load() }

// removeServerLocal removes a site from the Raft configuration; leader only.
func (a *admin) removeServerLocal(site string) error {
	if !a.leader.IsLeader() {
		return ErrNotLeader
	}
	fut := a.raft.GetConfiguration()
	if err := fut.Error(); err != nil {
		return raftErr(err)
	}
	if !slices.ContainsFunc(fut.Configuration().Servers, func(s raft.Server) bool { return string(s.ID) == site }) {
		return fmt.Errorf("%w: %q is not a member", ErrUnknownSite, site)
	}
	if err := a.raft.RemoveServer(raft.ServerID(site), 0, 10*time.Second).Error(); err != nil {
		return raftErr(err)
	}
	a.log.Info("removed site from the cluster", "site", site)
	return nil
}

// onLeader runs fn locally when this site leads, else asks the leader's
// internal endpoint path with body. Transient failures are retried until
// ctx ends.
func (a *admin) onLeader(ctx context.Context, local func() error, path string, body any) error {
	backoff := 50 * time.Millisecond
	for {
		var err error
		if a.leader.IsLeader() {
			err = local()
		} else if leader := a.leader.Leader(); leader == "" {
			err = ErrNoLeader
		} else if meta, ok := a.book.memberMeta(leader); !ok {
			err = ErrNoLeader
		} else {
			err = a.rpc.postJSON(ctx, meta.API, path, body)
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

// RemoveSite implements Node.RemoveSite.
func (a *admin) RemoveSite(ctx context.Context, site string) error {
	if site == a.self {
		return fmt.Errorf("%w: use leave to remove the site you are talking to", ErrInvalidRequest)
	}
	for _, m := range a.members.members() {
		if m.Name == site {
			return fmt.Errorf("%w: site %s is alive; run `robib cluster leave` against it", ErrInvalidRequest, site)
		}
	}
	return a.onLeader(ctx, func() error { return a.removeServerLocal(site) }, pathRemoveServer, siteRequest{Site: site})
}

// Leave implements Node.Leave.
func (a *admin) Leave(ctx context.Context) error {
	a.leftMu.Lock()
	defer a.leftMu.Unlock()
	if a.left.Load() {
		return nil
	}
	if a.leader.IsLeader() {
		if err := a.raft.LeadershipTransfer().Error(); err != nil {
			return fmt.Errorf("handing over leadership before leaving: %w", raftErr(err))
		}
	}
	a.leaving.Store(true) // stop the gossip loop from rejoining
	if err := a.gossip.leave(5 * time.Second); err != nil {
		a.leaving.Store(false)
		return fmt.Errorf("leaving gossip: %w", err)
	}
	if err := a.onLeader(ctx, func() error { return a.removeServerLocal(a.self) }, pathRemoveServer, siteRequest{Site: a.self}); err != nil {
		return err
	}
	a.left.Store(true)
	a.log.Info("left the cluster", "site", a.self)
	return nil
}

// transferLocal hands leadership to site (or to any voter when empty);
// leader only.
func (a *admin) transferLocal(site string) error {
	if !a.leader.IsLeader() {
		return ErrNotLeader
	}
	var fut raft.Future
	if site == "" {
		fut = a.raft.LeadershipTransfer()
	} else {
		cfg := a.raft.GetConfiguration()
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
		if site == a.self {
			return nil
		}
		fut = a.raft.LeadershipTransferToServer(target.ID, target.Address)
	}
	if err := fut.Error(); err != nil {
		return fmt.Errorf("leadership transfer: %w", err)
	}
	return nil
}

// TransferLeadership implements Node.TransferLeadership.
func (a *admin) TransferLeadership(ctx context.Context, site string) (string, error) {
	old := a.leader.Leader()
	if site != "" && site == old {
		return old, nil
	}
	if err := a.onLeader(ctx, func() error { return a.transferLocal(site) }, pathTransfer, siteRequest{Site: site}); err != nil {
		return "", err
	}
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		l := a.leader.Leader()
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

// isLiveVoter reports whether site is a voter that gossip sees alive.
func (a *admin) isLiveVoter(site string) bool {
	if _, ok := a.book.memberMeta(site); !ok {
		return false
	}
	cfg := a.raft.GetConfiguration()
	if cfg.Error() != nil {
		return false
	}
	for _, s := range cfg.Configuration().Servers {
		if string(s.ID) == site {
			return s.Suffrage == raft.Voter
		}
	}
	return false
}

// handleRemoveServer removes a site for another one: itself (Leave), or a
// dead site (RemoveSite). A known sender (peer binding) may not remove
// another site that gossip shows alive: a live site leaves by itself.
func (a *admin) handleRemoveServer(w http.ResponseWriter, r *http.Request) {
	handleSiteRequest(w, r, func(site string) error {
		if peer, ok := requestPeer(r); ok && peer != site {
			if slices.ContainsFunc(a.members.members(), func(m member) bool { return m.Name == site }) {
				return fmt.Errorf("%w: site %q may not remove site %q, which is alive: a live site leaves by itself", ErrForbidden, peer, site)
			}
		}
		return a.removeServerLocal(site)
	})
}

func (a *admin) handleTransfer(w http.ResponseWriter, r *http.Request) {
	handleSiteRequest(w, r, a.transferLocal)
}

// handleSiteRequest decodes a siteRequest and answers 204 once do(site)
// succeeded, or the error's status.
func handleSiteRequest(w http.ResponseWriter, r *http.Request, do func(site string) error) {
	var req siteRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 4096)).Decode(&req); err != nil {
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": err.Error()})
		return
	}
	if err := do(req.Site); err != nil {
		writeJSON(w, statusFor(err), map[string]string{"error": err.Error()})
		return
	}
	w.WriteHeader(http.StatusNoContent)
}
