package agent

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/robib/robib/cluster"
	"github.com/robib/robib/cmd/internal/api"
	"github.com/robib/robib/cmd/internal/auth"
	"github.com/robib/robib/cmd/internal/pki"
	"github.com/robib/robib/dcd"
	"github.com/robib/robib/fsm"
	"github.com/robib/robib/nbdfront"
	"github.com/robib/robib/volume"
)

// adminTimeout bounds an admin command that waits for a leader.
const adminTimeout = 30 * time.Second

// clusterService serves the admin API: metadata changes go through Raft
// (from any site: the node forwards to the leader), reads come from this
// site's replicated copy.
type clusterService struct {
	node  *cluster.Node
	store *volume.Store
	// stage reports a volume's write-back stage at this site, if attached
	// read-write here.
	stage func(name string) (dcd.Stats, bool)
}

func toAPI(m volume.Meta) api.Volume {
	sync := "flush"
	if m.SyncWrites {
		sync = "always"
	}
	return api.Volume{Name: m.Name, Size: m.Size, BlockSize: m.BlockSize, Created: m.Created, Sync: sync}
}

// apiClasses is the one table from the errors of the layers below to the
// API's sentinels, which pick the HTTP status (the api package's
// statusTable): 404 unknown, 409 exists, 400 invalid, 503 no leader or
// shutting down, 401 no or unknown credentials, 403 not allowed (or a
// request acting for another site); anything else is 500. The first row an error matches
// (errors.Is) wins, in this order. errors_test.go lists every sentinel of
// the module with the status it must get.
var apiClasses = []struct{ err, class error }{
	{volume.ErrNotFound, api.ErrNotFound},
	{fsm.ErrUnknownVolume, api.ErrNotFound},
	{cluster.ErrUnknownSite, api.ErrNotFound},
	{volume.ErrExists, api.ErrExists},
	{fsm.ErrVolumeExists, api.ErrExists},
	{volume.ErrInvalidName, api.ErrBadRequest},
	{volume.ErrInvalidSize, api.ErrBadRequest},
	{fsm.ErrInvalidCommand, api.ErrBadRequest},
	{fsm.ErrOutOfRange, api.ErrBadRequest},
	{cluster.ErrInvalidRequest, api.ErrBadRequest},
	{cluster.ErrRetry, api.ErrUnavailable},
	{cluster.ErrPeerRefused, api.ErrUnavailable},
	{cluster.ErrNoHealthyCopy, api.ErrUnavailable},
	{context.DeadlineExceeded, api.ErrUnavailable},
	{cluster.ErrClosed, api.ErrUnavailable},
	{auth.ErrUnauthenticated, api.ErrUnauthenticated},
	{auth.ErrDenied, api.ErrForbidden},
	{nbdfront.ErrDenied, api.ErrForbidden},
	{auth.ErrInvalidPolicy, api.ErrBadRequest},
	{cluster.ErrForbidden, api.ErrForbidden},
}

// apiErr tags an error of the layers below with the API sentinel of its
// row in apiClasses (keeping its message after the sentinel's), or
// returns it as it is.
func apiErr(err error) error {
	if err == nil {
		return nil
	}
	for _, c := range apiClasses {
		if errors.Is(err, c.err) {
			return fmt.Errorf("%w: %w", c.class, err)
		}
	}
	return err
}

func withTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, adminTimeout)
}

func (s *clusterService) CreateVolume(ctx context.Context, req api.CreateVolumeRequest) (api.Volume, error) {
	syncWrites, err := parseSync(req.Sync)
	if err != nil {
		return api.Volume{}, err
	}
	bs := req.BlockSize
	if bs == 0 {
		bs = volume.DefaultBlockSize
	}
	m := volume.Meta{Name: req.Name, Size: req.Size, BlockSize: bs, SyncWrites: syncWrites}
	if err := volume.ValidateMeta(m); err != nil {
		return api.Volume{}, apiErr(err)
	}
	ctx, cancel := withTimeout(ctx)
	defer cancel()
	cmd := &fsm.CreateVolume{Name: m.Name, Size: m.Size, BlockSize: m.BlockSize, SyncWrites: syncWrites, Created: time.Now().UTC().UnixNano()}
	if _, err := s.node.ApplyAndWait(ctx, cmd); err != nil {
		return api.Volume{}, apiErr(err)
	}
	return s.GetVolume(ctx, req.Name)
}

func parseSync(s string) (bool, error) {
	switch s {
	case "", "flush":
		return false, nil
	case "always":
		return true, nil
	}
	return false, fmt.Errorf("%w: sync mode %q: want flush or always", api.ErrBadRequest, s)
}

func (s *clusterService) ListVolumes(context.Context) ([]api.Volume, error) {
	metas := s.store.List()
	out := make([]api.Volume, 0, len(metas))
	for _, m := range metas {
		out = append(out, toAPI(m))
	}
	return out, nil
}

func (s *clusterService) GetVolume(_ context.Context, name string) (api.Volume, error) {
	v, err := s.store.Get(name)
	if err != nil {
		return api.Volume{}, apiErr(err)
	}
	return toAPI(v.Meta()), nil
}

func (s *clusterService) DeleteVolume(ctx context.Context, name string) error {
	if err := volume.ValidateName(name); err != nil {
		return apiErr(err)
	}
	ctx, cancel := withTimeout(ctx)
	defer cancel()
	_, err := s.node.ApplyAndWait(ctx, &fsm.DeleteVolume{Name: name})
	return apiErr(err)
}

func (s *clusterService) ResizeVolume(ctx context.Context, name string, size int64) (api.Volume, error) {
	v, err := s.store.Get(name)
	if err != nil {
		return api.Volume{}, apiErr(err)
	}
	m := v.Meta()
	m.Size = size
	if err := volume.ValidateMeta(m); err != nil {
		return api.Volume{}, apiErr(err)
	}
	ctx, cancel := withTimeout(ctx)
	defer cancel()
	if _, err := s.node.ApplyAndWait(ctx, &fsm.ResizeVolume{Name: name, Size: size}); err != nil {
		return api.Volume{}, apiErr(err)
	}
	return s.GetVolume(ctx, name)
}

func (s *clusterService) VerifyVolume(ctx context.Context, name string, req api.VerifyRequest) (cluster.VerifyResult, error) {
	if req.ChunkSize == 0 {
		req.ChunkSize = 1 << 20
	}
	ctx, cancel := context.WithTimeout(ctx, 2*adminTimeout)
	defer cancel()
	res, err := s.node.VerifyRange(ctx, name, req.Offset, req.Length, req.ChunkSize)
	return res, apiErr(err)
}

func (s *clusterService) RepairVolume(ctx context.Context, name string, req api.RepairRequest) (cluster.RepairResult, error) {
	if req.ChunkSize == 0 {
		req.ChunkSize = 1 << 20
	}
	ctx, cancel := context.WithTimeout(ctx, 3*adminTimeout)
	defer cancel()
	res, err := s.node.RepairRange(ctx, name, req.Offset, req.Length, req.ChunkSize, req.Site)
	return res, apiErr(err)
}

func (s *clusterService) ClusterStatus(ctx context.Context) (cluster.Status, error) {
	st, err := s.node.Status(ctx)
	return st, apiErr(err)
}

func (s *clusterService) Leave(ctx context.Context) error {
	ctx, cancel := withTimeout(ctx)
	defer cancel()
	return apiErr(s.node.Leave(ctx))
}

func (s *clusterService) RemoveSite(ctx context.Context, site string) error {
	ctx, cancel := withTimeout(ctx)
	defer cancel()
	return apiErr(s.node.RemoveSite(ctx, site))
}

func (s *clusterService) Keyring(ctx context.Context) (cluster.KeyringReport, error) {
	ctx, cancel := withTimeout(ctx)
	defer cancel()
	rep, err := s.node.KeyringList(ctx)
	return rep, apiErr(err)
}

func (s *clusterService) ChangeKeyring(ctx context.Context, req api.KeyringRequest) (cluster.KeyringReport, error) {
	key, err := pki.ParseGossipKey([]byte(req.Key))
	if err != nil {
		return cluster.KeyringReport{}, fmt.Errorf("%w: %w", api.ErrBadRequest, err)
	}
	ctx, cancel := withTimeout(ctx)
	defer cancel()
	var rep cluster.KeyringReport
	switch req.Op {
	case "install":
		rep, err = s.node.KeyringInstall(ctx, key)
	case "use":
		rep, err = s.node.KeyringUse(ctx, key)
	case "remove":
		rep, err = s.node.KeyringRemove(ctx, key)
	default:
		return rep, fmt.Errorf("%w: keyring op %q: want install, use or remove", api.ErrBadRequest, req.Op)
	}
	return rep, apiErr(err)
}

func (s *clusterService) TransferLeadership(ctx context.Context, to string) (string, error) {
	ctx, cancel := withTimeout(ctx)
	defer cancel()
	l, err := s.node.TransferLeadership(ctx, to)
	return l, apiErr(err)
}

func (s *clusterService) WriteStage(ctx context.Context, name string) (api.WriteStage, error) {
	if _, err := s.GetVolume(ctx, name); err != nil {
		return api.WriteStage{}, err
	}
	out := api.WriteStage{Volume: name, Site: s.node.Name()}
	st, ok := s.stage(name)
	if !ok {
		return out, nil
	}
	out.Attached = true
	out.Accepted, out.Batches, out.Bytes, out.Retries = st.Accepted, st.Batches, st.Bytes, st.Retries
	out.Inflight, out.BufferedBytes, out.Commits = st.Inflight, st.BufferedBytes, st.CommitCount
	if st.CommitCount > 0 {
		out.CommitMeanUS = (st.CommitLatency / time.Duration(st.CommitCount)).Microseconds()
	}
	out.CommitP50US, out.CommitP99US = st.CommitP50.Microseconds(), st.CommitP99.Microseconds()
	if cs, err := s.node.Status(ctx); err == nil {
		for _, site := range cs.Sites {
			for _, x := range site.Stages {
				out.Breakdown = append(out.Breakdown, api.StageTime{Site: site.Name, Stage: x.Stage, Count: x.Count,
					P50US: x.P50.Microseconds(), P99US: x.P99.Microseconds()})
			}
		}
	}
	return out, nil
}
