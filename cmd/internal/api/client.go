package api

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/robib/robib/cluster"
)

// Client calls an agent's admin API.
type Client struct {
	base  string
	http  *http.Client
	token string
}

// ClientOptions configures NewClient; the zero value is plain HTTP.
type ClientOptions struct {
	// TLS, if set, is the TLS configuration (pki.ClientConfig: the
	// cluster CA, and a certificate to present, if any). The API is then
	// reached over https: an http:// or bare host:port address becomes
	// https://.
	TLS *tls.Config
	// HTTP, if set, is the http.Client to use (tests); it carries its own
	// TLS settings, so TLS must be nil.
	HTTP *http.Client
	// Token, if set, is sent with every request as "Authorization:
	// Bearer TOKEN".
	Token string
}

// NewClient returns a client for the agent at base ("http://host:port",
// "https://host:port" or "host:port"). An https address needs opts.TLS (or
// an HTTP client that has it): a robib agent's certificate is checked
// against the cluster CA only, never the system's roots.
func NewClient(base string, opts ClientOptions) (*Client, error) {
	if !strings.Contains(base, "://") {
		base = "http://" + base
	}
	u, err := url.Parse(base)
	if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
		return nil, fmt.Errorf("%w: bad API address %q", ErrBadRequest, base)
	}
	hc := opts.HTTP
	switch {
	case hc != nil && opts.TLS != nil:
		return nil, fmt.Errorf("%w: API client: give an HTTP client or a TLS configuration, not both", ErrBadRequest)
	case hc != nil:
	case opts.TLS != nil:
		u.Scheme = "https"
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.TLSClientConfig = opts.TLS
		hc = &http.Client{Timeout: 2 * time.Minute, Transport: tr}
	case u.Scheme == "https":
		return nil, fmt.Errorf("%w: API address %s is https: the cluster CA is needed to check the agent (--tls-ca, ROBIB_TLS_CA)", ErrBadRequest, base)
	default:
		hc = &http.Client{Timeout: 2 * time.Minute}
	}
	return &Client{base: strings.TrimRight(u.String(), "/"), http: hc, token: opts.Token}, nil
}

// Base is the API's address as the client uses it.
func (c *Client) Base() string { return c.base }

// StatusError is a non-2xx answer from the agent.
type StatusError struct {
	Status  int
	Message string
}

func (e *StatusError) Error() string { return e.Message }

// Unwrap lets errors.Is match the API's sentinels on the client side too:
// the sentinel of the status's row in statusTable, or nil.
func (e *StatusError) Unwrap() error {
	for _, r := range statusTable {
		if r.status == e.Status {
			return r.err
		}
	}
	return nil
}

// Do sends one request with an optional JSON body and decodes a JSON answer
// into out (if non-nil).
func (c *Client) Do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("contacting robib agent at %s: %w", c.base, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("reading answer from %s: %w", c.base, err)
	}
	if resp.StatusCode/100 != 2 {
		var eb ErrorBody
		if json.Unmarshal(data, &eb) != nil || eb.Error == "" {
			eb.Error = fmt.Sprintf("%s %s: %s", method, path, resp.Status)
		}
		return &StatusError{Status: resp.StatusCode, Message: eb.Error}
	}
	if out != nil && len(data) > 0 {
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("decoding answer from %s: %w", c.base, err)
		}
	}
	return nil
}

// CreateVolume creates a volume.
func (c *Client) CreateVolume(ctx context.Context, req CreateVolumeRequest) (Volume, error) {
	var v Volume
	err := c.Do(ctx, http.MethodPost, "/v1/volumes", req, &v)
	return v, err
}

// ListVolumes lists volumes.
func (c *Client) ListVolumes(ctx context.Context) ([]Volume, error) {
	var vs []Volume
	err := c.Do(ctx, http.MethodGet, "/v1/volumes", nil, &vs)
	return vs, err
}

// GetVolume reads one volume.
func (c *Client) GetVolume(ctx context.Context, name string) (Volume, error) {
	var v Volume
	err := c.Do(ctx, http.MethodGet, "/v1/volumes/"+url.PathEscape(name), nil, &v)
	return v, err
}

// WriteStage reports a volume's write-back stage at the site the client
// talks to.
func (c *Client) WriteStage(ctx context.Context, name string) (WriteStage, error) {
	var st WriteStage
	err := c.Do(ctx, http.MethodGet, "/v1/volumes/"+url.PathEscape(name)+"/stage", nil, &st)
	return st, err
}

// DeleteVolume deletes a volume.
func (c *Client) DeleteVolume(ctx context.Context, name string) error {
	return c.Do(ctx, http.MethodDelete, "/v1/volumes/"+url.PathEscape(name), nil, nil)
}

// ResizeVolume changes a volume's size.
func (c *Client) ResizeVolume(ctx context.Context, name string, size int64) (Volume, error) {
	var v Volume
	err := c.Do(ctx, http.MethodPost, "/v1/volumes/"+url.PathEscape(name)+"/resize", ResizeVolumeRequest{Size: size}, &v)
	return v, err
}

// VerifyVolume verifies one range of a volume across sites.
func (c *Client) VerifyVolume(ctx context.Context, name string, req VerifyRequest) (cluster.VerifyResult, error) {
	var res cluster.VerifyResult
	err := c.Do(ctx, http.MethodPost, "/v1/volumes/"+url.PathEscape(name)+"/verify", req, &res)
	return res, err
}

// RepairVolume verifies one range of a volume and repairs minority copies.
func (c *Client) RepairVolume(ctx context.Context, name string, req RepairRequest) (cluster.RepairResult, error) {
	var res cluster.RepairResult
	err := c.Do(ctx, http.MethodPost, "/v1/volumes/"+url.PathEscape(name)+"/repair", req, &res)
	return res, err
}

// ClusterStatus reads the cluster status.
func (c *Client) ClusterStatus(ctx context.Context) (cluster.Status, error) {
	var st cluster.Status
	err := c.Do(ctx, http.MethodGet, "/v1/cluster/status", nil, &st)
	return st, err
}

// Leave removes the agent's site from the cluster.
func (c *Client) Leave(ctx context.Context) error {
	return c.Do(ctx, http.MethodPost, "/v1/cluster/leave", nil, nil)
}

// RemoveSite removes a dead site from the cluster.
func (c *Client) RemoveSite(ctx context.Context, site string) error {
	return c.Do(ctx, http.MethodPost, "/v1/cluster/remove", SiteRequest{Site: site}, nil)
}

// TransferLeadership moves leadership to site ("" for any).
// Keyring lists every live site's gossip keys.
func (c *Client) Keyring(ctx context.Context) (cluster.KeyringReport, error) {
	var out cluster.KeyringReport
	err := c.Do(ctx, http.MethodGet, "/v1/cluster/keyring", nil, &out)
	return out, err
}

// ChangeKeyring installs, uses or removes a gossip key at every live site.
func (c *Client) ChangeKeyring(ctx context.Context, op, key string) (cluster.KeyringReport, error) {
	var out cluster.KeyringReport
	err := c.Do(ctx, http.MethodPost, "/v1/cluster/keyring", KeyringRequest{Op: op, Key: key}, &out)
	return out, err
}

func (c *Client) TransferLeadership(ctx context.Context, to string) (string, error) {
	var out map[string]string
	err := c.Do(ctx, http.MethodPost, "/v1/cluster/transfer-leadership", SiteRequest{Site: to}, &out)
	return out["leader"], err
}
