// Package netx is the one place where robib opens listeners and dials peers.
// Every network link of the agent (NBD, admin API, Raft; gossip later) goes
// through a Network, so that TLS/mTLS can be added here, once, without
// touching the packages that use the connections.
package netx

import (
	"context"
	"fmt"
	"net"
	"time"
)

// Link names a kind of connection; a later TLS layer picks certificates and
// peer checks per link.
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
}

// delayed reports whether connections dialed for link are delayed.
func delayed(link Link) bool {
	return link == LinkRaft || link == LinkAPI
}

// Listen opens a TCP listener for link on addr.
func (n *Network) Listen(link Link, addr string) (net.Listener, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("%s listener on %s: %w", link, addr, err)
	}
	return l, nil
}

// DialContext connects to addr for link.
func (n *Network) DialContext(ctx context.Context, link Link, addr string) (net.Conn, error) {
	d := net.Dialer{Timeout: n.DialTimeout}
	if d.Timeout == 0 {
		d.Timeout = 10 * time.Second
	}
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
	return c, nil
}
