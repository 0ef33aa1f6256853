// Package netx is the one place where robib opens listeners and dials peers.
// Every network link of the agent (NBD, admin API, Raft; gossip has its own
// encryption) goes through a Network, which adds TLS with mutual
// authentication here, once, without touching the packages that use the
// connections.
package netx

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"time"

	"github.com/robib/robib/cmd/internal/pki"
)

// Link names a kind of connection; TLS picks its configuration and peer
// checks per link.
type Link string

// Links of the agent.
const (
	LinkNBD  Link = "nbd"
	LinkAPI  Link = "api"
	LinkRaft Link = "raft"
)

// Network opens listeners and dials connections for the agent. The zero value
// is plain TCP. It holds no global state; the agent builds one and passes it
// down.
//
// With Creds, the site links are TLS 1.3 with mutual authentication
// against the cluster CA: Listen(LinkRaft) accepts only sites
// (pki.SiteServer), Listen(LinkAPI) verifies a client certificate if one is
// given (pki.APIServer: the HTTP layer decides what an anonymous or a
// client identity may do), and DialContext(LinkRaft or LinkAPI) presents
// this site's certificate and accepts only a site whose certificate lists
// the host dialed (and, if ExpectName names one, is that site). LinkNBD
// stays plain TCP: NBD negotiates TLS inside its handshake (STARTTLS),
// with the configuration NBDTLS gives.
type Network struct {
	// DialTimeout bounds each Dial; zero means 10 seconds.
	DialTimeout time.Duration
	// LinkDelay, a testing and benchmark knob, emulates a WAN between
	// sites: every site-to-site connection this Network dials (LinkRaft,
	// LinkAPI) delays data by LinkDelay in each direction (see DelayConn),
	// and connecting takes a round trip. Only the dialing side delays, and
	// every inter-site exchange has a dialing side (the Raft leader dials
	// its followers; followers dial the leader's API to forward), so each
	// round trip between sites costs 2×LinkDelay. NBD clients and gossip
	// are not delayed. Zero (the default) adds nothing; at most
	// MaxLinkDelay.
	LinkDelay time.Duration

	// Creds, if set, turns on TLS (see above); nil is plaintext, every link
	// unauthenticated (--insecure).
	Creds *pki.Credentials
	// ExpectName, if set, names the site expected at addr for a dial on
	// link ("" = any site of the cluster). A nil ExpectName accepts any
	// site.
	ExpectName func(link Link, addr string) string
}

// secured reports whether link is TLS at the TCP level (with Creds).
func secured(link Link) bool {
	return link == LinkRaft || link == LinkAPI
}

// delayed reports whether connections dialed for link are delayed.
func delayed(link Link) bool {
	return link == LinkRaft || link == LinkAPI
}

// Listen opens a TCP listener for link on addr. With Creds, LinkRaft and
// LinkAPI listeners hand out *tls.Conn (the handshake runs on the first
// Read or Write, or an explicit Handshake).
func (n *Network) Listen(link Link, addr string) (net.Listener, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("%s listener on %s: %w", link, addr, err)
	}
	if n.Creds != nil {
		switch link {
		case LinkRaft:
			l = tls.NewListener(l, n.Creds.SiteServer())
		case LinkAPI:
			l = tls.NewListener(l, n.Creds.APIServer())
		}
	}
	return l, nil
}

// DialContext connects to addr for link. With Creds, a LinkRaft or LinkAPI
// connection is TLS, its handshake completed (within the dial timeout,
// over the link delay) with a site of the cluster: a *tls.Conn for
// LinkAPI, one whose Writes are each one system call for LinkRaft
// (corkedTLS).
func (n *Network) DialContext(ctx context.Context, link Link, addr string) (net.Conn, error) {
	timeout := n.DialTimeout
	if timeout == 0 {
		timeout = 10 * time.Second
	}
	d := net.Dialer{Timeout: timeout}
	var delay time.Duration
	if delayed(link) {
		delay = min(n.LinkDelay, MaxLinkDelay)
	}
	c, err := dialDelayed(ctx, delay, func(ctx context.Context) (net.Conn, error) {
		return d.DialContext(ctx, "tcp", addr)
	})
	if err != nil {
		return nil, fmt.Errorf("%s dial %s: %w", link, addr, err)
	}
	if n.Creds == nil || !secured(link) {
		return c, nil
	}
	var raw *corkConn
	if link == LinkRaft {
		// Raft frames are large: one write per Write, not per record
		// (cork.go). The API link stays a plain *tls.Conn, which
		// net/http recognises.
		raw = &corkConn{Conn: c}
		c = raw
	}
	tc, err := n.handshake(ctx, c, link, addr, timeout)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("%s dial %s: TLS: %w", link, addr, err)
	}
	if raw != nil {
		return &corkedTLS{Conn: tc, raw: raw}, nil
	}
	return tc, nil
}

// handshake runs the client side of TLS on c, bounded by ctx and timeout.
func (n *Network) handshake(ctx context.Context, c net.Conn, link Link, addr string, timeout time.Duration) (*tls.Conn, error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	var expect string
	if n.ExpectName != nil {
		expect = n.ExpectName(link, addr)
	}
	cfg := n.Creds.SiteClient(expect)
	cfg.ServerName = host
	tc := tls.Client(c, cfg)
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if err := tc.HandshakeContext(ctx); err != nil {
		return nil, err
	}
	return tc, nil
}

// NBDTLS is the TLS configuration of NBD's STARTTLS (pki.NBDServer): with
// verifyPeer, clients must present a client certificate of the cluster
// CA. Nil without Creds.
func (n *Network) NBDTLS(verifyPeer bool) *tls.Config {
	if n.Creds == nil {
		return nil
	}
	return n.Creds.NBDServer(verifyPeer)
}

// PeerIdentity is the verified identity of the peer of a TLS connection (a
// *tls.Conn or anything with its ConnectionState) after its handshake;
// false for a plain connection, before the handshake, or when the peer
// presented no certificate.
func PeerIdentity(c net.Conn) (pki.Identity, bool) {
	tc, ok := c.(interface{ ConnectionState() tls.ConnectionState })
	if !ok {
		return pki.Identity{}, false
	}
	return pki.PeerIdentity(tc.ConnectionState())
}
