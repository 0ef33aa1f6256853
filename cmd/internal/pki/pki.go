// Package pki is robib's one cluster trust root: a private CA (CreateCA)
// that issues every site and client certificate (Issue), the identities
// those certificates carry (IdentityOf, PeerIdentity), and the TLS
// configurations every link uses (Load, then SiteServer, SiteClient,
// APIServer, NBDServer; ClientConfig for the CLI).
//
// An identity is a kind (site or client) and a name, bound in the
// certificate as its common name and as a URI SAN robib://KIND/NAME; the URI
// is what counts. Peers are checked against the cluster CA only (never the
// system roots), with TLS 1.3 at least.
//
// Files follow the GnuTLS/qemu/libnbd directory convention, so that
// `nbdinfo --tls-certificates=DIR` and qemu's `tls-creds-x509,dir=DIR` read
// an issued directory as it is: ca-cert.pem, and server-cert.pem +
// server-key.pem (a site) or client-cert.pem + client-key.pem (a client).
// Every file is written with mode 0600.
//
// It imports no robib package.
package pki

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"strings"
)

// Errors, wrapped with the file or peer concerned.
var (
	// ErrExists: CreateCA or Issue would overwrite a file (see Force).
	ErrExists = errors.New("file exists")
	// ErrInvalidRequest: a bad argument to CreateCA or Issue (name, kind,
	// address, lifetime, directory).
	ErrInvalidRequest = errors.New("invalid certificate request")
	// ErrCredentials: a CA, certificate, key or gossip key file is
	// missing, malformed, mismatched, not signed by the cluster CA, or not
	// valid now.
	ErrCredentials = errors.New("bad TLS credentials")
	// ErrNotIdentity: a certificate carries no (or no well-formed) robib
	// identity URI.
	ErrNotIdentity = errors.New("not a robib identity")
	// ErrPeerRefused: a TLS peer's certificate is valid but its identity
	// is not allowed on the link (wrong kind, wrong name).
	ErrPeerRefused = errors.New("TLS peer refused")
)

// Kind is what an identity is: a site of the cluster or a client of it.
type Kind string

// Kinds of identity.
const (
	// KindSite: a robib agent. Its certificate serves (Raft, API, NBD)
	// and dials the other sites with the same certificate.
	KindSite Kind = "site"
	// KindClient: an NBD client (qemu, nbd-client, libnbd) or a CLI user.
	KindClient Kind = "client"
)

// Identity is who a certificate belongs to.
type Identity struct {
	Name string
	Kind Kind
}

// String is "KIND/NAME".
func (id Identity) String() string { return string(id.Kind) + "/" + id.Name }

// URI is the SAN that binds the identity: robib://KIND/NAME.
func (id Identity) URI() *url.URL {
	return &url.URL{Scheme: uriScheme, Host: string(id.Kind), Path: "/" + id.Name}
}

const uriScheme = "robib"

// File names in a CA directory and in an issued directory.
const (
	CACertFile     = "ca-cert.pem"
	CAKeyFile      = "ca-key.pem"
	GossipKeyFile  = "gossip.key"
	ServerCertFile = "server-cert.pem"
	ServerKeyFile  = "server-key.pem"
	ClientCertFile = "client-cert.pem"
	ClientKeyFile  = "client-key.pem"
)

// nameRule is the site-name rule of the agent's --name (cmd/internal/config
// uses ValidName): 1-63 letters, digits, '.', '_' or '-', starting with a
// letter or digit.
var nameRule = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// ValidName reports whether name is a valid site or client name.
func ValidName(name string) bool { return nameRule.MatchString(name) }

func validKind(k Kind) bool { return k == KindSite || k == KindClient }

// IdentityOf reads the robib identity of cert: its one robib:// URI SAN.
// A certificate without one is not a robib identity. It does not check the
// signature or validity (the TLS handshake or Load does).
func IdentityOf(cert *x509.Certificate) (Identity, error) {
	if cert == nil {
		return Identity{}, fmt.Errorf("%w: no certificate", ErrNotIdentity)
	}
	var found []Identity
	for _, u := range cert.URIs {
		if u.Scheme != uriScheme {
			continue
		}
		id, err := parseURI(u)
		if err != nil {
			return Identity{}, fmt.Errorf("%w: certificate %q: %v", ErrNotIdentity, cert.Subject.CommonName, err)
		}
		found = append(found, id)
	}
	switch len(found) {
	case 0:
		return Identity{}, fmt.Errorf("%w: certificate %q has no %s:// URI", ErrNotIdentity, cert.Subject.CommonName, uriScheme)
	case 1:
		return found[0], nil
	default:
		return Identity{}, fmt.Errorf("%w: certificate %q has %d %s:// URIs, want one", ErrNotIdentity, cert.Subject.CommonName, len(found), uriScheme)
	}
}

func parseURI(u *url.URL) (Identity, error) {
	if u.Opaque != "" || u.User != nil || u.RawQuery != "" || u.Fragment != "" || u.Port() != "" {
		return Identity{}, fmt.Errorf("URI %q: want %s://KIND/NAME", u, uriScheme)
	}
	id := Identity{Kind: Kind(u.Host), Name: strings.TrimPrefix(u.Path, "/")}
	if !validKind(id.Kind) {
		return Identity{}, fmt.Errorf("URI %q: kind %q, want %s or %s", u, u.Host, KindSite, KindClient)
	}
	if !ValidName(id.Name) {
		return Identity{}, fmt.Errorf("URI %q: bad name %q", u, id.Name)
	}
	return id, nil
}

// PeerIdentity is the identity of the peer of a TLS connection whose
// certificate was verified against the cluster CA (cs.VerifiedChains);
// false when the peer presented none, it was not verified, or it carries
// no robib identity.
func PeerIdentity(cs tls.ConnectionState) (Identity, bool) {
	if len(cs.VerifiedChains) == 0 || len(cs.VerifiedChains[0]) == 0 {
		return Identity{}, false
	}
	id, err := IdentityOf(cs.VerifiedChains[0][0])
	return id, err == nil
}
