package agent

// Authorization at the agent's two edges: the guard in front of the HTTP
// listener (admin API, site-to-site endpoints, profiling) and the NBD
// server's Authorize hook. Both take the caller's identity from a verified
// client certificate (pki), ask the policy (auth), and map refusals once:
// auth's sentinels to HTTP statuses through apiClasses, and to
// NBD_REP_ERR_POLICY through nbdfront.ErrDenied.

import (
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/robib/robib/cmd/internal/api"
	"github.com/robib/robib/cmd/internal/auth"
	"github.com/robib/robib/cmd/internal/pki"
	"github.com/robib/robib/nbdfront"
)

// policySource is the policy in force: --auth-policy, read at start and
// again when the file changes (checked at most once a second, when a
// request asks), so a new deny list takes effect without a restart; or the
// open policy without a file. A file that no longer parses keeps the
// previous policy and is logged.
type policySource struct {
	path string
	log  *slog.Logger
	cur  atomic.Pointer[auth.Policy]

	mu      sync.Mutex // guards checked and stamp; held for a stat and at most one read
	checked time.Time
	stamp   fileStamp
}

type fileStamp struct {
	mod  time.Time
	size int64
}

// policyCheckInterval is how often a request may look at the policy file.
const policyCheckInterval = time.Second

// newPolicySource reads the policy (an error if the file is missing or
// invalid: the agent does not start).
func newPolicySource(path string, log *slog.Logger) (*policySource, error) {
	s := &policySource{path: path, log: log}
	if path == "" {
		s.cur.Store(auth.Open())
		return s, nil
	}
	st, err := statPolicy(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", auth.ErrInvalidPolicy, err)
	}
	p, err := auth.Load(path)
	if err != nil {
		return nil, err
	}
	s.cur.Store(p)
	s.stamp, s.checked = st, time.Now()
	return s, nil
}

func statPolicy(path string) (fileStamp, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return fileStamp{}, err
	}
	return fileStamp{mod: fi.ModTime(), size: fi.Size()}, nil
}

// get is the policy in force, reloading the file if it changed.
func (s *policySource) get() *auth.Policy {
	if s.path == "" {
		return s.cur.Load()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if time.Since(s.checked) < policyCheckInterval {
		return s.cur.Load()
	}
	s.checked = time.Now()
	st, err := statPolicy(s.path)
	if err != nil || st == s.stamp {
		if err != nil && s.stamp != (fileStamp{}) {
			s.log.Error("authorization policy file unreadable; keeping the policy in force", "policy", s.path, "err", err)
			s.stamp = fileStamp{}
		}
		return s.cur.Load()
	}
	s.stamp = st
	p, err := auth.Load(s.path)
	if err != nil {
		s.log.Error("authorization policy file changed but is invalid; keeping the policy in force", "err", err)
		return s.cur.Load()
	}
	s.cur.Store(p)
	s.log.Info("authorization policy reloaded", "policy", p.Summary())
	return p
}

// identityOf is the auth identity of a verified certificate identity.
func identityOf(id pki.Identity) auth.Identity {
	kind := auth.KindClient
	if id.Kind == pki.KindSite {
		kind = auth.KindSite
	}
	return auth.Identity{Name: id.Name, Kind: kind}
}

// requestIdentity is the identity of a request's verified client
// certificate.
func requestIdentity(r *http.Request) (auth.Identity, bool) {
	if r.TLS == nil {
		return auth.Identity{}, false
	}
	id, ok := pki.PeerIdentity(*r.TLS)
	if !ok {
		return auth.Identity{}, false
	}
	return identityOf(id), true
}

// guard wraps the agent's HTTP handler with the policy: every request is
// authenticated and authorized before it reaches a handler; refusals are
// answered through api.WriteError with the status apiClasses gives them.
func (a *Agent) guard(h http.Handler) http.Handler {
	log := a.log.With("component", "api")
	return auth.Guard(h, a.policy.get, requestIdentity, func(w http.ResponseWriter, r *http.Request, err error) {
		api.WriteError(w, r, apiErr(err), log)
	})
}

// peerSite is the site a request to the site-to-site endpoints comes from
// (cluster.Config.PeerName): the site certificate the guard verified.
func peerSite(r *http.Request) (string, bool) {
	id, ok := auth.FromContext(r.Context())
	if !ok || id.Kind != auth.KindSite {
		return "", false
	}
	return id.Name, true
}

// authorizeNBD is the NBD server's Authorize hook. With client certificates
// required (--nbd-tls-verify-peer) it asks the policy whether the client
// may attach the volume, read-write or read-only; listing exports needs a
// client identity only. Without them there is no client identity to ask
// about: TLS then protects the link, not the volumes.
func (a *Agent) authorizeNBD(p nbdfront.Peer, export string, op nbdfront.Op) error {
	if !a.cfg.NBDTLSVerifyPeer {
		return nil
	}
	var id auth.Identity
	if p.TLS != nil {
		if pid, ok := pki.PeerIdentity(*p.TLS); ok {
			id = identityOf(pid)
		}
	}
	var err error
	if op == nbdfront.OpList {
		err = a.policy.get().Require(id, auth.NeedNone, "listing exports")
		if err == nil && (id.Anonymous() || id.Kind != auth.KindClient) {
			err = fmt.Errorf("%w: listing exports needs a client certificate", auth.ErrUnauthenticated)
		}
	} else {
		vol, suffix := splitExport(export)
		readOnly := suffix != ""
		// INFO asks about an export without attaching it: read access
		// is enough to see it.
		if op == nbdfront.OpInfo {
			readOnly = true
		}
		err = a.policy.get().Attach(id, vol, readOnly)
	}
	if err != nil {
		return fmt.Errorf("%w: %w", nbdfront.ErrDenied, err)
	}
	return nil
}
