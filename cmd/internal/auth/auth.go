// Package auth decides who may do what at a site: the roles of the admin
// API's callers (a client certificate's name or an API token), that only
// sites reach the site-to-site endpoints, and which NBD client identities
// may attach which volume, read-write or read-only.
//
// It knows nothing of TLS or HTTP wiring: the agent authenticates (a
// verified certificate, a bearer token looked up here), hands the Identity
// in, and maps the sentinels below to HTTP statuses and NBD replies at its
// edges. A Policy is immutable once built and safe for concurrent use.
package auth

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"regexp"
	"sort"
	"strings"
)

// Errors of the package. Every decision that refuses returns one of the
// first two, wrapped with the reason.
var (
	// ErrUnauthenticated: the caller showed no identity (no client
	// certificate, no token) where one is needed, or an unknown token.
	ErrUnauthenticated = errors.New("authentication required")
	// ErrDenied: the caller is known but may not do this.
	ErrDenied = errors.New("permission denied")
	// ErrInvalidPolicy: a policy file that cannot be used.
	ErrInvalidPolicy = errors.New("invalid authorization policy")
)

// Kinds of identity.
const (
	KindSite   = "site"   // a site certificate of the cluster CA
	KindClient = "client" // a client certificate of the cluster CA
	KindToken  = "token"  // an API token listed in the policy
)

// Identity is an authenticated caller. The zero value is anonymous.
type Identity struct {
	Name string
	Kind string
}

// Anonymous reports whether the caller showed no identity.
func (id Identity) Anonymous() bool { return id.Name == "" }

func (id Identity) String() string {
	if id.Anonymous() {
		return "anonymous"
	}
	return id.Kind + " " + id.Name
}

// Role is what a caller may do on the admin API.
type Role int

// Roles, each including the one before.
const (
	RoleNone  Role = iota // nothing
	RoleRead              // GET requests: status, lists, stats, verify results
	RoleAdmin             // everything, profiling included
)

func (r Role) String() string {
	switch r {
	case RoleRead:
		return "read"
	case RoleAdmin:
		return "admin"
	}
	return "none"
}

// Access is what an NBD client may do with a volume.
type Access int

// Accesses, each including the one before.
const (
	AccessNone  Access = iota
	AccessRead         // read-only attaches (VOLUME@ro, VOLUME@ro-stale)
	AccessWrite        // read-write attaches, and read-only ones
)

func (a Access) String() string {
	switch a {
	case AccessRead:
		return "read-only"
	case AccessWrite:
		return "read-write"
	}
	return "none"
}

// AnyVolume in a policy's volumes names rights on every volume; a client's
// rights on a volume are the larger of its entry there and under
// AnyVolume.
const AnyVolume = "*"

// Policy is a site's authorization policy. Build one with Open (no policy
// file: every certificate of the cluster CA is trusted fully) or Parse/Load.
type Policy struct {
	open    bool
	roles   map[string]Role              // client certificate name → role
	tokens  map[[sha256.Size]byte]string // token hash → token name
	tokRole map[string]Role              // token name → role
	volumes map[string]map[string]Access // volume or AnyVolume → client name → access
	deny    map[string]bool              // revoked names (certificates and tokens)
	source  string                       // file the policy came from, for messages
}

// Open is the policy without a file: any client certificate of the cluster
// CA is an admin and may attach every volume read-write. Sites are sites.
func Open() *Policy { return &Policy{open: true, source: "no policy file"} }

// Source names where the policy came from.
func (p *Policy) Source() string { return p.source }

// Load reads a policy file (see Parse).
func Load(path string) (*Policy, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalidPolicy, err)
	}
	p, err := Parse(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	p.source = path
	return p, nil
}

// hexRule is a token's SHA-256 as the policy file keeps it. Names follow
// the certificate identities' rule (pki.ValidName), volume keys the
// volumes' (volume.ValidateName).
var hexRule = regexp.MustCompile(`^[0-9a-f]{64}$`)

// TokenHash is the form a token is kept in a policy file: the hex SHA-256
// of the token. The file never holds a token itself.
func TokenHash(token string) string {
	h := sha256.Sum256([]byte(token))
	return hex.EncodeToString(h[:])
}

// Token looks a bearer token up. Unknown tokens get ErrUnauthenticated.
// The lookup is by hash, so its time does not depend on how much of a
// listed token a guess gets right.
func (p *Policy) Token(token string) (Identity, error) {
	if token == "" {
		return Identity{}, fmt.Errorf("%w: empty token", ErrUnauthenticated)
	}
	h := sha256.Sum256([]byte(token))
	for k, name := range p.tokens {
		if subtle.ConstantTimeCompare(k[:], h[:]) == 1 {
			return Identity{Name: name, Kind: KindToken}, nil
		}
	}
	return Identity{}, fmt.Errorf("%w: unknown API token", ErrUnauthenticated)
}

// Denied reports whether the policy revokes name: a certificate (site or
// client) or token of that name is refused everywhere.
func (p *Policy) Denied(name string) bool { return p.deny[name] }

// Role is what id may do on the admin API. Sites have no role there: their
// certificates are for the site-to-site endpoints.
func (p *Policy) Role(id Identity) Role {
	switch id.Kind {
	case KindClient:
		if p.open {
			return RoleAdmin
		}
		return p.roles[id.Name]
	case KindToken:
		return p.tokRole[id.Name]
	}
	return RoleNone
}

// Access is what NBD client id may do with volume.
func (p *Policy) Access(id Identity, volume string) Access {
	if id.Kind != KindClient || id.Anonymous() {
		return AccessNone
	}
	if p.open {
		return AccessWrite
	}
	return max(p.volumes[volume][id.Name], p.volumes[AnyVolume][id.Name])
}

// Need is what an admin API request needs.
type Need int

// Needs of the admin API's requests.
const (
	NeedNone  Need = iota // anyone (the health probe)
	NeedRead              // RoleRead
	NeedAdmin             // RoleAdmin
	NeedSite              // a site identity (the /internal/ endpoints)
)

// Require decides whether id may make a request that needs n; what names
// the request in the error (for example "POST /v1/volumes").
func (p *Policy) Require(id Identity, n Need, what string) error {
	if n == NeedNone {
		return nil
	}
	if id.Anonymous() {
		return fmt.Errorf("%w: %s needs a client certificate of the cluster or an API token", ErrUnauthenticated, what)
	}
	if p.Denied(id.Name) {
		return fmt.Errorf("%w: %s is revoked (deny list of %s)", ErrDenied, id, p.source)
	}
	if n == NeedSite {
		if id.Kind != KindSite {
			return fmt.Errorf("%w: %s is for sites only, and %s is not a site", ErrDenied, what, id)
		}
		return nil
	}
	if id.Kind == KindSite {
		return fmt.Errorf("%w: %s: site certificates are for site-to-site links, not the admin API (%s)", ErrDenied, what, id)
	}
	role := p.Role(id)
	want := RoleRead
	if n == NeedAdmin {
		want = RoleAdmin
	}
	if role < want {
		return fmt.Errorf("%w: %s needs the %s role, and %s has %s (%s)", ErrDenied, what, want, id, role, p.source)
	}
	return nil
}

// Attach decides whether NBD client id may attach volume (readOnly: a
// read-only export of it).
func (p *Policy) Attach(id Identity, volume string, readOnly bool) error {
	if id.Anonymous() {
		return fmt.Errorf("%w: attaching %q needs a client certificate", ErrUnauthenticated, volume)
	}
	if id.Kind != KindClient {
		return fmt.Errorf("%w: %s is not an NBD client identity", ErrDenied, id)
	}
	if p.Denied(id.Name) {
		return fmt.Errorf("%w: %s is revoked (deny list of %s)", ErrDenied, id, p.source)
	}
	want := AccessWrite
	if readOnly {
		want = AccessRead
	}
	if got := p.Access(id, volume); got < want {
		return fmt.Errorf("%w: %s may not attach %q %s (allowed: %s; %s)", ErrDenied, id, volume, want, got, p.source)
	}
	return nil
}

// Summary describes the policy for logs: how many names have each right.
func (p *Policy) Summary() string {
	if p.open {
		return "open: every client certificate of the cluster CA is an admin and may attach every volume read-write"
	}
	var admins, readers []string
	for n, r := range p.roles {
		if r == RoleAdmin {
			admins = append(admins, n)
		} else if r == RoleRead {
			readers = append(readers, n)
		}
	}
	sort.Strings(admins)
	sort.Strings(readers)
	return fmt.Sprintf("%s: admins [%s], readers [%s], %d tokens, rights on %d volume entries, %d revoked",
		p.source, strings.Join(admins, " "), strings.Join(readers, " "), len(p.tokens), len(p.volumes), len(p.deny))
}
