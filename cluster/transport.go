package cluster

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	"github.com/robib/robib/cluster/wire"
)

// Raft transports (Config.RaftTransport).
const (
	TransportWire    = "wire"    // cluster/wire: robib's framing, payloads never copied
	TransportMsgpack = "msgpack" // hashicorp/raft's NetworkTransport
)

// DefaultRaftTransport is the transport of a Config that names none.
const DefaultRaftTransport = TransportWire

// Both transports keep up to raftPool idle connections per peer and give
// up on an RPC after raftTimeout.
const (
	raftPool    = 4
	raftTimeout = 10 * time.Second
)

// newTransport builds the Raft transport cfg names over its listener and
// dialer.
func newTransport(cfg *Config, hlog hclog.Logger, log *slog.Logger) (guardedTransport, error) {
	switch cfg.RaftTransport {
	case "", TransportWire:
		return wire.New(wire.Config{
			Listener:  cfg.RaftListener,
			Dial:      cfg.Dial,
			Advertise: cfg.RaftAddr,
			Timeout:   raftTimeout,
			MaxPool:   raftPool,
			Logger:    log.With("component", "raft-wire"),
			PeerName:  cfg.RaftPeerName,
		})
	case TransportMsgpack:
		if cfg.RaftPeerName != nil {
			log.Warn("the msgpack raft transport cannot bind raft requests to the connection's site identity; use the wire transport for that")
		}
		return raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{
			Stream:  &streamLayer{Listener: cfg.RaftListener, dial: cfg.Dial, advertise: cfg.RaftAddr},
			MaxPool: raftPool,
			Timeout: raftTimeout,
			Logger:  hlog,
		}), nil
	default:
		return nil, fmt.Errorf("%w: raft transport %q (want %s or %s)", ErrInvalidRequest, cfg.RaftTransport, TransportWire, TransportMsgpack)
	}
}

// streamLayer adapts the caller's listener and dialer to Raft's transport.
type streamLayer struct {
	net.Listener
	dial      func(ctx context.Context, addr string) (net.Conn, error)
	advertise string
}

// Dial opens a Raft connection to address.
func (s *streamLayer) Dial(address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return s.dial(ctx, string(address))
}

// Addr is the advertised address, which may differ from the bound one
// (e.g. bound to 0.0.0.0).
func (s *streamLayer) Addr() net.Addr {
	if a, err := net.ResolveTCPAddr("tcp", s.advertise); err == nil {
		return a
	}
	return s.Listener.Addr()
}

// logWriter turns the line-oriented logs of raft (hclog) and memberlist
// (log.Logger) into structured slog records, keeping their level.
type logWriter struct {
	log       *slog.Logger
	component string
}

func (w *logWriter) Write(p []byte) (int, error) {
	line := strings.TrimSpace(string(p))
	lvl := slog.LevelInfo
	for prefix, l := range map[string]slog.Level{
		"[TRACE]": slog.LevelDebug - 4, "[DEBUG]": slog.LevelDebug, "[INFO]": slog.LevelInfo,
		"[WARN]": slog.LevelWarn, "[ERR]": slog.LevelError, "[ERROR]": slog.LevelError,
	} {
		if i := strings.Index(line, prefix); i >= 0 && i < 40 {
			lvl = l
			line = strings.TrimSpace(line[i+len(prefix):])
			break
		}
	}
	if lvl == slog.LevelError && strings.Contains(line, routineRaftError) {
		lvl = slog.LevelInfo
	}
	w.log.Log(context.Background(), lvl, line, "component", w.component)
	return len(p), nil
}

// routineRaftError is what raft logs as an error, once per follower, when a
// leader learns that a newer term began: the normal end of a leadership
// transfer (cluster transfer-leadership, leader placement) or of a leader
// that was cut off. It is logged at info.
const routineRaftError = "peer has newer term, stopping replication"

func newHCLogger(name string, log *slog.Logger) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{
		Name:        name,
		Level:       hclog.Info,
		Output:      &logWriter{log: log, component: name},
		DisableTime: true,
	})
}
