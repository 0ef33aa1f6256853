package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"time"

	"github.com/robib/robib/volume"
)

// The peer read (wire format version 1, frozen by
// testdata/peer-read.v1; DESIGN.md, "Repair from peers"):
//
//	GET /internal/v1/read?volume=V&off=O&len=L&min_index=I
//
// V a volume name, O, L and I unsigned decimal integers without sign or
// leading zeros (0 itself is "0"), 1 <= L <= MaxPeerRead, each parameter
// exactly once and no other. The site waits (at most peerCatchUpWait)
// until it has applied index I and answers
//
//	200, Robib-Read-Version: 1, Robib-Read-Index: P (decimal, P >= I),
//	Content-Type: application/octet-stream, Content-Length: L,
//	body: the L bytes of [O, O+L) of its copy
//
// where every byte was read between two applied entries at an index in
// [I, P] from a copy exact at that index. Refusals are 503 (ErrPeerRefused:
// behind, damaged there, not exact, no such volume) and bad requests 400
// (ErrInvalidRequest), each with the JSON body {"error": reason} of every
// internal endpoint.
const (
	pathRead = "/internal/v1/read"

	headerReadVersion = "Robib-Read-Version"
	headerReadIndex   = "Robib-Read-Index"
	peerReadVersion   = "1"

	// MaxPeerRead bounds the length of one peer read.
	MaxPeerRead = 4 << 20
	// boundaryRead is the most a site reads of its copy inside one
	// AtBoundary call while serving a peer read (the apply loop waits for
	// it).
	boundaryRead = 1 << 20
	// peerCatchUpWait bounds how long a site waits to reach the index a
	// peer read asks for.
	peerCatchUpWait = 5 * time.Second
	// peerReadSlots bounds the peer reads a site serves at once (each
	// holds up to MaxPeerRead bytes).
	peerReadSlots = 8
)

// readQuery is a parsed peer read request.
type readQuery struct {
	volume   string
	off, len int64
	minIndex uint64
}

// readPath is the request path and query of a peer read.
func readPath(vol string, off, length int64, minIndex uint64) string {
	return fmt.Sprintf("%s?volume=%s&off=%d&len=%d&min_index=%d", pathRead, url.QueryEscape(vol), off, length, minIndex)
}

// parseReadQuery parses and checks the query of a peer read. Every error
// wraps ErrInvalidRequest.
func parseReadQuery(rawQuery string) (readQuery, error) {
	bad := func(format string, args ...any) (readQuery, error) {
		return readQuery{}, fmt.Errorf("%w: peer read: %s", ErrInvalidRequest, fmt.Sprintf(format, args...))
	}
	vals, err := url.ParseQuery(rawQuery)
	if err != nil {
		return bad("query: %v", err)
	}
	for k, v := range vals {
		switch k {
		case "volume", "off", "len", "min_index":
		default:
			return bad("unknown parameter %q", k)
		}
		if len(v) != 1 {
			return bad("parameter %q given %d times", k, len(v))
		}
	}
	var q readQuery
	for _, k := range []string{"volume", "off", "len", "min_index"} {
		if _, ok := vals[k]; !ok {
			return bad("missing parameter %q", k)
		}
	}
	q.volume = vals.Get("volume")
	if err := volume.ValidateName(q.volume); err != nil {
		return bad("volume: %v", err)
	}
	num := func(k string, limit uint64) (uint64, error) {
		s := vals.Get(k)
		if s == "" || len(s) > 20 || (len(s) > 1 && s[0] == '0') {
			return 0, fmt.Errorf("%s=%q is not a decimal number", k, s)
		}
		for _, c := range []byte(s) {
			if c < '0' || c > '9' {
				return 0, fmt.Errorf("%s=%q is not a decimal number", k, s)
			}
		}
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil || n > limit {
			return 0, fmt.Errorf("%s=%s is out of range (at most %d)", k, s, limit)
		}
		return n, nil
	}
	off, err := num("off", uint64(volume.MaxSize))
	if err != nil {
		return bad("%v", err)
	}
	length, err := num("len", MaxPeerRead)
	if err != nil {
		return bad("%v", err)
	}
	if length == 0 {
		return bad("len=0: nothing to read")
	}
	if q.minIndex, err = num("min_index", ^uint64(0)); err != nil {
		return bad("%v", err)
	}
	q.off, q.len = int64(off), int64(length)
	return q, nil
}

// handleRead serves a peer read (see the format above).
func (h *healer) handleRead(w http.ResponseWriter, r *http.Request) {
	q, err := parseReadQuery(r.URL.RawQuery)
	if err == nil {
		var data []byte
		var index uint64
		if data, index, err = h.serveRead(r.Context(), q); err == nil {
			hdr := w.Header()
			hdr.Set(headerReadVersion, peerReadVersion)
			hdr.Set(headerReadIndex, strconv.FormatUint(index, 10))
			hdr.Set("Content-Type", "application/octet-stream")
			hdr.Set("Content-Length", strconv.Itoa(len(data)))
			w.WriteHeader(http.StatusOK)
			_, _ = w.Write(data)
			return
		}
	}
	writeJSON(w, statusFor(err), map[string]string{"error": err.Error()})
}

// serveRead reads q's range of this site's copy once it applied
// q.minIndex: the bytes and the highest index they were read at.
func (h *healer) serveRead(ctx context.Context, q readQuery) ([]byte, uint64, error) {
	refuse := func(format string, args ...any) ([]byte, uint64, error) {
		return nil, 0, fmt.Errorf("%w: site %s: %s", ErrPeerRefused, h.self, fmt.Sprintf(format, args...))
	}
	select {
	case h.readSlots <- struct{}{}:
		defer func() { <-h.readSlots }()
	case <-ctx.Done():
		return refuse("busy serving other reads: %v", ctx.Err())
	}
	wctx, cancel := context.WithTimeout(ctx, h.catchUp)
	err := h.fsm.WaitApplied(wctx, q.minIndex)
	cancel()
	if err != nil {
		return refuse("it has applied index %d, the read needs %d (%v)", h.fsm.AppliedIndex(), q.minIndex, err)
	}
	v, err := h.vols.repairable(q.volume)
	if err != nil {
		return refuse("%v", err)
	}
	buf := make([]byte, q.len)
	var index uint64
	for o := int64(0); o < q.len; o += boundaryRead {
		n := min(boundaryRead, q.len-o)
		var ferr error
		h.fsm.AtBoundary(func(applied uint64) {
			if !h.fsm.CopyExact() {
				ferr = fmt.Errorf("%w: site %s: its copy is not exact at its applied index %d (replaying its log after a restart, installing a snapshot, or failed)",
					ErrPeerRefused, h.self, applied)
				return
			}
			if size := v.Size(); q.off > size || q.len > size-q.off {
				ferr = fmt.Errorf("%w: peer read [%d, +%d) of %s: out of range (size %d at index %d)", ErrInvalidRequest, q.off, q.len, q.volume, size, applied)
				return
			}
			damaged, err := v.ReadHealthy(buf[o:o+n], q.off+o)
			switch {
			case err != nil:
				ferr = fmt.Errorf("%w: site %s: reading %s: %v", ErrPeerRefused, h.self, q.volume, err)
			case len(damaged) > 0:
				ferr = fmt.Errorf("%w: site %s: its own copy of %s is damaged at %s", ErrPeerRefused, h.self, q.volume,
					formatRanges(blockSpan(damaged, 0, v.Size(), v.Size()), 4))
			}
			index = max(index, applied)
		})
		if ferr != nil {
			return nil, 0, ferr
		}
		if err := ctx.Err(); err != nil {
			return nil, 0, err
		}
	}
	return buf, index, nil
}

// readRange reads [off, off+length) of vol from the site at addr, at an
// index of at least minIndex: the bytes and the index they reflect. A
// refusal wraps ErrPeerRefused, a transport failure ErrUnreachable.
func (c *rpcClient) readRange(ctx context.Context, addr, vol string, off, length int64, minIndex uint64) ([]byte, uint64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.url(addr, readPath(vol, off, length, minIndex)), nil)
	if err != nil {
		return nil, 0, err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil, 0, ctx.Err()
		}
		return nil, 0, fmt.Errorf("%w: %v", ErrUnreachable, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		if resp.StatusCode == http.StatusServiceUnavailable {
			var e struct{ Error string }
			_ = json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&e)
			return nil, 0, fmt.Errorf("%w: %s", ErrPeerRefused, stripPrefix(e.Error, ErrPeerRefused))
		}
		return nil, 0, statusError(resp)
	}
	data, index, err := parseReadResponse(resp.Header, resp.ContentLength, resp.Body, length, minIndex)
	if err != nil {
		return nil, 0, fmt.Errorf("bad peer read answer from %s: %w", addr, err)
	}
	return data, index, nil
}

// parseReadResponse checks a 200 answer to a peer read of length bytes at
// minIndex or later (headers, declared length, body) and returns its
// bytes and index.
func parseReadResponse(h http.Header, contentLength int64, body io.Reader, length int64, minIndex uint64) ([]byte, uint64, error) {
	if v := h.Values(headerReadVersion); len(v) != 1 || v[0] != peerReadVersion {
		return nil, 0, fmt.Errorf("%s %q: this site reads version %s", headerReadVersion, v, peerReadVersion)
	}
	iv := h.Values(headerReadIndex)
	if len(iv) != 1 || iv[0] == "" || len(iv[0]) > 20 || (len(iv[0]) > 1 && iv[0][0] == '0') {
		return nil, 0, fmt.Errorf("%s %q is not one decimal index", headerReadIndex, iv)
	}
	for _, c := range []byte(iv[0]) {
		if c < '0' || c > '9' {
			return nil, 0, fmt.Errorf("%s %q is not one decimal index", headerReadIndex, iv)
		}
	}
	index, err := strconv.ParseUint(iv[0], 10, 64)
	if err != nil {
		return nil, 0, fmt.Errorf("%s %q: %v", headerReadIndex, iv[0], err)
	}
	if index < minIndex {
		return nil, 0, fmt.Errorf("read at index %d, below the %d asked for", index, minIndex)
	}
	if length <= 0 || length > MaxPeerRead {
		return nil, 0, fmt.Errorf("length %d out of range", length)
	}
	if contentLength != length {
		return nil, 0, fmt.Errorf("content length %d, asked for %d bytes", contentLength, length)
	}
	data := make([]byte, length)
	if _, err := io.ReadFull(body, data); err != nil {
		return nil, 0, fmt.Errorf("body: %v", err)
	}
	var one [1]byte
	if n, _ := body.Read(one[:]); n != 0 {
		return nil, 0, errors.New("body longer than asked for")
	}
	return data, index, nil
}
