package cluster

// Gossip encryption keys and their cluster-wide rotation: see DESIGN.md,
// "Gossip encryption and peer identity".

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/robib/robib/volume"
)

// keyringFileName is the persisted gossip keyring in the data directory.
const keyringFileName = "gossip-keyring"

// keyringVersion is the version of the keyring file format. Version 1
// (frozen by testdata/gossip-keyring.v1):
//
//	{
//	  "version": 1,
//	  "keys": [
//	    "<standard base64 of the primary key>",
//	    "<standard base64 of another key>"
//	  ]
//	}
//
// two-space indented, one trailing newline. keys holds at least one key,
// the primary first, each 16, 24 or 32 bytes, no duplicates. Unknown
// fields and other versions are refused.
const keyringVersion = 1

type keyringFile struct {
	Version int      `json:"version"`
	Keys    [][]byte `json:"keys"`
}

// validKeys checks a non-empty list of distinct AES keys.
func validKeys(keys [][]byte) error {
	if len(keys) == 0 {
		return errors.New("no keys")
	}
	for i, k := range keys {
		if err := memberlist.ValidateKey(k); err != nil {
			return fmt.Errorf("key %d (%s): %d bytes, want 16, 24 or 32", i+1, KeyFingerprint(k), len(k))
		}
		if slices.IndexFunc(keys[:i], func(o []byte) bool { return bytes.Equal(o, k) }) >= 0 {
			return fmt.Errorf("key %d (%s) is listed twice", i+1, KeyFingerprint(k))
		}
	}
	return nil
}

// encodeKeyring is the file's contents for keys (primary first).
func encodeKeyring(keys [][]byte) ([]byte, error) {
	if err := validKeys(keys); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalidRequest, err)
	}
	b, err := json.MarshalIndent(keyringFile{Version: keyringVersion, Keys: keys}, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// decodeKeyring reads a keyring file's contents.
func decodeKeyring(b []byte) ([][]byte, error) {
	var v struct {
		Version int `json:"version"`
	}
	if err := json.Unmarshal(b, &v); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadKeyring, err)
	}
	if v.Version != keyringVersion {
		return nil, fmt.Errorf("%w: format version %d, this build reads version %d", ErrBadKeyring, v.Version, keyringVersion)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var f keyringFile
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadKeyring, err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("%w: data after the keyring", ErrBadKeyring)
	}
	if err := validKeys(f.Keys); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadKeyring, err)
	}
	return f.Keys, nil
}

// GenerateGossipKey returns a new random gossip key (AES-256, 32 bytes).
func GenerateGossipKey() ([]byte, error) {
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		return nil, err
	}
	return k, nil
}

// KeyFingerprint names a gossip key without revealing it: the first 8 hex
// digits of its SHA-256. Keys are never logged or reported, only this.
func KeyFingerprint(key []byte) string { return keyHash(key)[:8] }

// keyHash is a key's full SHA-256 in hex: what sites compare (a
// fingerprint is too short to rely on).
func keyHash(key []byte) string {
	h := sha256.Sum256(key)
	return hex.EncodeToString(h[:])
}

// gossipKeyring is this site's gossip keys: memberlist's Keyring (which
// encrypts with the primary and decrypts with any), this role's own copy
// of its keys, and the file. mu serialises changes (file, then ring) and
// guards keys; it is a leaf lock. ring is nil when gossip is in plain
// text.
type gossipKeyring struct {
	path string
	log  *slog.Logger

	mu   sync.Mutex
	keys [][]byte // primary first; empty: plain text
	ring *memberlist.Keyring
}

// openKeyring loads the persisted keyring from dataDir, or starts one
// from the configured keys (and persists it). A persisted ring wins over
// the configured keys: it holds the rotations since.
func openKeyring(dataDir string, configured [][]byte, log *slog.Logger) (*gossipKeyring, error) {
	var conf [][]byte
	for _, k := range configured {
		if err := memberlist.ValidateKey(k); err != nil {
			return nil, fmt.Errorf("%w: gossip key %s: %d bytes, want 16, 24 or 32", ErrInvalidRequest, KeyFingerprint(k), len(k))
		}
		if !slices.ContainsFunc(conf, func(o []byte) bool { return bytes.Equal(o, k) }) {
			conf = append(conf, slices.Clone(k))
		}
	}
	k := &gossipKeyring{path: filepath.Join(dataDir, keyringFileName), log: log}
	b, err := os.ReadFile(k.path)
	switch {
	case err == nil:
		if k.keys, err = decodeKeyring(b); err != nil {
			return nil, fmt.Errorf("%s: %w", k.path, err)
		}
		log.Info("gossip keyring: using the persisted ring, which wins over the configured keys",
			"file", k.path, "keys", len(k.keys), "primary", KeyFingerprint(k.keys[0]))
		if len(conf) > 0 && !slices.ContainsFunc(k.keys, func(o []byte) bool { return bytes.Equal(o, conf[0]) }) {
			log.Warn("gossip keyring: the configured primary key is not in the persisted ring (rotated since?); using the persisted ring",
				"configured_primary", KeyFingerprint(conf[0]), "primary", KeyFingerprint(k.keys[0]), "file", k.path)
		}
	case errors.Is(err, os.ErrNotExist):
		k.keys = conf
		if len(k.keys) > 0 {
			if err := k.save(k.keys); err != nil {
				return nil, err
			}
		}
	default:
		return nil, fmt.Errorf("%w: %v", ErrBadKeyring, err)
	}
	if len(k.keys) > 0 {
		if k.ring, err = memberlist.NewKeyring(k.keys[1:], k.keys[0]); err != nil {
			return nil, fmt.Errorf("%w: %v", ErrBadKeyring, err)
		}
	}
	return k, nil
}

// memberlistRing is the Keyring memberlist encrypts with (nil: plain text).
func (k *gossipKeyring) memberlistRing() *memberlist.Keyring { return k.ring }

// save writes keys to the file atomically: a temporary file, fsynced,
// renamed over the old one, and the directory fsynced.
func (k *gossipKeyring) save(keys [][]byte) error {
	b, err := encodeKeyring(keys)
	if err != nil {
		return err
	}
	tmp := k.path + ".tmp"
	_ = os.Remove(tmp) // a leftover, whatever its mode
	if err := volume.WriteFileSync(tmp, b); err != nil {
		return fmt.Errorf("saving the gossip keyring: %w", err)
	}
	if err := os.Rename(tmp, k.path); err != nil {
		return fmt.Errorf("saving the gossip keyring: %w", err)
	}
	if err := volume.SyncDir(filepath.Dir(k.path)); err != nil {
		return fmt.Errorf("saving the gossip keyring: %w", err)
	}
	return nil
}

// hashes lists this site's keys by keyHash, primary first.
func (k *gossipKeyring) hashes() []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	out := make([]string, len(k.keys))
	for i, key := range k.keys {
		out[i] = keyHash(key)
	}
	return out
}

func hasKey(keys [][]byte, key []byte) bool {
	return slices.ContainsFunc(keys, func(o []byte) bool { return bytes.Equal(o, key) })
}

// change applies one keyring operation here: the new ring is written to
// the file first, then memberlist's ring follows (with the key validated,
// present or not the primary, that cannot fail).
func (k *gossipKeyring) change(op string, key []byte) error {
	if err := memberlist.ValidateKey(key); err != nil {
		return fmt.Errorf("%w: gossip key: %d bytes, want 16, 24 or 32", ErrInvalidRequest, len(key))
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.ring == nil {
		return fmt.Errorf("%w: gossip is not encrypted at this site (no gossip keys configured); keys cannot be rotated", ErrKeyringRefused)
	}
	fp := KeyFingerprint(key)
	var next [][]byte
	switch op {
	case "install":
		if hasKey(k.keys, key) {
			return nil
		}
		next = append(slices.Clone(k.keys), slices.Clone(key))
	case "use":
		if !hasKey(k.keys, key) {
			return fmt.Errorf("%w: key %s is not installed here", ErrKeyringRefused, fp)
		}
		if bytes.Equal(k.keys[0], key) {
			return nil
		}
		next = [][]byte{k.keys[slices.IndexFunc(k.keys, func(o []byte) bool { return bytes.Equal(o, key) })]}
		for _, o := range k.keys {
			if !bytes.Equal(o, key) {
				next = append(next, o)
			}
		}
	case "remove":
		if bytes.Equal(k.keys[0], key) {
			return fmt.Errorf("%w: key %s is the primary key here; use another key first", ErrKeyringRefused, fp)
		}
		if !hasKey(k.keys, key) {
			return nil
		}
		next = slices.DeleteFunc(slices.Clone(k.keys), func(o []byte) bool { return bytes.Equal(o, key) })
	default:
		return fmt.Errorf("%w: keyring operation %q", ErrInvalidRequest, op)
	}
	if err := k.save(next); err != nil {
		return err
	}
	var err error
	switch op {
	case "install":
		err = k.ring.AddKey(slices.Clone(key))
	case "use":
		err = k.ring.UseKey(key)
	case "remove":
		// memberlist's RemoveKey shifts the ring's slice in place while
		// its packet handlers may iterate a copy of that slice header
		// taken earlier; UseKey of the current primary first gives the
		// ring a fresh slice, so no earlier reader shares the one
		// RemoveKey rewrites.
		if err = k.ring.UseKey(k.keys[0]); err == nil {
			err = k.ring.RemoveKey(key)
		}
	}
	if err != nil {
		// Cannot happen (checked above); the file holds the new ring,
		// which the next start uses.
		return fmt.Errorf("gossip keyring %s %s: %w", op, fp, err)
	}
	k.keys = next
	k.log.Info("gossip keyring changed", "op", op, "key", fp, "primary", KeyFingerprint(next[0]), "keys", len(next))
	return nil
}

// SiteKeyring is one site's gossip keyring, by fingerprints
// (KeyFingerprint), never the keys themselves.
type SiteKeyring struct {
	Site    string   `json:"site"`
	Primary string   `json:"primary,omitempty"` // the key this site encrypts gossip with; "" in plain text
	Keys    []string `json:"keys,omitempty"`    // every installed key, primary first
	Error   string   `json:"error,omitempty"`   // the operation failed here, or the site did not answer
}

// KeyringReport is the outcome of a keyring operation at every live site.
type KeyringReport struct {
	Op    string        `json:"op"`            // list, install, use or remove
	Key   string        `json:"key,omitempty"` // the fingerprint of the key operated on
	Sites []SiteKeyring `json:"sites"`         // every live site, this one included, by name
}

// Failed names the sites where the operation failed.
func (r KeyringReport) Failed() []string {
	var out []string
	for _, s := range r.Sites {
		if s.Error != "" {
			out = append(out, s.Site)
		}
	}
	return out
}

// pathKeyring is the internal keyring endpoint: one site's part in a
// keyring operation.
const pathKeyring = "/internal/v1/keyring"

// keyringRequest is its body. From is the site coordinating the
// operation; it must be the sender (peer binding).
type keyringRequest struct {
	Op   string `json:"op"`            // list, install, use, remove
	Key  []byte `json:"key,omitempty"` // install, use, remove
	From string `json:"from"`
}

// keyringReply is its answer: the site's keys by keyHash, primary first.
type keyringReply struct {
	Site string   `json:"site"`
	Keys []string `json:"keys"`
}

// keyringCaller calls another site's keyring endpoint (rpcClient).
type keyringCaller interface {
	keyring(ctx context.Context, addr string, req keyringRequest) (keyringReply, error)
}

// liveSites lists the live gossip members with their addresses
// (membership).
type liveSites interface {
	memberLister
	addressBook
}

// keyAdmin runs keyring operations across the cluster: each is applied at
// every live site (this one locally, the others over the internal
// endpoint) and reported per site. It has no state of its own; keys
// (gossipKeyring.mu) serialises each site's changes. Two operations run
// at once from different sites are not ordered against each other: run
// one rotation at a time.
type keyAdmin struct {
	self    string
	log     *slog.Logger
	keys    *gossipKeyring
	members liveSites
	rpc     keyringCaller
}

// keyringCallTimeout bounds one site's part when the caller's context
// has no deadline.
const keyringCallTimeout = 10 * time.Second

// sites are the live sites: this one and every gossip member.
func (a *keyAdmin) sites() []member {
	out := []member{{Name: a.self}}
	for _, m := range a.members.members() {
		if m.Name != a.self {
			out = append(out, m)
		}
	}
	slices.SortFunc(out, func(x, y member) int { return strings.Compare(x.Name, y.Name) })
	return out
}

// local is this site's part of an operation.
func (a *keyAdmin) local(op string, key []byte) (keyringReply, error) {
	if op != "list" {
		if err := a.keys.change(op, key); err != nil {
			return keyringReply{}, err
		}
	}
	return keyringReply{Site: a.self, Keys: a.keys.hashes()}, nil
}

// fanOut runs op at every live site at once and returns their replies by
// site (a failed site has an error instead).
func (a *keyAdmin) fanOut(ctx context.Context, op string, key []byte) ([]member, map[string]keyringReply, map[string]error) {
	sites := a.sites()
	replies := make(map[string]keyringReply, len(sites))
	errs := make(map[string]error)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, m := range sites {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var rep keyringReply
			var err error
			if m.Name == a.self {
				rep, err = a.local(op, key)
			} else {
				cctx, cancel := ctx, context.CancelFunc(func() {})
				if _, ok := ctx.Deadline(); !ok {
					cctx, cancel = context.WithTimeout(ctx, keyringCallTimeout)
				}
				rep, err = a.rpc.keyring(cctx, m.Meta.API, keyringRequest{Op: op, Key: key, From: a.self})
				cancel()
				if err == nil && rep.Site != m.Name {
					err = fmt.Errorf("%s answers as %q", m.Meta.API, rep.Site)
				}
			}
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs[m.Name] = err
			} else {
				replies[m.Name] = rep
			}
		}()
	}
	wg.Wait()
	return sites, replies, errs
}

// report turns replies into a KeyringReport.
func report(op string, key []byte, sites []member, replies map[string]keyringReply, errs map[string]error) KeyringReport {
	r := KeyringReport{Op: op, Sites: make([]SiteKeyring, 0, len(sites))}
	if key != nil {
		r.Key = KeyFingerprint(key)
	}
	for _, m := range sites {
		s := SiteKeyring{Site: m.Name}
		if err := errs[m.Name]; err != nil {
			s.Error = err.Error()
		} else {
			for i, h := range replies[m.Name].Keys {
				if len(h) < 8 {
					continue
				}
				if i == 0 {
					s.Primary = h[:8]
				}
				s.Keys = append(s.Keys, h[:8])
			}
		}
		r.Sites = append(r.Sites, s)
	}
	return r
}

// incomplete is the error of an operation that failed at some sites.
func incomplete(r KeyringReport) error {
	failed := r.Failed()
	if len(failed) == 0 {
		return nil
	}
	return fmt.Errorf("%w: %s %s failed at %s", ErrKeyringIncomplete, r.Op, r.Key, strings.Join(failed, ", "))
}

// List implements Node.KeyringList.
func (a *keyAdmin) List(ctx context.Context) (KeyringReport, error) {
	sites, replies, errs := a.fanOut(ctx, "list", nil)
	return report("list", nil, sites, replies, errs), nil
}

// Install implements Node.KeyringInstall.
func (a *keyAdmin) Install(ctx context.Context, key []byte) (KeyringReport, error) {
	if err := memberlist.ValidateKey(key); err != nil {
		return KeyringReport{Op: "install"}, fmt.Errorf("%w: gossip key: %d bytes, want 16, 24 or 32", ErrInvalidRequest, len(key))
	}
	sites, replies, errs := a.fanOut(ctx, "install", key)
	r := report("install", key, sites, replies, errs)
	return r, incomplete(r)
}

// Use implements Node.KeyringUse: only once every live site holds key.
func (a *keyAdmin) Use(ctx context.Context, key []byte) (KeyringReport, error) {
	if err := memberlist.ValidateKey(key); err != nil {
		return KeyringReport{Op: "use"}, fmt.Errorf("%w: gossip key: %d bytes, want 16, 24 or 32", ErrInvalidRequest, len(key))
	}
	sites, replies, errs := a.fanOut(ctx, "list", nil)
	h := keyHash(key)
	var lacking []string
	for _, m := range sites {
		if errs[m.Name] != nil {
			lacking = append(lacking, m.Name+" (did not answer)")
		} else if !slices.Contains(replies[m.Name].Keys, h) {
			lacking = append(lacking, m.Name)
		}
	}
	if len(lacking) > 0 {
		r := report("use", key, sites, replies, errs)
		return r, fmt.Errorf("%w: key %s is not installed at %s: install it there first (a site that cannot decrypt the new primary drops out of gossip)",
			ErrKeyringRefused, KeyFingerprint(key), strings.Join(lacking, ", "))
	}
	sites, replies, errs = a.fanOut(ctx, "use", key)
	r := report("use", key, sites, replies, errs)
	return r, incomplete(r)
}

// Remove implements Node.KeyringRemove: never a key some live site
// encrypts with.
func (a *keyAdmin) Remove(ctx context.Context, key []byte) (KeyringReport, error) {
	if err := memberlist.ValidateKey(key); err != nil {
		return KeyringReport{Op: "remove"}, fmt.Errorf("%w: gossip key: %d bytes, want 16, 24 or 32", ErrInvalidRequest, len(key))
	}
	sites, replies, errs := a.fanOut(ctx, "list", nil)
	h := keyHash(key)
	var using []string
	for _, m := range sites {
		if errs[m.Name] != nil {
			using = append(using, m.Name+" (did not answer)")
		} else if ks := replies[m.Name].Keys; len(ks) > 0 && ks[0] == h {
			using = append(using, m.Name)
		}
	}
	if len(using) > 0 {
		r := report("remove", key, sites, replies, errs)
		return r, fmt.Errorf("%w: key %s is the primary key at %s: use another key first (the others could no longer decrypt their gossip)",
			ErrKeyringRefused, KeyFingerprint(key), strings.Join(using, ", "))
	}
	sites, replies, errs = a.fanOut(ctx, "remove", key)
	r := report("remove", key, sites, replies, errs)
	return r, incomplete(r)
}

// handleKeyring serves another site's keyring operation on this site.
func (a *keyAdmin) handleKeyring(w http.ResponseWriter, r *http.Request) {
	var req keyringRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 4096)).Decode(&req); err != nil {
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": err.Error()})
		return
	}
	if err := checkClaim(r, req.From, "change the gossip keyring"); err != nil {
		writeJSON(w, statusFor(err), map[string]string{"error": err.Error()})
		return
	}
	switch req.Op {
	case "list", "install", "use", "remove":
	default:
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": fmt.Sprintf("%v: keyring operation %q", ErrInvalidRequest, req.Op)})
		return
	}
	rep, err := a.local(req.Op, req.Key)
	if err != nil {
		writeJSON(w, statusFor(err), map[string]string{"error": err.Error()})
		return
	}
	if req.Op != "list" {
		a.log.Info("gossip keyring operation on behalf of another site", "op", req.Op, "from", req.From)
	}
	writeJSON(w, http.StatusOK, rep)
}

// keyring calls a site's keyring endpoint.
func (c *rpcClient) keyring(ctx context.Context, addr string, req keyringRequest) (keyringReply, error) {
	resp, err := c.post(ctx, addr, pathKeyring, req)
	if err != nil {
		return keyringReply{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return keyringReply{}, statusError(resp)
	}
	var rep keyringReply
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&rep); err != nil {
		return keyringReply{}, fmt.Errorf("%w: bad answer from %s%s: %v", ErrUnreachable, addr, pathKeyring, err)
	}
	return rep, nil
}
