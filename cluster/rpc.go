package cluster

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/robib/robib/fsm"
)

// Internal site-to-site endpoints, served on each site's API listener under
// /internal/v1/. They carry forwarded proposals and the per-site views that
// status and verify collect.
const (
	pathApply        = "/internal/v1/apply"
	pathLocalStatus  = "/internal/v1/local-status"
	pathVerify       = "/internal/v1/verify/"
	pathRemoveServer = "/internal/v1/remove-server"
	pathTransfer     = "/internal/v1/transfer-leadership"

	// headerOrigin names the site a forwarded proposal comes from.
	headerOrigin = "Robib-Origin"

	// maxForwardBody bounds a forwarded command (entries are kept far
	// smaller, see dcd).
	maxForwardBody = 16 << 20
)

// applyReply is the answer to a forwarded proposal.
type applyReply struct {
	Index     uint64 `json:"index"`
	Duplicate bool   `json:"duplicate,omitempty"`
	Code      string `json:"code,omitempty"`  // fsm.ErrorCode of the FSM's verdict
	Error     string `json:"error,omitempty"` // its message
	Retry     bool   `json:"retry,omitempty"` // the receiver was not the leader etc.
	// LeaderNanos is how long the leader took (leader.propose), so the
	// sender can tell its forward's own cost (stages.go).
	LeaderNanos int64 `json:"leader_ns,omitempty"`
}

// Handler serves the internal endpoints. Mount it at /internal/. With
// Config.PeerName, a request that acts for another site than the one it
// comes from is refused with ErrForbidden (403); with Config.RequirePeer,
// so is every request from no site identity.
func (n *Node) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+pathApply, n.prop.handleApply)
	mux.HandleFunc("GET "+pathLocalStatus, func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, n.reporter.LocalStatus())
	})
	mux.HandleFunc("GET "+pathVerify+"{id}", n.verify.handleVerify)
	mux.HandleFunc("POST "+pathRemoveServer, n.admin.handleRemoveServer)
	mux.HandleFunc("POST "+pathTransfer, n.admin.handleTransfer)
	mux.HandleFunc("POST "+pathLeaseAcquire, n.leases.handleLease)
	mux.HandleFunc("POST "+pathLeaseRenew, n.leases.handleLease)
	mux.HandleFunc("POST "+pathReadIndex, n.leases.handleLease)
	mux.HandleFunc("POST "+pathKeyring, n.keyAdmin.handleKeyring)
	mux.HandleFunc("GET "+pathCatchUpBase, handleCatchUpBase(n.fsm))
	mux.HandleFunc("GET "+pathRead, n.heal.handleRead)
	mux.HandleFunc("POST "+pathRepair, n.heal.handleRepair)
	return &peerGate{name: n.cfg.PeerName, require: n.cfg.RequirePeer, next: mux}
}

// peerGate puts the sending site (Config.PeerName) into each internal
// request's context, for the handlers' checkClaim, and refuses requests
// from no site identity when require is set.
type peerGate struct {
	name    func(*http.Request) (string, bool)
	require bool
	next    http.Handler
}

type peerKey struct{}

func (g *peerGate) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	site, ok := "", false
	if g.name != nil {
		site, ok = g.name(r)
		ok = ok && site != ""
	}
	if !ok {
		if g.require {
			writeJSON(w, http.StatusForbidden, map[string]string{
				"error": fmt.Sprintf("%v: internal requests must come from a site identity", ErrForbidden)})
			return
		}
		g.next.ServeHTTP(w, r)
		return
	}
	g.next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), peerKey{}, site)))
}

// requestPeer is the site an internal request comes from, if known.
func requestPeer(r *http.Request) (string, bool) {
	site, ok := r.Context().Value(peerKey{}).(string)
	return site, ok
}

// checkClaim refuses a request that acts for site (what it does: "take a
// lease", ...) when it comes from another known site.
func checkClaim(r *http.Request, site, what string) error {
	if peer, ok := requestPeer(r); ok && peer != site {
		return fmt.Errorf("%w: site %q may not %s for site %q", ErrForbidden, peer, what, site)
	}
	return nil
}

// readBody reads a request body of at most limit bytes. With a
// Content-Length (the forwarding client always sends one) it allocates the
// buffer once at its final size: a write batch is up to 512 KiB, and
// io.ReadAll's doubling would copy it several times.
func readBody(w http.ResponseWriter, r *http.Request, limit int64) ([]byte, error) {
	body := http.MaxBytesReader(w, r.Body, limit)
	if n := r.ContentLength; n >= 0 && n <= limit {
		data := make([]byte, n)
		if _, err := io.ReadFull(body, data); err != nil {
			return nil, err
		}
		return data, nil
	}
	return io.ReadAll(body)
}

type siteRequest struct {
	Site string `json:"site"`
}

func statusFor(err error) int {
	switch {
	case errors.Is(err, ErrForbidden):
		return http.StatusForbidden
	case errors.Is(err, ErrRetry), errors.Is(err, ErrPeerRefused):
		return http.StatusServiceUnavailable
	case errors.Is(err, ErrUnknownSite):
		return http.StatusNotFound
	case errors.Is(err, ErrInvalidRequest):
		return http.StatusBadRequest
	}
	return http.StatusInternalServerError
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// rpcClient calls other sites' internal endpoints.
type rpcClient struct {
	http *http.Client
}

func (c *rpcClient) url(addr, path string) string { return "http://" + addr + path }

// apply forwards an encoded command from site origin to the leader's API.
// The duration is the leader's own time for it (0 if it did not say).
func (c *rpcClient) apply(ctx context.Context, addr, origin string, data []byte) (*fsm.Result, time.Duration, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.url(addr, pathApply), bytes.NewReader(data))
	if err != nil {
		return nil, 0, err
	}
	req.Header.Set("Content-Type", "application/octet-stream")
	req.Header.Set(headerOrigin, origin)
	resp, err := c.http.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil, 0, ctx.Err()
		}
		return nil, 0, fmt.Errorf("%w: %v", ErrUnreachable, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusForbidden {
		return nil, 0, statusError(resp)
	}
	var rep applyReply
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&rep); err != nil {
		return nil, 0, fmt.Errorf("%w: bad answer from %s (%s): %v", ErrUnreachable, addr, resp.Status, err)
	}
	if rep.Retry {
		return nil, 0, fmt.Errorf("%w: %s: %s", ErrNotLeader, addr, rep.Error)
	}
	res := &fsm.Result{Index: rep.Index, Duplicate: rep.Duplicate}
	if rep.Code != "" || rep.Error != "" {
		res.Err = fsm.ErrorFromCode(rep.Code, rep.Error)
	}
	return res, time.Duration(rep.LeaderNanos), nil
}

// getJSON fetches a site's internal endpoint into out.
func (c *rpcClient) getJSON(ctx context.Context, addr, path string, out any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.url(addr, path), nil)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		var e struct{ Error string }
		_ = json.Unmarshal(body, &e)
		err := fmt.Errorf("%s%s: %s: %s", addr, path, resp.Status, e.Error)
		if resp.StatusCode == http.StatusForbidden {
			err = fmt.Errorf("%w: %v", ErrForbidden, err)
		}
		return err
	}
	return json.Unmarshal(body, out)
}

// post sends in as JSON to a site's internal endpoint. A transport failure
// wraps ErrUnreachable (or is ctx's error once ctx ended).
func (c *rpcClient) post(ctx context.Context, addr, path string, in any) (*http.Response, error) {
	b, err := json.Marshal(in)
	if err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.url(addr, path), bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.http.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, fmt.Errorf("%w: %v", ErrUnreachable, err)
	}
	return resp, nil
}

// postJSONReply sends in to a site's internal endpoint and decodes its
// JSON answer into out.
func (c *rpcClient) postJSONReply(ctx context.Context, addr, path string, in, out any) error {
	resp, err := c.post(ctx, addr, path, in)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusForbidden {
		return statusError(resp)
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(out); err != nil {
		return fmt.Errorf("%w: bad answer from %s%s (%s): %v", ErrUnreachable, addr, path, resp.Status, err)
	}
	return nil
}

// postJSON sends in to a site's internal endpoint.
func (c *rpcClient) postJSON(ctx context.Context, addr, path string, in any) error {
	resp, err := c.post(ctx, addr, path, in)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 == 2 {
		return nil
	}
	return statusError(resp)
}

// statusError is the error of a non-2xx answer of an internal endpoint:
// its {"error": ...} text, wrapping the sentinel its status stands for
// (statusFor's inverse).
func statusError(resp *http.Response) error {
	var e struct{ Error string }
	_ = json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&e)
	var sentinel error
	switch resp.StatusCode {
	case http.StatusServiceUnavailable:
		sentinel = ErrRetry
	case http.StatusNotFound:
		sentinel = ErrUnknownSite
	case http.StatusBadRequest:
		sentinel = ErrInvalidRequest
	case http.StatusForbidden:
		sentinel = ErrForbidden
	default:
		return fmt.Errorf("%s: %s", resp.Status, e.Error)
	}
	return fmt.Errorf("%w: %s: %s", sentinel, resp.Status, stripPrefix(e.Error, sentinel))
}
