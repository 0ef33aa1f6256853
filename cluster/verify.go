package cluster

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/raft"

	"github.com/robib/robib/fsm"
)

// VerifyChunkDiff is one chunk whose hash differs between sites.
type VerifyChunkDiff struct {
	Offset int64             `json:"offset"`
	Length int64             `json:"length"`
	Hashes map[string]string `json:"hashes"` // site -> hex sha256
}

// VerifyResult is the comparison of one range of a volume across sites,
// all hashed at the same applied log index.
type VerifyResult struct {
	Volume      string            `json:"volume"`
	Index       uint64            `json:"index"`
	Offset      int64             `json:"offset"`
	Length      int64             `json:"length"`
	ChunkSize   int64             `json:"chunk_size"`
	Chunks      int               `json:"chunks"`
	Sites       []string          `json:"sites"`                 // sites whose hashes were compared
	Unreachable map[string]string `json:"unreachable,omitempty"` // site -> why it could not be compared
	Mismatches  []VerifyChunkDiff `json:"mismatches,omitempty"`
}

// MaxVerifyRange bounds the range one VerifyChunks command hashes, so a
// verify never stalls the apply loop for long.
const MaxVerifyRange = 64 << 20

// verifyFSM is what verify reads of the FSM.
type verifyFSM interface {
	appliedWaiter
	VerifyResult(id string) (fsm.VerifyReport, bool)
}

// adminProposer proposes admin commands with retries (proposer).
type adminProposer interface {
	ApplyAndWait(ctx context.Context, cmd fsm.Command) (*fsm.Result, error)
}

// verifier coordinates verify: it proposes VerifyChunks, collects every
// voter's hashes and compares them; it also serves this site's result
// (handleVerify). It has no state of its own.
type verifier struct {
	self   string
	prop   adminProposer
	config configReader
	fsm    verifyFSM
	book   addressBook
	rpc    jsonGetter
}

// VerifyRange implements Node.VerifyRange.
func (v *verifier) VerifyRange(ctx context.Context, vol string, off, length, chunk int64) (VerifyResult, error) {
	if length <= 0 || length > MaxVerifyRange || chunk <= 0 || off < 0 {
		return VerifyResult{}, fmt.Errorf("%w: verify range %d+%d chunk %d (at most %d bytes per range)", ErrInvalidRequest, off, length, chunk, MaxVerifyRange)
	}
	var idb [12]byte
	_, _ = rand.Read(idb[:])
	id := hex.EncodeToString(idb[:])
	res, err := v.prop.ApplyAndWait(ctx, &fsm.VerifyChunks{ID: id, Volume: vol, Off: off, Len: length, ChunkSize: chunk})
	if err != nil {
		return VerifyResult{}, err
	}
	fut := v.config.GetConfiguration()
	if err := fut.Error(); err != nil {
		return VerifyResult{}, raftErr(err)
	}
	var sites []string
	for _, s := range fut.Configuration().Servers {
		if s.Suffrage == raft.Voter {
			sites = append(sites, string(s.ID))
		}
	}
	slices.Sort(sites)

	reports := make(map[string]fsm.VerifyReport)
	out := VerifyResult{Volume: vol, Index: res.Index, Offset: off, Length: length, ChunkSize: chunk, Unreachable: map[string]string{}}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, site := range sites {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rep, err := v.fetchVerify(ctx, site, id, res.Index)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				out.Unreachable[site] = err.Error()
				return
			}
			reports[site] = rep
		}()
	}
	wg.Wait()
	for _, site := range sites {
		if _, ok := reports[site]; ok {
			out.Sites = append(out.Sites, site)
		}
	}
	if len(out.Sites) == 0 {
		return out, fmt.Errorf("no site answered the verify of %s", vol)
	}
	ref := reports[out.Sites[0]]
	out.Chunks = len(ref.Hashes)
	for i := range ref.Hashes {
		hashes := map[string]string{}
		differ := false
		for _, site := range out.Sites {
			h := ""
			if hs := reports[site].Hashes; i < len(hs) {
				h = hs[i]
			}
			hashes[site] = h
			if h != ref.Hashes[i] {
				differ = true
			}
		}
		if differ {
			co := off + int64(i)*chunk
			out.Mismatches = append(out.Mismatches, VerifyChunkDiff{Offset: co, Length: min(chunk, off+length-co), Hashes: hashes})
		}
	}
	return out, nil
}

func (v *verifier) fetchVerify(ctx context.Context, site, id string, index uint64) (fsm.VerifyReport, error) {
	if site == v.self {
		if err := v.fsm.WaitApplied(ctx, index); err != nil {
			return fsm.VerifyReport{}, err
		}
		rep, ok := v.fsm.VerifyResult(id)
		if !ok {
			return fsm.VerifyReport{}, fmt.Errorf("no local verify result %s", id)
		}
		return rep, checkReport(rep)
	}
	meta, ok := v.book.memberMeta(site)
	if !ok {
		return fsm.VerifyReport{}, fmt.Errorf("site %s is not in gossip (down or cut off)", site)
	}
	var rep fsm.VerifyReport
	if err := v.rpc.getJSON(ctx, meta.API, fmt.Sprintf("%s%s?index=%d", pathVerify, id, index), &rep); err != nil {
		return rep, err
	}
	return rep, checkReport(rep)
}

// checkReport turns a site's report that cannot be compared into an error.
func checkReport(rep fsm.VerifyReport) error {
	switch {
	case rep.Error != "":
		return fmt.Errorf("hashing failed: %s", rep.Error)
	case rep.Fuzzy:
		return fmt.Errorf("site is still replaying its log (after a restart or a snapshot install); its copy is not exact at index %d yet, retry", rep.Index)
	}
	return nil
}

func (v *verifier) handleVerify(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	idx, _ := strconv.ParseUint(r.URL.Query().Get("index"), 10, 64)
	ctx, cancel := context.WithTimeout(r.Context(), 60*time.Second)
	defer cancel()
	if err := v.fsm.WaitApplied(ctx, idx); err != nil {
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": fmt.Sprintf("site %s has not applied index %d: %v", v.self, idx, err)})
		return
	}
	rep, ok := v.fsm.VerifyResult(id)
	if !ok {
		writeJSON(w, http.StatusNotFound, map[string]string{"error": "no verify result " + id + " at site " + v.self})
		return
	}
	writeJSON(w, http.StatusOK, rep)
}
