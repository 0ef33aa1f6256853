// Package agent wires one robib site together: volume store, replicated
// state machine, cluster membership, the DCD write-back stage, the NBD front
// end and the admin API. Every listener and dialer comes from netx.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/robib/robib/cluster"
	"github.com/robib/robib/cmd/internal/api"
	"github.com/robib/robib/cmd/internal/config"
	"github.com/robib/robib/cmd/internal/netx"
	"github.com/robib/robib/dcd"
	"github.com/robib/robib/fsm"
	"github.com/robib/robib/nbdfront"
	"github.com/robib/robib/volume"
)

// Agent is one running site. Create it with New, then Start, then Close.
type Agent struct {
	cfg config.Config
	log *slog.Logger
	net *netx.Network

	store   *volume.Store
	fsm     *fsm.FSM
	node    *cluster.Node
	backend *nbdBackend
	nbd     *nbdfront.Server
	api     *http.Server
	nbdLn   net.Listener
	apiLn   net.Listener
	wg      sync.WaitGroup
	closed  sync.Once
	stages  *cluster.Stages // where writes spend their time at this site
	sampled atomic.Uint64   // NBD requests seen by observeNBD
}

// nbdSample: observeNBD records one in nbdSample requests other than
// flushes (every flush is recorded): at 4 KiB QD32 that keeps the recorder's
// lock off the hot path (four records per request cost a few percent).
const nbdSample = 16

// observeNBD records an NBD request's stages (nbdfront.Config.Observe).
func (a *Agent) observeNBD(cmd string, t nbdfront.Timing) {
	if cmd != "flush" && a.sampled.Add(1)%nbdSample != 0 {
		return
	}
	if cmd == "write" {
		a.stages.Record("nbd.recv", t.Recv)
	}
	a.stages.Record("nbd.queue", t.Queue)
	a.stages.Record("nbd."+cmd, t.Device)
	a.stages.Record("nbd.reply", t.Reply)
}

// New opens the site's state and joins (or bootstraps) the cluster. The
// NBD and API listeners open in Start.
func New(cfg config.Config, log *slog.Logger, network *netx.Network) (*Agent, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.Default()
	}
	if network == nil {
		network = &netx.Network{}
	}
	if cfg.LinkDelay > 0 {
		// --link-delay (testing/benchmarks): emulate a WAN on the
		// site-to-site links this agent dials.
		delayed := *network
		delayed.LinkDelay = cfg.LinkDelay
		network = &delayed
	}
	a := &Agent{cfg: cfg, log: log, net: network}
	if err := a.open(); err != nil {
		a.Close()
		return nil, err
	}
	return a, nil
}

// open builds the agent's parts in order; on error the caller closes
// whatever was built.
func (a *Agent) open() error {
	cfg, log, network := a.cfg, a.log, a.net
	var err error
	if a.store, err = volume.Open(cfg.DataDir, log.With("component", "volume")); err != nil {
		return fmt.Errorf("opening volume store: %w", err)
	}
	for name, err := range a.store.Broken() {
		log.Error("volume cannot be loaded; left untouched on disk", "volume", name, "err", err)
	}
	if a.fsm, err = fsm.New(a.store, filepath.Join(cfg.DataDir, "fsm"), fsm.Options{Logger: log.With("component", "fsm")}); err != nil {
		return fmt.Errorf("opening state machine: %w", err)
	}
	raftLn, err := network.Listen(netx.LinkRaft, cfg.RaftAddr)
	if err != nil {
		return err
	}
	httpClient := &http.Client{
		Timeout: 2 * time.Minute,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
				return network.DialContext(ctx, netx.LinkAPI, addr)
			},
			MaxIdleConnsPerHost: 16,
			IdleConnTimeout:     90 * time.Second,
		},
	}
	a.stages = cluster.NewStages()
	a.node, err = cluster.Open(cluster.Config{
		Name:                cfg.Name,
		DataDir:             cfg.DataDir,
		LogStore:            cfg.RaftLogStore,
		RaftTransport:       cfg.RaftTransport,
		RaftAddr:            cfg.RaftAddr,
		GossipAddr:          cfg.GossipAddr,
		APIAddr:             cfg.APIAddr,
		NBDAddr:             cfg.NBDAddr,
		Join:                cfg.Join,
		BootstrapExpect:     cfg.BootstrapExpect,
		SnapshotThreshold:   cfg.SnapshotThreshold,
		SnapshotInterval:    cfg.SnapshotInterval,
		TrailingLogs:        cfg.TrailingLogs,
		HeartbeatTimeout:    cfg.HeartbeatTimeout,
		ElectionTimeout:     cfg.ElectionTimeout,
		LeaderLeaseTimeout:  cfg.LeaderLease,
		LeaseTTL:            cfg.VolumeLeaseTTL,
		LeaderFollowsWrites: cfg.LeaderFollowsWrites,
		LeaderOverlap:       cfg.LeaderOverlap,
		RaftListener:        raftLn,
		Dial: func(ctx context.Context, addr string) (net.Conn, error) {
			return network.DialContext(ctx, netx.LinkRaft, addr)
		},
		HTTPClient: httpClient,
		Stages:     a.stages,
		Logger:     log.With("component", "cluster"),
	}, a.fsm)
	if err != nil {
		raftLn.Close()
		return err
	}
	a.backend = &nbdBackend{
		store:    a.store,
		node:     a.node,
		leaseTTL: cfg.VolumeLeaseTTL,
		log:      log.With("component", "dcd"),
		stages:   map[string]*stage{},
		dcd: dcd.Config{
			MaxBufferBytes: cfg.DCDBuffer,
			MaxInflight:    cfg.DCDInflight,
			Retryable:      cluster.IsRetryable,
			FlushTimeout:   cfg.FlushTimeout,
		},
	}
	if a.nbd, err = nbdfront.NewServer(nbdfront.Config{
		Backend:   a.backend,
		Logger:    log.With("component", "nbd"),
		ErrorCode: nbdErrors.Code,
		Observe:   a.observeNBD,
	}); err != nil {
		return err
	}
	mux := api.NewHandler(&clusterService{node: a.node, store: a.store, stage: a.backend.stageStats}, log.With("component", "api"))
	mux.Handle("/internal/", a.node.Handler())
	// Profiling, on the admin listener only (bound to loopback by default).
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	a.api = api.NewServer(mux)
	return nil
}

// Start opens the NBD and API listeners and begins serving.
func (a *Agent) Start() error {
	var err error
	if a.apiLn, err = a.net.Listen(netx.LinkAPI, a.cfg.APIAddr); err != nil {
		return err
	}
	if a.nbdLn, err = a.net.Listen(netx.LinkNBD, a.cfg.NBDAddr); err != nil {
		return err
	}
	a.wg.Add(2)
	go func() {
		defer a.wg.Done()
		if err := a.api.Serve(a.apiLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.log.Error("api server stopped", "err", err)
		}
	}()
	go func() {
		defer a.wg.Done()
		if err := a.nbd.Serve(a.nbdLn); err != nil {
			a.log.Error("nbd server stopped", "err", err)
		}
	}()
	a.log.Info("robib site serving", "nbd", a.nbdLn.Addr().String(), "api", a.apiLn.Addr().String(),
		"raft", a.cfg.RaftAddr, "gossip", a.cfg.GossipAddr, "data_dir", a.cfg.DataDir)
	return nil
}

// Node is the site's cluster membership (tests use it to wait on state).
func (a *Agent) Node() *cluster.Node { return a.node }

// NBDAddr is the NBD listener's address (useful with port 0).
func (a *Agent) NBDAddr() string { return a.nbdLn.Addr().String() }

// APIAddr is the admin API listener's address.
func (a *Agent) APIAddr() string { return a.apiLn.Addr().String() }

// Run starts the agent and serves until ctx is done, then closes it.
func (a *Agent) Run(ctx context.Context) error {
	if err := a.Start(); err != nil {
		a.Close()
		return err
	}
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			a.log.Info("shutting down")
			return a.Close()
		case <-t.C:
			// A local I/O failure while applying a committed entry stops
			// this site's state machine (fsm/DESIGN.md, "Failed state").
			// Exit so a supervisor restarts the agent, which replays the
			// log from the last checkpoint; the other sites keep serving.
			if err := a.fsm.Stats().Failed; err != nil {
				a.log.Error("this site's copy failed; stopping so a restart can replay the log", "err", err)
				a.Close()
				return fmt.Errorf("state machine failed: %w", err)
			}
		}
	}
}

// Close stops serving, flushes buffered writes, leaves Raft and gossip
// (without removing the site: a stopped site stays a voter) and closes the
// stores. Safe to call more than once and on a half-built agent.
func (a *Agent) Close() error {
	var errs []error
	a.closed.Do(func() {
		if a.nbd != nil {
			// Closing the NBD server waits for in-flight requests; a flush
			// cannot complete while this site is cut off from the majority.
			// Give buffered writes releaseTimeout to commit, then abandon
			// them (they were never acknowledged as durable) so that the
			// waiting requests fail and shutdown finishes.
			done := make(chan error, 1)
			go func() { done <- a.nbd.Close() }()
			select {
			case err := <-done:
				errs = append(errs, err)
			case <-time.After(releaseTimeout):
				a.log.Error("buffered writes could not be committed in time; abandoning them")
				if a.backend != nil {
					a.backend.abortAll()
				}
				errs = append(errs, <-done)
			}
		}
		if a.backend != nil {
			a.backend.closeAll()
		}
		if a.api != nil {
			errs = append(errs, a.api.Close())
		}
		a.wg.Wait()
		if a.node != nil {
			errs = append(errs, a.node.Close())
		}
		if a.fsm != nil {
			errs = append(errs, a.fsm.Close())
		}
		if a.store != nil {
			errs = append(errs, a.store.Close())
		}
	})
	return errors.Join(errs...)
}
