package dockerh

import (
	"bufio"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
)

// Socket is one TCP or UDP socket of a site's network namespace, as the
// kernel lists it in /proc/PID/net/{tcp,tcp6,udp,udp6}.
type Socket struct {
	Proto         string // tcp, tcp6, udp, udp6
	Local, Remote netip.AddrPort
	State         string // kernel state number in hex: 0A is LISTEN, 01 ESTABLISHED, 07 an unconnected UDP socket
}

func (s Socket) String() string {
	return fmt.Sprintf("%s %s -> %s (state %s)", s.Proto, s.Local, s.Remote, s.State)
}

// ErrNoProc means the site's sockets cannot be read: its process is not
// visible in this host's /proc (Docker runs elsewhere, or no permission).
var ErrNoProc = errors.New("container process not visible in /proc")

// Sockets lists the TCP and UDP sockets in the site's network namespace.
// It reads /proc/PID/net of the container's main process, so it needs
// the Docker daemon on this host and enough privilege; otherwise the
// error wraps ErrNoProc.
func (c *Cluster) Sockets(name string) ([]Socket, error) {
	out, err := docker(dockerTimeout, "container", "inspect", "--format", "{{.State.Pid}}", c.Site(name).Container)
	if err != nil {
		return nil, err
	}
	pid, err := strconv.Atoi(out)
	if err != nil || pid <= 0 {
		return nil, fmt.Errorf("site %s: no running process (pid %q)", name, out)
	}
	var all []Socket
	for _, proto := range []string{"tcp", "tcp6", "udp", "udp6"} {
		f, err := os.Open(fmt.Sprintf("/proc/%d/net/%s", pid, proto))
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrNoProc, err)
		}
		socks, err := parseProcNet(proto, f)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("/proc/%d/net/%s: %v", pid, proto, err)
		}
		all = append(all, socks...)
	}
	return all, nil
}

// ClientNetSockets returns the site's sockets that could carry traffic
// other than NBD over the client network: any socket with an address in
// the client subnet, and any wildcard listener, except those on the NBD
// port. With the addresses the harness gives the agent this is empty;
// anything listed means Raft, gossip or API traffic could (or did) cross
// the client network.
func (c *Cluster) ClientNetSockets(name string) ([]Socket, error) {
	socks, err := c.Sockets(name)
	if err != nil {
		return nil, err
	}
	client, err := netip.ParsePrefix(c.ClientSubnet)
	if err != nil {
		return nil, err
	}
	var bad []Socket
	for _, s := range socks {
		if s.Local.Port() == NBDPort {
			continue
		}
		l, r := s.Local.Addr().Unmap(), s.Remote.Addr().Unmap()
		if client.Contains(l) || client.Contains(r) || l.IsUnspecified() {
			bad = append(bad, s)
		}
	}
	return bad, nil
}

func parseProcNet(proto string, f *os.File) ([]Socket, error) {
	var out []Socket
	sc := bufio.NewScanner(f)
	first := true
	for sc.Scan() {
		if first {
			first = false
			continue
		}
		fs := strings.Fields(sc.Text())
		if len(fs) < 4 {
			continue
		}
		l, err := parseHexAddrPort(fs[1])
		if err != nil {
			return nil, err
		}
		r, err := parseHexAddrPort(fs[2])
		if err != nil {
			return nil, err
		}
		out = append(out, Socket{Proto: proto, Local: l, Remote: r, State: fs[3]})
	}
	return out, sc.Err()
}

// parseHexAddrPort decodes the kernel's "ADDR:PORT" hex form: the address
// as 32-bit words in host byte order, the port big
// endian.
func parseHexAddrPort(s string) (netip.AddrPort, error) {
	a, p, ok := strings.Cut(s, ":")
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("bad address %q", s)
	}
	port, err := strconv.ParseUint(p, 16, 16)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("bad port in %q", s)
	}
	raw, err := hex.DecodeString(a)
	if err != nil || (len(raw) != 4 && len(raw) != 16) {
		return netip.AddrPort{}, fmt.Errorf("bad address %q", s)
	}
	b := make([]byte, len(raw))
	for i := 0; i < len(raw); i += 4 {
		binary.BigEndian.PutUint32(b[i:], binary.NativeEndian.Uint32(raw[i:]))
	}
	addr, _ := netip.AddrFromSlice(b)
	return netip.AddrPortFrom(addr, uint16(port)), nil
}
