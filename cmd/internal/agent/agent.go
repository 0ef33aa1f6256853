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
	"github.com/robib/robib/cmd/internal/pki"
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
	// gossipKey is the cluster's gossip encryption key (--gossip-key),
	// nil without one; read at start, for the gossip layer.
	gossipKey []byte
	// policy says who may do what (--auth-policy); nil with --insecure,
	// where nothing is checked.
	policy *policySource
	// nodeRef is node for the network's dial hook, which runs on Raft's
	// goroutines while cluster.Open has not returned yet.
	nodeRef atomic.Pointer[cluster.Node]
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
	own := *network // the agent adds its settings to a copy
	if cfg.LinkDelay > 0 {
		// --link-delay (testing/benchmarks): emulate a WAN on the
		// site-to-site links this agent dials.
		own.LinkDelay = cfg.LinkDelay
	}
	a := &Agent{cfg: cfg, log: log, net: &own}
	if err := a.secure(); err != nil {
		return nil, err
	}
	if err := a.open(); err != nil {
		a.Close()
		return nil, err
	}
	return a, nil
}

// certExpiryWarning: a site certificate expiring sooner is warned about at
// start.
const certExpiryWarning = 30 * 24 * time.Hour

// secure loads the TLS credentials into the network (every link but gossip,
// which gets the gossip key) or, with --insecure, says loudly that there
// are none.
func (a *Agent) secure() error {
	cfg := a.cfg
	if path := cfg.GossipKeyPath(); path != "" {
		key, err := pki.LoadGossipKey(path)
		if err != nil {
			return err
		}
		a.gossipKey = key
	}
	if cfg.Insecure {
		a.net.Creds = nil
		a.log.Warn("plaintext: every link unauthenticated and unencrypted (--insecure): anyone who reaches the Raft, API or NBD port can read and change every volume")
		return nil
	}
	creds, err := pki.Load(cfg.TLSCA, cfg.TLSCert, cfg.TLSKey)
	if err != nil {
		return err
	}
	if id := creds.Identity(); id.Name != cfg.Name {
		return fmt.Errorf("%w: %s is the certificate of %s, but this site is %q", pki.ErrCredentials, cfg.TLSCert, id, cfg.Name)
	}
	creds.SetLogger(a.log.With("component", "tls"))
	if a.policy, err = newPolicySource(cfg.AuthPolicy, a.log.With("component", "auth")); err != nil {
		return err
	}
	a.log.Info("authorization policy", "policy", a.policy.get().Summary())
	policy := a.policy
	creds.SetRevoked(func(name string) bool { return policy.get().Denied(name) })
	a.net.Creds = creds
	a.net.ExpectName = a.expectSite
	a.log.Info("TLS with mutual authentication on Raft and the API", "identity", creds.Identity().String(), "not_after", creds.NotAfter(),
		"nbd_tls", cfg.NBDTLSMode(), "nbd_tls_verify_peer", cfg.NBDTLSVerifyPeer, "gossip_key", cfg.GossipKeyPath())
	if left := time.Until(creds.NotAfter()); left < certExpiryWarning {
		a.log.Warn("the site certificate expires soon: issue a new one into the same files (robib cert issue --force); no restart needed",
			"cert", cfg.TLSCert, "not_after", creds.NotAfter())
	}
	return nil
}

// expectSite names the site a dial to addr must reach
// (netx.Network.ExpectName): the gossip member with that Raft or API
// address (cluster.Node.SiteAt). Before the node is up, or for an address
// no member has, any site of the cluster is accepted; the peer still needs
// a site certificate of the cluster CA that lists the host dialed.
func (a *Agent) expectSite(_ netx.Link, addr string) string {
	if n := a.nodeRef.Load(); n != nil {
		return n.SiteAt(addr)
	}
	return ""
}

// verifyPeer is cluster.Config.VerifyPeer: before a site joins the Raft
// configuration the leader dials its Raft address over mutual TLS and
// checks that the certificate there is a site certificate of the cluster
// CA naming that site, and that the policy does not revoke the name.
func (a *Agent) verifyPeer(ctx context.Context, site, raftAddr string) error {
	if a.policy != nil {
		if p := a.policy.get(); p.Denied(site) {
			return fmt.Errorf("site %s is revoked (deny list of %s)", site, p.Source())
		}
	}
	n := *a.net
	n.ExpectName = func(netx.Link, string) string { return site }
	c, err := n.DialContext(ctx, netx.LinkRaft, raftAddr)
	if err != nil {
		return fmt.Errorf("site %s at %s: %w", site, raftAddr, err)
	}
	return c.Close()
}

// scrubInterval maps --scrub-interval to cluster.Config.ScrubInterval:
// 0 (off) is negative there, where 0 means the default.
func scrubInterval(d time.Duration) time.Duration {
	if d == 0 {
		return -1
	}
	return d
}

// raftPeerName is cluster.Config.RaftPeerName: the site whose certificate
// a Raft connection presented.
func raftPeerName(c net.Conn) (string, bool) {
	id, ok := netx.PeerIdentity(c)
	if !ok || id.Kind != pki.KindSite {
		return "", false
	}
	return id.Name, true
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
	// Other sites' APIs, through netx: with TLS the connection is already
	// a handshaken *tls.Conn, so "https://" URLs (DialTLSContext) and
	// "http://" ones (DialContext: HTTP/1.1 written on the TLS connection)
	// both travel encrypted and authenticated.
	dialAPI := func(ctx context.Context, _, addr string) (net.Conn, error) {
		return network.DialContext(ctx, netx.LinkAPI, addr)
	}
	httpClient := &http.Client{
		Timeout: 2 * time.Minute,
		Transport: &http.Transport{
			DialContext:         dialAPI,
			DialTLSContext:      dialAPI,
			MaxIdleConnsPerHost: 16,
			IdleConnTimeout:     90 * time.Second,
		},
	}
	a.stages = cluster.NewStages()
	ccfg := cluster.Config{
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
		ScrubInterval:       scrubInterval(cfg.ScrubInterval),
		RaftListener:        raftLn,
		Dial: func(ctx context.Context, addr string) (net.Conn, error) {
			return network.DialContext(ctx, netx.LinkRaft, addr)
		},
		HTTPClient: httpClient,
		Stages:     a.stages,
		Logger:     log.With("component", "cluster"),
	}
	if a.gossipKey != nil {
		ccfg.GossipKeys = [][]byte{a.gossipKey}
	}
	if creds := network.Creds; creds != nil {
		ccfg.Security = func() (string, time.Time) { return "mtls", creds.NotAfter() }
		ccfg.VerifyPeer = a.verifyPeer
		ccfg.RaftPeerName = raftPeerName
		ccfg.PeerName = peerSite
		ccfg.RequirePeer = true
	}
	a.node, err = cluster.Open(ccfg, a.fsm)
	if err != nil {
		raftLn.Close()
		return err
	}
	a.nodeRef.Store(a.node)
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
	nbdCfg := nbdfront.Config{
		Backend:   a.backend,
		Logger:    log.With("component", "nbd"),
		ErrorCode: nbdErrors.Code,
		Observe:   a.observeNBD,
	}
	if tc := network.NBDTLS(cfg.NBDTLSVerifyPeer); tc != nil {
		nbdCfg.TLS = tc
		switch cfg.NBDTLSMode() {
		case config.NBDTLSRequire:
			nbdCfg.TLSMode = nbdfront.TLSRequire
		case config.NBDTLSOn:
			nbdCfg.TLSMode = nbdfront.TLSOn
		}
		nbdCfg.Authorize = a.authorizeNBD
	}
	if a.nbd, err = nbdfront.NewServer(nbdCfg); err != nil {
		return err
	}
	mux := api.NewHandler(&clusterService{node: a.node, store: a.store, stage: a.backend.stageStats}, log.With("component", "api"))
	mux.Handle("/internal/", a.node.Handler())
	// Profiling, on the admin listener only (bound to loopback by default).
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	var handler http.Handler = mux
	if a.policy != nil {
		handler = a.guard(mux)
	}
	a.api = api.NewServer(handler)
	// Refused TLS handshakes (unknown CA, plaintext) and the like, in the
	// site's log rather than on bare standard error.
	a.api.ErrorLog = slog.NewLogLogger(log.With("component", "api").Handler(), slog.LevelWarn)
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
