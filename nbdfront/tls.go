package nbdfront

// TLS (NBD_OPT_STARTTLS) and the authorization hook. Both run in the
// option phase, on the connection handler's goroutine.

import (
	"bufio"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
)

// TLSMode says whether a Server offers TLS. The modes are the spec's
// NOTLS, SELECTIVETLS without TLS-only exports, and FORCEDTLS.
type TLSMode uint8

const (
	// TLSOff offers no TLS: NBD_OPT_STARTTLS gets NBD_REP_ERR_UNSUP.
	TLSOff TLSMode = iota
	// TLSOn offers TLS: a client may send NBD_OPT_STARTTLS (as its first
	// option, if it wants every option protected) or stay in plaintext;
	// both are served the same way.
	TLSOn
	// TLSRequire requires TLS: before NBD_OPT_STARTTLS succeeded, every
	// option but NBD_OPT_STARTTLS and NBD_OPT_ABORT is refused with
	// NBD_REP_ERR_TLS_REQD, and NBD_OPT_EXPORT_NAME closes the connection.
	TLSRequire
)

func (m TLSMode) String() string {
	switch m {
	case TLSOff:
		return "off"
	case TLSOn:
		return "on"
	case TLSRequire:
		return "require"
	default:
		return fmt.Sprintf("TLSMode(%d)", uint8(m))
	}
}

// Peer is who is on the other end of a connection, as Authorize sees it.
type Peer struct {
	Addr net.Addr // remote address
	// TLS is the connection's TLS state once NBD_OPT_STARTTLS succeeded
	// (PeerCertificates holds a client certificate if one was sent and
	// the TLS config accepted it), nil in plaintext. Do not modify it.
	TLS *tls.ConnectionState
}

// Op is what Authorize is asked about.
type Op uint8

const (
	OpList Op = iota + 1 // NBD_OPT_LIST (the export name is "")
	OpInfo               // NBD_OPT_INFO, NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT
	OpOpen               // NBD_OPT_GO, NBD_OPT_EXPORT_NAME
)

func (o Op) String() string {
	switch o {
	case OpList:
		return "list"
	case OpInfo:
		return "info"
	case OpOpen:
		return "open"
	default:
		return fmt.Sprintf("Op(%d)", uint8(o))
	}
}

// validateTLS checks Config.TLSMode against Config.TLS.
func validateTLS(mode TLSMode, cfg *tls.Config) error {
	switch mode {
	case TLSOff:
		return nil
	case TLSOn, TLSRequire:
	default:
		return fmt.Errorf("nbdfront: unknown TLSMode %d", uint8(mode))
	}
	switch {
	case cfg == nil:
		return fmt.Errorf("nbdfront: TLSMode %v needs Config.TLS", mode)
	case len(cfg.Certificates) == 0 && cfg.GetCertificate == nil && cfg.GetConfigForClient == nil:
		return errors.New("nbdfront: Config.TLS has no server certificate")
	case cfg.MaxVersion != 0 && cfg.MaxVersion < tls.VersionTLS12:
		// The spec makes TLS 1.2 mandatory.
		return fmt.Errorf("nbdfront: Config.TLS.MaxVersion %#x is below TLS 1.2", cfg.MaxVersion)
	}
	return nil
}

// loggedError marks a handshake error that was logged where it happened;
// ServeConn does not log it again.
type loggedError struct{ err error }

func (e *loggedError) Error() string { return e.err.Error() }
func (e *loggedError) Unwrap() error { return e.err }

// tlsOffered reports whether NBD_OPT_STARTTLS can succeed on this server.
func (h *handshake) tlsOffered() bool {
	return h.s.cfg.TLSMode != TLSOff && h.s.cfg.TLS != nil
}

// tlsRequired reports whether options other than NBD_OPT_STARTTLS and
// NBD_OPT_ABORT must be refused because TLS is required and not active.
func (h *handshake) tlsRequired() bool {
	return h.s.cfg.TLSMode == TLSRequire && h.tls == nil
}

// startTLS handles NBD_OPT_STARTTLS (without data): it refuses, or
// acknowledges and upgrades the connection. A failed TLS handshake ends
// the session (the acknowledgement was sent; there is no way back).
func (h *handshake) startTLS() error {
	switch {
	case h.tls != nil:
		return h.replyErr(optStartTLS, repErrInvalid, "TLS is already active on this connection")
	case !h.tlsOffered():
		return h.replyErr(optStartTLS, repErrUnsup, "TLS is not supported by this server")
	case !h.fixed:
		// The spec keeps such clients in plaintext (NOTLS).
		return h.replyErr(optStartTLS, repErrPolicy, "TLS needs fixed newstyle negotiation")
	}
	if err := h.reply(optStartTLS, repAck, nil); err != nil {
		return err
	}
	// Bytes the client sent before it could have seen the ACK are
	// plaintext: they must never be taken for TLS or for options sent
	// under TLS.
	if n := h.br.Buffered(); n > 0 {
		return h.tlsFailed(fmt.Errorf("%d bytes sent after NBD_OPT_STARTTLS before its reply", n))
	}
	tc := tls.Server(&bufferedConn{Conn: h.conn, r: bufio.NewReaderSize(h.conn, readBufferSize)}, h.s.cfg.TLS)
	// The handshake deadline, set on the underlying connection, bounds
	// the TLS handshake too.
	if err := tc.Handshake(); err != nil {
		return h.tlsFailed(err)
	}
	st := tc.ConnectionState()
	h.tls, h.conn = tc, tc
	h.br.Reset(tc)
	h.peer.TLS = &st
	// The spec forbids keeping negotiation state across STARTTLS.
	h.structured, h.metaSet, h.metaExport = false, false, ""
	h.log.Debug("nbd TLS established", "version", tls.VersionName(st.Version),
		"cipher", tls.CipherSuiteName(st.CipherSuite), "client", clientName(&st))
	return nil
}

// bufferedConn is the connection under TLS, read through a buffer.
// crypto/tls reads the socket for about one record at a time, and clients
// send a request's header and its payload as records of their own, so
// without the buffer every request costs about two read system calls;
// with it one read takes in every record that has arrived.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// tlsFailed logs a failed TLS upgrade once and returns the error that ends
// the session.
func (h *handshake) tlsFailed(err error) error {
	if h.sc != nil && h.sc.isClosing() {
		h.log.Debug("nbd TLS handshake interrupted by shutdown", "reason", err)
	} else {
		h.log.Info("nbd TLS handshake failed", "reason", err)
	}
	return &loggedError{fmt.Errorf("TLS handshake: %w", err)}
}

// refuseBeforeTLS answers an option other than NBD_OPT_STARTTLS and
// NBD_OPT_ABORT while TLS is required and not active: the spec's
// FORCEDTLS mode. Unsupported options are included, and no NBD_REP_INFO
// is sent for NBD_OPT_INFO or NBD_OPT_GO. NBD_OPT_EXPORT_NAME cannot be
// refused, so it ends the session.
func (h *handshake) refuseBeforeTLS(oh optionHeader) error {
	if oh.Option == optExportName {
		return errors.New("NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS, and this server requires TLS")
	}
	if oh.Length > maxOptionDiscard {
		return fmt.Errorf("option %d with %d bytes of data", oh.Option, oh.Length)
	}
	if _, err := io.CopyN(io.Discard, h.br, int64(oh.Length)); err != nil {
		return fmt.Errorf("skip option %d data: %w", oh.Option, err)
	}
	if !h.fixed {
		// NBD_REP_ERR_TLS_REQD is not allowed in NOTLS mode, which is
		// what the spec prescribes for such clients.
		return h.replyErr(oh.Option, repErrPolicy, "this server requires TLS, which needs fixed newstyle negotiation")
	}
	return h.replyErr(oh.Option, repErrTLSReqd, "this server requires TLS: send NBD_OPT_STARTTLS first")
}

// authorize asks Config.Authorize whether the peer may do op on export,
// and logs a refusal. The caller answers a refusal with denied (or ends
// the session after NBD_OPT_EXPORT_NAME).
func (h *handshake) authorize(export string, op Op) error {
	f := h.s.cfg.Authorize
	if f == nil {
		return nil
	}
	err := safeCall(func() error { return f(h.peer, export, op) })
	if err == nil {
		return nil
	}
	attrs := []any{"op", op.String(), "export", export, "tls", h.peer.TLS != nil, "reason", err}
	if name := clientName(h.peer.TLS); name != "" {
		attrs = append(attrs, "client", name)
	}
	switch {
	case errors.Is(err, errPanic):
		h.log.Error("nbd authorize panicked", attrs...)
	case errors.Is(err, ErrDenied):
		h.log.Info("nbd access denied", attrs...)
	default:
		h.log.Warn("nbd authorization failed", attrs...)
	}
	return &loggedError{err}
}

// denied answers an option refused by authorize: the reply type of the
// error's row in optionErrors (ErrDenied: NBD_REP_ERR_POLICY). The error's
// text goes to the client only when it matched a row, i.e. the Authorize
// function chose a sentinel; anything else (or a panic) may carry internal
// detail and gets a generic text.
func (h *handshake) denied(opt uint32, err error) error {
	msg := "authorization failed"
	if optionErrors.lookup(err, 0) != 0 && !errors.Is(err, errPanic) {
		msg = err.Error()
	}
	return h.replyErr(opt, optionErrorReply(err), msg)
}

// clientName is the subject of the peer's TLS client certificate, or "".
func clientName(st *tls.ConnectionState) string {
	if st == nil || len(st.PeerCertificates) == 0 {
		return ""
	}
	return st.PeerCertificates[0].Subject.String()
}
