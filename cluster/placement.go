package cluster

import (
	"log/slog"
	"sync"
	"time"
)

// Leader placement: with Config.LeaderFollowsWrites the leader hands
// leadership to the site whose write batches it keeps committing. A write
// made at a follower costs a forward to the leader and back on top of the
// replicated commit; across a WAN that is a second round trip per flush.
// Offices usually write their own volumes, so moving the leader to the
// site that writes makes most commits one round trip.
//
// The policy is deliberately slow and sticky, so two sites writing at once
// cannot make leadership flap:
//   - the leader counts write batches by the site they came from, per
//     window (placementWindow);
//   - one other site must send at least placementShare of the batches, and
//     at least placementMinBatches, in placementStreak windows in a row;
//   - a leader keeps leadership at least placementSettle after taking
//     office, whoever wrote meanwhile.
//
// Moving the leader is an ordinary Raft leadership transfer (as with
// `robib cluster transfer-leadership`): writes in flight are answered
// "retry" and resent to the new leader; nothing is lost or reordered.
const (
	placementWindow     = 2 * time.Second
	placementStreak     = 2
	placementShare      = 0.9
	placementMinBatches = 16
	placementSettle     = 10 * time.Second
)

// writeOrigins counts, on the leader, the write batches it proposed per
// originating site during the current window.
type writeOrigins struct {
	mu     sync.Mutex // guards counts
	counts map[string]int
}

// maxOriginName bounds a site name taken from a forwarded request's header:
// the counts are statistics, never trusted for anything else.
const maxOriginName = 256

func (w *writeOrigins) note(site string) {
	if site == "" || len(site) > maxOriginName {
		return
	}
	w.mu.Lock()
	if w.counts == nil {
		w.counts = map[string]int{}
	}
	w.counts[site]++
	w.mu.Unlock()
}

// take returns the window's counts and starts a new window.
func (w *writeOrigins) take() map[string]int {
	w.mu.Lock()
	defer w.mu.Unlock()
	c := w.counts
	w.counts = nil
	return c
}

// dominantWriter returns the site that sent at least placementShare of the
// window's batches, if the window had at least placementMinBatches.
func dominantWriter(counts map[string]int) (string, bool) {
	total, top, topN := 0, "", 0
	for site, n := range counts {
		total += n
		if n > topN || (n == topN && site < top) {
			top, topN = site, n
		}
	}
	if total < placementMinBatches || float64(topN) < placementShare*float64(total) {
		return "", false
	}
	return top, true
}

// placer decides, window by window, whether leadership should move. It is
// the loop's state, kept apart from the clock and Raft so it can be tested
// as a plain function of its inputs.
type placer struct {
	self        string
	leaderSince time.Time // when this site took office (zero: not leader)
	streakSite  string    // the site that dominated the last windows
	streak      int       // how many windows in a row
}

// observe takes one window's counts at now, with whether this site leads,
// and returns the site leadership should move to, or "".
func (p *placer) observe(now time.Time, leader bool, counts map[string]int) string {
	if !leader {
		*p = placer{self: p.self}
		return ""
	}
	if p.leaderSince.IsZero() {
		p.leaderSince = now
	}
	site, ok := dominantWriter(counts)
	if !ok || site == p.self {
		p.streakSite, p.streak = "", 0
		return ""
	}
	if site != p.streakSite {
		p.streakSite, p.streak = site, 0
	}
	p.streak++
	if p.streak < placementStreak || now.Sub(p.leaderSince) < placementSettle {
		return ""
	}
	p.streakSite, p.streak = "", 0
	return site
}

// leaderMover is what placement needs to move leadership (admin).
type leaderMover interface {
	hasLeft() bool
	isLiveVoter(site string) bool
	transferLocal(site string) error
}

// placement is leader placement: the leader's count of write batches by
// origin (origins, under its own lock, written by every proposal) and the
// loop that runs the placer on it every window (the placer is the loop's
// alone).
type placement struct {
	self    string
	log     *slog.Logger
	leader  leadership
	mover   leaderMover
	origins writeOrigins
}

// note counts one write batch from site (originCounter).
func (p *placement) note(site string) { p.origins.note(site) }

// loop runs the placer every window until stop is closed.
func (p *placement) loop(stop <-chan struct{}) {
	t := time.NewTicker(placementWindow)
	defer t.Stop()
	pl := placer{self: p.self}
	for {
		select {
		case <-stop:
			return
		case now := <-t.C:
			leader := p.leader.IsLeader() && !p.mover.hasLeft()
			site := pl.observe(now, leader, p.origins.take())
			if site == "" || !p.mover.isLiveVoter(site) {
				continue
			}
			p.log.Info("moving leadership to the site that writes", "site", site)
			if err := p.mover.transferLocal(site); err != nil {
				p.log.Warn("leadership transfer to the writing site failed", "site", site, "err", err)
			}
		}
	}
}
