package faults

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/robib/robib/tests/checker"
)

// recreateVolSize is the volume of TestDeleteRecreateUnderKill9: small, so
// a cycle is quick.
const recreateVolSize = "16MiB"

// TestDeleteRecreateUnderKill9 repeatedly deletes the volume, creates it
// again, attaches it read-write and writes and flushes, while kill -9 hits
// a random site (the leader included) at a random moment of the cycle:
// in half the cycles around the time the previous delete took to be
// acknowledged, so that some kill lands inside the delete as the sites
// apply it, otherwise anywhere in the first two seconds. The killed site
// is started again and the next cycle goes on. Each cycle's flushed data must read back at every
// site; afterwards every site must agree (`volume verify`), and a
// read-write attach at every site in turn must work, its flushed data read
// back everywhere. ROBIB_RECREATE_CYCLES sets the number of cycles
// (default 15).
func TestDeleteRecreateUnderKill9(t *testing.T) {
	cycles := envInt(t, "ROBIB_RECREATE_CYCLES", 15)
	seed := uint64(time.Now().UnixNano())
	t.Logf("%d cycles, seed %d", cycles, seed)
	rng := rand.New(rand.NewPCG(seed, seed^0xdead))
	e := newEnv(t, recreateVolSize)
	names := e.c.Names()
	var addrs []string
	for _, n := range names {
		addrs = append(addrs, e.nbd(n))
	}
	kills := map[string]int{}
	deleteTook := 50 * time.Millisecond // until measured
	for cycle := 1; cycle <= cycles; cycle++ {
		leader := e.c.MustLeader()
		victim := names[rng.IntN(len(names))]
		nearDelete := rng.IntN(2) == 0
		delay := time.Duration(rng.IntN(2000)) * time.Millisecond
		if nearDelete {
			// Around when the sites apply the delete: the time the last
			// uncontested delete took to be acknowledged, give or take.
			delay = time.Duration(float64(deleteTook) * (0.3 + rng.Float64()))
		}
		// The cycle runs in its own goroutine (no t.Fatal there) so that
		// the kill can land at any moment of it.
		deleteSent := make(chan struct{})
		type result struct {
			ck         *checker.Checker
			deleteTook time.Duration // from the send to the acknowledgement (first try only)
			err        error
		}
		done := make(chan result, 1)
		rot := rng.IntN(len(addrs))
		go func() {
			ck, took, err := e.recreateCycle(append(addrs[rot:], addrs[:rot]...), deleteSent)
			done <- result{ck, took, err}
		}()
		<-deleteSent
		time.Sleep(delay)
		role := "follower"
		if victim == leader {
			role = "leader"
		}
		e.c.Kill(victim)
		kills[role]++
		t.Logf("cycle %d: kill -9 %s (%s) %v after the delete was sent", cycle, victim, role, delay.Round(time.Millisecond))
		var res result
		select {
		case res = <-done:
		case <-time.After(3 * time.Minute):
			t.Fatalf("cycle %d: delete, create, attach and write did not finish within 3 minutes", cycle)
		}
		if res.deleteTook > 0 {
			deleteTook = res.deleteTook
		}
		e.c.Start(victim)
		e.c.WaitReady(2*time.Minute, len(names))
		if res.err != nil {
			t.Fatalf("cycle %d: %v", cycle, res.err)
		}
		e.c.WaitCaughtUp(2 * time.Minute)
		e.verifyRecord(fmt.Sprintf("cycle %d", cycle), res.ck)
	}
	t.Logf("kills: %v", kills)

	// Every site agrees, and takes the volume read-write in turn.
	e.c.WaitCaughtUp(2 * time.Minute)
	out := e.c.MustCLI(e.c.MustLeader(), "volume", "verify", volName)
	t.Logf("volume verify: %s", strings.TrimSpace(out))
	for i, n := range names {
		ck, err := checker.New(checker.Options{Addrs: []string{e.nbd(n)}, Export: volName, Blocks: 256,
			BaseOffset: uint64(i * 256 * blockSize), Writes: 400, QueueDepth: 8, FlushEvery: 16, OpTimeout: 3 * flushTimeout,
			Logf: func(format string, args ...any) { t.Logf("at "+n+": "+format, args...) }})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		err = ck.Run(ctx)
		cancel()
		if err != nil {
			t.Fatalf("read-write attach and writes at %s after the cycles: %v (stats %+v)", n, err, ck.Snapshot())
		}
		if s := ck.Snapshot(); s.FlushesOK == 0 || s.Sessions != 1 {
			t.Fatalf("writes at %s: %+v", n, s)
		}
		e.c.WaitCaughtUp(2 * time.Minute)
		e.verifyRecord("written at "+n, ck)
	}
	out = e.c.MustCLI(e.c.MustLeader(), "volume", "verify", volName)
	t.Logf("volume verify: %s", strings.TrimSpace(out))
}

// recreateCycle deletes the volume, creates it again and writes through a
// checker run that ends with a flush, retrying each step at the next site
// while one is down. It closes deleteSent when the delete is about to be
// sent.
//
// It also returns how long the delete took when its first try succeeded
// (0 otherwise).
func (e *env) recreateCycle(addrs []string, deleteSent chan struct{}) (*checker.Checker, time.Duration, error) {
	names := e.c.Names()
	deadline := time.Now().Add(2 * time.Minute)
	var firstTook time.Duration
	step := func(what string, first func(), args ...string) error {
		for i := 0; ; i++ {
			site := names[i%len(names)]
			if i == 0 && first != nil {
				first()
			}
			t0 := time.Now()
			out, errOut, err := e.c.CLI(site, args...)
			if err == nil {
				if i == 0 {
					firstTook = time.Since(t0)
				}
				return nil
			}
			if what == "delete" && strings.Contains(errOut+out, "not found") && i > 0 {
				return nil // an earlier try went through before its site died
			}
			if what == "create" && strings.Contains(errOut+out, "exists") && i > 0 {
				return nil
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("%s: %v: %s", what, err, strings.TrimSpace(errOut))
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	if err := step("delete", func() { close(deleteSent) }, "volume", "delete", volName); err != nil {
		return nil, 0, err
	}
	took := firstTook
	if err := step("create", nil, "volume", "create", volName, "--size", recreateVolSize); err != nil {
		return nil, 0, err
	}
	ck, err := checker.New(checker.Options{Addrs: addrs, Export: volName, Blocks: 512, Writes: 600, QueueDepth: 8,
		FlushEvery: 16, OpTimeout: 3 * flushTimeout, RMWFraction: 0.2})
	if err != nil {
		return nil, 0, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Until(deadline)+time.Minute)
	defer cancel()
	if err := ck.Run(ctx); err != nil {
		return nil, 0, fmt.Errorf("writes after the recreate: %w (stats %+v)", err, ck.Snapshot())
	}
	if s := ck.Snapshot(); s.FlushesOK == 0 {
		return nil, 0, errors.New("writes after the recreate: no flush acknowledged")
	}
	return ck, took, nil
}

// verifyRecord proves at every site, reading its own copy (VOLUME@ro),
// that no block ck made durable is missing, stale or torn.
func (e *env) verifyRecord(what string, ck *checker.Checker) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for _, site := range e.c.Names() {
		cl, err := checker.Dial(ctx, nil, e.nbd(site), volName+"@ro")
		if err != nil {
			e.t.Fatalf("%s: attach %s@ro at %s: %v", what, volName, site, err)
		}
		rep, err := ck.Verify(ctx, cl, checker.VerifyOptions{})
		cl.Close()
		if err != nil {
			e.t.Fatalf("%s: verify at %s: %v", what, site, err)
		}
		if rep.Durable == 0 || rep.Err() != nil {
			e.t.Fatalf("%s: at %s: %v", what, site, rep)
		}
	}
}
