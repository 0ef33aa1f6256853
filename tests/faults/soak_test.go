package faults

import (
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/robib/robib/tests/checker"
)

func envInt(t *testing.T, name string, def int) int {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 {
		t.Fatalf("%s=%q: want a positive integer", name, v)
	}
	return n
}

// fault is one kind of soak round: inject on site, then recover it.
type fault struct {
	name    string
	target  func(e *env, leader string, rng *rand.Rand) string
	inject  func(e *env, site string)
	recover func(e *env, site string)
}

func anySite(e *env, _ string, rng *rand.Rand) string {
	names := e.c.Names()
	return names[rng.IntN(len(names))]
}
func theLeader(_ *env, leader string, _ *rand.Rand) string { return leader }
func aFollower(e *env, leader string, rng *rand.Rand) string {
	fs := e.others(leader)
	return fs[rng.IntN(len(fs))]
}

var faults = []fault{
	{"kill -9 leader", theLeader, func(e *env, s string) { e.c.Kill(s) }, func(e *env, s string) { e.c.Start(s) }},
	{"kill -9 follower", aFollower, func(e *env, s string) { e.c.Kill(s) }, func(e *env, s string) { e.c.Start(s) }},
	{"SIGSTOP leader", theLeader, func(e *env, s string) { e.c.Signal(s, "STOP") }, func(e *env, s string) { e.c.Signal(s, "CONT") }},
	{"SIGSTOP follower", aFollower, func(e *env, s string) { e.c.Signal(s, "STOP") }, func(e *env, s string) { e.c.Signal(s, "CONT") }},
	{"cut off leader", theLeader, func(e *env, s string) { e.c.Partition(s) }, func(e *env, s string) { e.c.Heal(s) }},
	{"cut off follower", aFollower, func(e *env, s string) { e.c.Partition(s) }, func(e *env, s string) { e.c.Heal(s) }},
	{"restart a site", anySite, func(e *env, s string) {
		if err := e.c.Stop(s); err != nil {
			e.t.Error(err)
		}
	}, func(e *env, s string) { e.c.Start(s) }},
}

// TestSoak runs randomised fault rounds under one continuously writing
// client that follows the cluster from site to site, then proves at every
// site that nothing it flushed was lost. ROBIB_SOAK_ROUNDS sets the number
// of rounds (default 4; `make soak` runs 100), ROBIB_SOAK_SEED the seed.
func TestSoak(t *testing.T) {
	rounds := envInt(t, "ROBIB_SOAK_ROUNDS", 4)
	seed := uint64(time.Now().UnixNano())
	if v := os.Getenv("ROBIB_SOAK_SEED"); v != "" {
		s, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("ROBIB_SOAK_SEED=%q: %v", v, err)
		}
		seed = s
	}
	t.Logf("soak: %d rounds, seed %d (ROBIB_SOAK_SEED to repeat)", rounds, seed)
	rng := rand.New(rand.NewPCG(seed, seed^0x5eed))

	e := newEnv(t, "64MiB")
	names := e.c.Names()
	addrs := make([]string, len(names))
	for i, n := range names {
		addrs[i] = e.nbd(n)
	}
	r := e.startRun("writer", checker.Options{Addrs: addrs, Blocks: 4096, Seed: seed})
	r.waitFlushes(10, time.Minute)

	var leaderKills []time.Duration
	counts := map[string]int{}
	for round := 1; round <= rounds; round++ {
		leader := e.c.MustLeader()
		f := faults[rng.IntN(len(faults))]
		site := f.target(e, leader, rng)
		hold := time.Duration(500+rng.IntN(3500)) * time.Millisecond
		writerAt := r.ck.Snapshot().CurrentAddr

		f.inject(e, site)
		t0 := time.Now() // the fault is in place
		// Hold the fault, but never sleep blind: the client keeps being
		// watched (a stall that outlives the hold is measured below).
		time.Sleep(hold)
		f.recover(e, site)
		e.c.WaitReady(2*time.Minute, len(names))
		stall := r.stallAfter(t0, 2*time.Minute)
		r.waitFlushes(5, 2*time.Minute)
		counts[f.name]++
		name := fmt.Sprintf("round %d: %s %s for %v", round, f.name, site, hold.Round(time.Millisecond))
		report(t, name, stall, r)
		if f.name == "kill -9 leader" && writerAt != e.nbd(site) {
			leaderKills = append(leaderKills, stall)
		}
		if round%25 == 0 || round == rounds {
			e.c.WaitCaughtUp(2 * time.Minute)
		}
	}
	t.Logf("soak rounds by fault: %v", counts)
	if len(leaderKills) > 0 {
		median, worst := durations(leaderKills)
		t.Logf("leader kills with the client at a follower: %d, stall median %v, worst %v (includes the hold before recovery)",
			len(leaderKills), median.Round(time.Millisecond), worst.Round(time.Millisecond))
	}
	e.verifyEverywhere(r)
}
