// Package api is the agent's admin HTTP/JSON API and its Go client, used by
// the robib CLI. The server is a thin translation layer: it decodes and
// bounds requests, calls a Service, and maps the Service's errors to HTTP
// status codes. It never touches volumes or the cluster itself.
package api

import (
	"context"
	"errors"
	"net/http"
	"time"

	"github.com/robib/robib/cluster"
)

// Errors a Service returns (wrapped) so the server picks the right status,
// and the client's errors match (StatusError). statusTable gives their
// statuses; an error that matches none of them is reported as 500.
var (
	ErrNotFound    = errors.New("not found")
	ErrExists      = errors.New("already exists")
	ErrBadRequest  = errors.New("invalid request")
	ErrUnavailable = errors.New("temporarily unavailable")
	// ErrUnauthenticated: no credentials, or unknown ones (401).
	ErrUnauthenticated = errors.New("authentication required")
	// ErrForbidden: known credentials without the right (403).
	ErrForbidden = errors.New("forbidden")
)

// statusTable is the one mapping between errors and HTTP statuses: the
// server answers an error with the status of the first row it matches
// (errors.Is; StatusOf), anything else with 500; the client maps a status
// back to its row's sentinel (StatusError.Unwrap). Each status appears
// once. The order is the precedence for an error wrapping several.
var statusTable = []struct {
	err    error
	status int
}{
	{ErrNotFound, http.StatusNotFound},
	{ErrExists, http.StatusConflict},
	{ErrBadRequest, http.StatusBadRequest},
	{ErrUnavailable, http.StatusServiceUnavailable},
	{ErrUnauthenticated, http.StatusUnauthorized},
	{ErrForbidden, http.StatusForbidden},
}

// Volume is a volume as the API shows it.
type Volume struct {
	Name      string    `json:"name"`
	Size      int64     `json:"size"`
	BlockSize int       `json:"block_size"`
	Created   time.Time `json:"created"`
	Sync      string    `json:"sync"` // "flush" (default) or "always"
}

// WriteStage is the state of a volume's write-back stage at the site that
// answers (GET /v1/volumes/{name}/stage). A stage exists while the volume
// is attached read-write there; its counters start at the attach.
type WriteStage struct {
	Volume   string `json:"volume"`
	Site     string `json:"site"`
	Attached bool   `json:"attached"` // false: no read-write attach at this site (the rest is zero)

	Accepted      uint64 `json:"accepted"`       // write/trim/zero ops accepted
	Batches       uint64 `json:"batches"`        // batches committed
	Bytes         uint64 `json:"bytes"`          // payload bytes committed
	Retries       uint64 `json:"retries"`        // commit attempts that failed transiently and were resent
	Inflight      int    `json:"inflight"`       // batches committing now
	BufferedBytes int64  `json:"buffered_bytes"` // acknowledged writes not yet committed and applied here
	Commits       uint64 `json:"commits"`        // successful commits
	// Commit latency of the newest commits (up to 1024), in microseconds:
	// a replicated commit as this site sees it, the floor of a FLUSH.
	CommitMeanUS int64 `json:"commit_mean_us"` // over all commits
	CommitP50US  int64 `json:"commit_p50_us"`
	CommitP99US  int64 `json:"commit_p99_us"`
	// Breakdown: where writes spend their time, stage by stage, at every
	// site that answered (the newest 1024 of each stage; see
	// cluster/stages.go for the stages).
	Breakdown []StageTime `json:"breakdown,omitempty"`
}

// StageTime is one stage of the write path at one site.
type StageTime struct {
	Site  string `json:"site"`
	Stage string `json:"stage"`
	Count uint64 `json:"count"` // durations recorded since the site started
	P50US int64  `json:"p50_us"`
	P99US int64  `json:"p99_us"`
}

// CreateVolumeRequest is the body of POST /v1/volumes.
type CreateVolumeRequest struct {
	Name      string `json:"name"`
	Size      int64  `json:"size"`
	BlockSize int    `json:"block_size,omitempty"`
	Sync      string `json:"sync,omitempty"` // "flush" (default) or "always"
}

// ResizeVolumeRequest is the body of POST /v1/volumes/{name}/resize.
type ResizeVolumeRequest struct {
	Size int64 `json:"size"`
}

// KeyringRequest is the body of POST /v1/cluster/keyring: Op is install,
// use or remove; Key the base64 gossip key (16, 24 or 32 bytes).
type KeyringRequest struct {
	Op  string `json:"op"`
	Key string `json:"key"`
}

// ErrorBody is the body of every non-2xx answer.
type ErrorBody struct {
	Error string `json:"error"`
}

// Service is what the API serves. Implementations are safe for concurrent
// use; the ctx carries the request's deadline.
type Service interface {
	CreateVolume(ctx context.Context, req CreateVolumeRequest) (Volume, error)
	ListVolumes(ctx context.Context) ([]Volume, error)
	GetVolume(ctx context.Context, name string) (Volume, error)
	DeleteVolume(ctx context.Context, name string) error
	ResizeVolume(ctx context.Context, name string, size int64) (Volume, error)
	VerifyVolume(ctx context.Context, name string, req VerifyRequest) (cluster.VerifyResult, error)
	// RepairVolume verifies one range and repairs the chunks where a
	// minority of sites differs from a strict majority (cluster.Node.RepairRange).
	RepairVolume(ctx context.Context, name string, req RepairRequest) (cluster.RepairResult, error)
	// WriteStage reports the volume's write-back stage at this site
	// (ErrNotFound for an unknown volume).
	WriteStage(ctx context.Context, name string) (WriteStage, error)

	ClusterStatus(ctx context.Context) (cluster.Status, error)
	// Keyring lists every live site's gossip keys (as fingerprints);
	// ChangeKeyring installs, uses or removes a key at every live site.
	Keyring(ctx context.Context) (cluster.KeyringReport, error)
	ChangeKeyring(ctx context.Context, req KeyringRequest) (cluster.KeyringReport, error)
	Leave(ctx context.Context) error
	RemoveSite(ctx context.Context, site string) error
	TransferLeadership(ctx context.Context, to string) (string, error)
}

// VerifyRequest is the body of POST /v1/volumes/{name}/verify: one range,
// hashed by every site at the same log index.
type VerifyRequest struct {
	Offset    int64 `json:"offset"`
	Length    int64 `json:"length"`
	ChunkSize int64 `json:"chunk_size"`
}

// RepairRequest is the body of POST /v1/volumes/{name}/repair: one range,
// verified across sites; chunks where a strict majority of the voters
// agrees are repaired at the other sites (only Site, if given) from the
// majority. Offset and ChunkSize are multiples of 4 KiB.
type RepairRequest struct {
	Offset    int64  `json:"offset"`
	Length    int64  `json:"length"`
	ChunkSize int64  `json:"chunk_size"`
	Site      string `json:"site,omitempty"`
}

// SiteRequest names a site (cluster remove, transfer-leadership).
type SiteRequest struct {
	Site string `json:"site"`
}
