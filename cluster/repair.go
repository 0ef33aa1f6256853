package cluster

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"slices"
	"time"

	"github.com/robib/robib/volume"
)

// Repair of differing copies (`robib volume repair`): a replicated verify
// finds the chunks whose hashes differ; where a strict majority of the
// voters agrees on a chunk, every other site marks it damaged and repairs
// it from majority sites only. DESIGN.md, "Repair from peers".

// The internal repair request (version 1, frozen by
// testdata/repair-request.v1 and repair-reply.v1):
//
//	POST /internal/v1/repair
//	{"version":1,"volume":V,"offset":O,"length":L,"sources":[S...]}
//
// tells the receiving site to mark [O, O+L) of its copy of V damaged and
// repair it from the sources (voters other than itself). The answer is
// {"version":1,"repaired_bytes":N,"damaged_bytes":D}: bytes written back,
// and bytes of the range still damaged afterwards (written meanwhile; the
// background rebuild takes them). Errors are the usual {"error": reason}
// with the status of statusFor.
const (
	pathRepair           = "/internal/v1/repair"
	repairRequestVersion = 1
	// repairTimeout bounds one internal repair request.
	repairTimeout = 2 * time.Minute
	// maxRepairSources bounds the sources of one repair request.
	maxRepairSources = 64
)

type repairRequest struct {
	Version int      `json:"version"`
	Volume  string   `json:"volume"`
	Offset  int64    `json:"offset"`
	Length  int64    `json:"length"`
	Sources []string `json:"sources"`
}

type repairReply struct {
	Version       int   `json:"version"`
	RepairedBytes int64 `json:"repaired_bytes"`
	DamagedBytes  int64 `json:"damaged_bytes"`
}

// RepairResult is what RepairRange found and changed in one range of a
// volume.
type RepairResult struct {
	Volume      string            `json:"volume"`
	Index       uint64            `json:"index"` // log index of the verify that found the differences
	Offset      int64             `json:"offset"`
	Length      int64             `json:"length"`
	ChunkSize   int64             `json:"chunk_size"`
	Chunks      int               `json:"chunks"`
	Voters      int               `json:"voters"`
	Sites       []string          `json:"sites"`                 // sites whose hashes were compared
	Unreachable map[string]string `json:"unreachable,omitempty"` // site -> why it could not be compared
	// Repairs: one per (minority site, chunk) repaired or attempted.
	Repairs []ChunkRepair `json:"repairs,omitempty"`
	// NoMajority: differing chunks where no hash is held by a strict
	// majority of the voters; nothing was changed there.
	NoMajority []VerifyChunkDiff `json:"no_majority,omitempty"`
	// Remaining: chunks that still differ when the range is verified
	// again after the repairs (none were made: not verified again).
	Remaining []VerifyChunkDiff `json:"remaining,omitempty"`
	// RecheckError: the verify after the repairs failed.
	RecheckError string `json:"recheck_error,omitempty"`
}

// ChunkRepair is the repair of one chunk at one site.
type ChunkRepair struct {
	Site          string   `json:"site"`
	Offset        int64    `json:"offset"`
	Length        int64    `json:"length"`
	Sources       []string `json:"sources"`        // the majority sites it was read from
	RepairedBytes int64    `json:"repaired_bytes"` // bytes written back at the site
	DamagedBytes  int64    `json:"damaged_bytes"`  // still damaged there afterwards (the background rebuild goes on)
	Error         string   `json:"error,omitempty"`
}

// rangeVerifier runs replicated verifies (verifier).
type rangeVerifier interface {
	VerifyRange(ctx context.Context, vol string, off, length, chunk int64) (VerifyResult, error)
}

// repairPoster sends an internal repair request (rpcClient).
type repairPoster interface {
	repair(ctx context.Context, addr string, req repairRequest) (repairReply, error)
}

// repairer coordinates `volume repair`: verify, decide by majority, have
// each minority site repair itself from majority sites. It has no state.
type repairer struct {
	self   string
	log    *slog.Logger
	verify rangeVerifier
	heal   *healer
	book   addressBook
	rpc    repairPoster
}

// RepairRange implements Node.RepairRange.
func (r *repairer) RepairRange(ctx context.Context, vol string, off, length, chunk int64, only string) (RepairResult, error) {
	if off < 0 || off%RepairBlock != 0 || chunk <= 0 || chunk%RepairBlock != 0 {
		return RepairResult{}, fmt.Errorf("%w: repair range offset %d and chunk size %d must be multiples of %d", ErrInvalidRequest, off, chunk, RepairBlock)
	}
	res, err := r.verify.VerifyRange(ctx, vol, off, length, chunk)
	if err != nil {
		return RepairResult{}, err
	}
	out := RepairResult{Volume: vol, Index: res.Index, Offset: off, Length: length, ChunkSize: chunk, Chunks: res.Chunks,
		Voters: len(res.Sites) + len(res.Unreachable), Sites: res.Sites, Unreachable: res.Unreachable}
	if only != "" && !slices.Contains(res.Sites, only) {
		if why, ok := res.Unreachable[only]; ok {
			return out, fmt.Errorf("%w: site %s could not be compared: %s", ErrRetry, only, why)
		}
		return out, fmt.Errorf("%w: %s is not a voter", ErrUnknownSite, only)
	}
	for _, m := range res.Mismatches {
		sources, hash := strictMajority(m.Hashes, out.Voters)
		if sources == nil {
			out.NoMajority = append(out.NoMajority, m)
			r.log.Warn("cluster: repair: a chunk differs with no strict majority; not repairing it",
				"volume", vol, "off", m.Offset, "len", m.Length, "voters", out.Voters, "hashes", m.Hashes)
			continue
		}
		for _, site := range slices.Sorted(maps.Keys(m.Hashes)) {
			if m.Hashes[site] == hash || (only != "" && site != only) {
				continue
			}
			rep := ChunkRepair{Site: site, Offset: m.Offset, Length: m.Length, Sources: sources}
			reply, err := r.repairAt(ctx, site, vol, m.Offset, m.Length, sources)
			rep.RepairedBytes, rep.DamagedBytes = reply.RepairedBytes, reply.DamagedBytes
			if err != nil {
				rep.Error = err.Error()
				r.log.Warn("cluster: repair of a minority copy failed", "volume", vol, "site", site, "off", m.Offset, "len", m.Length, "err", err)
			} else {
				r.log.Info("cluster: repaired a minority copy from the majority", "volume", vol, "site", site, "off", m.Offset,
					"len", m.Length, "sources", sources, "repaired_bytes", reply.RepairedBytes)
			}
			out.Repairs = append(out.Repairs, rep)
		}
	}
	if len(out.Repairs) > 0 {
		again, err := r.verify.VerifyRange(ctx, vol, off, length, chunk)
		if err != nil {
			out.RecheckError = err.Error()
		} else {
			out.Remaining = again.Mismatches
		}
	}
	return out, nil
}

// strictMajority returns the sites (sorted) holding the hash that more
// than half of the voters hold, and that hash; nil if there is none. An
// empty hash (a report without it) is never a majority.
func strictMajority(hashes map[string]string, voters int) ([]string, string) {
	count := map[string]int{}
	for _, h := range hashes {
		if h != "" {
			count[h]++
		}
	}
	for h, n := range count {
		if 2*n > voters {
			var sites []string
			for site, sh := range hashes {
				if sh == h {
					sites = append(sites, site)
				}
			}
			slices.Sort(sites)
			return sites, h
		}
	}
	return nil, ""
}

// repairAt has site mark [off, off+length) of vol damaged and repair it
// from sources.
func (r *repairer) repairAt(ctx context.Context, site, vol string, off, length int64, sources []string) (repairReply, error) {
	if site == r.self {
		n, left, err := r.heal.repairMarked(ctx, vol, off, length, sources)
		return repairReply{Version: repairRequestVersion, RepairedBytes: n, DamagedBytes: left}, err
	}
	meta, ok := r.book.memberMeta(site)
	if !ok || meta.API == "" {
		return repairReply{}, fmt.Errorf("%w: site %s is not in gossip (down or cut off)", ErrRetry, site)
	}
	return r.rpc.repair(ctx, meta.API, repairRequest{Version: repairRequestVersion, Volume: vol, Offset: off, Length: length, Sources: sources})
}

// repairMarked marks [off, off+length) of the local volume name damaged
// and repairs it from sources: bytes repaired, bytes still damaged there.
func (h *healer) repairMarked(ctx context.Context, name string, off, length int64, sources []string) (int64, int64, error) {
	v, err := h.vols.repairable(name)
	if err != nil {
		return 0, 0, err
	}
	if err := v.MarkDamaged(off, length); err != nil {
		return 0, 0, err
	}
	h.log.Warn("cluster: this site's copy differs from the majority; repairing it from them", "volume", name, "site", h.self,
		"off", off, "len", length, "sources", sources)
	n, err := h.repairRange(ctx, v, off, length, sources, nil)
	left := rangeBytes(blockSpan(v.Damaged(), off, off+length, v.Size()))
	return n, left, err
}

// parseRepairRequest decodes and checks an internal repair request sent to
// site self. Every error wraps ErrInvalidRequest.
func parseRepairRequest(body []byte, self string) (repairRequest, error) {
	var req repairRequest
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	bad := func(format string, args ...any) (repairRequest, error) {
		return repairRequest{}, fmt.Errorf("%w: repair request: %s", ErrInvalidRequest, fmt.Sprintf(format, args...))
	}
	if err := dec.Decode(&req); err != nil {
		return bad("%v", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return bad("trailing data")
	}
	switch {
	case req.Version != repairRequestVersion:
		return bad("version %d (this site reads %d)", req.Version, repairRequestVersion)
	case volume.ValidateName(req.Volume) != nil:
		return bad("volume: %v", volume.ValidateName(req.Volume))
	case req.Offset < 0 || req.Length <= 0 || req.Length > MaxVerifyRange || req.Offset > volume.MaxSize-req.Length:
		return bad("range [%d, +%d) (at most %d bytes)", req.Offset, req.Length, MaxVerifyRange)
	case len(req.Sources) == 0 || len(req.Sources) > maxRepairSources:
		return bad("%d sources (1 to %d)", len(req.Sources), maxRepairSources)
	}
	seen := map[string]bool{}
	for _, s := range req.Sources {
		switch {
		case s == "" || len(s) > 253:
			return bad("source %q", s)
		case s == self:
			return bad("site %s cannot repair from itself", self)
		case seen[s]:
			return bad("source %s twice", s)
		}
		seen[s] = true
	}
	return req, nil
}

// handleRepair serves an internal repair request.
func (h *healer) handleRepair(w http.ResponseWriter, r *http.Request) {
	body, err := readBody(w, r, 1<<16)
	if err != nil {
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": fmt.Sprintf("%v: repair request: %v", ErrInvalidRequest, err)})
		return
	}
	req, err := parseRepairRequest(body, h.self)
	if err != nil {
		writeJSON(w, statusFor(err), map[string]string{"error": err.Error()})
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), repairTimeout)
	defer cancel()
	n, left, err := h.repairMarked(ctx, req.Volume, req.Offset, req.Length, req.Sources)
	if err != nil {
		writeJSON(w, statusFor(err), map[string]string{"error": err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, repairReply{Version: repairRequestVersion, RepairedBytes: n, DamagedBytes: left})
}

// repair sends an internal repair request to the site at addr.
func (c *rpcClient) repair(ctx context.Context, addr string, req repairRequest) (repairReply, error) {
	resp, err := c.post(ctx, addr, pathRepair, req)
	if err != nil {
		return repairReply{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return repairReply{}, statusError(resp)
	}
	var rep repairReply
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<16)).Decode(&rep); err != nil {
		return rep, fmt.Errorf("bad repair answer from %s: %v", addr, err)
	}
	if rep.Version != repairRequestVersion {
		return repairReply{}, fmt.Errorf("repair answer from %s: version %d (this site reads %d)", addr, rep.Version, repairRequestVersion)
	}
	return rep, nil
}
