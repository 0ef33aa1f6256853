package nbdfront

// The option phase (fixed newstyle negotiation). One goroutine, the
// connection handler, runs it; nothing here is shared.

import (
	"bufio"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/bits"
	"net"
)

const (
	// maxOptionData is the largest option payload read into memory. The
	// largest legitimate payloads (GO with a 4096-byte name, a few meta
	// context queries) are far smaller.
	maxOptionData = 64 << 10
	// maxOptionDiscard is the largest option payload skipped (and refused)
	// rather than treated as a denial of service with a hard disconnect.
	maxOptionDiscard = 1 << 20
	// metaIDAllocation is the metadata context ID of base:allocation.
	metaIDAllocation uint32 = 1
)

// errAbort ends the session after NBD_OPT_ABORT was acknowledged.
var errAbort = errors.New("nbd: client sent NBD_OPT_ABORT")

// session is what the handshake hands to the transmission phase.
type session struct {
	exp        Export
	name       string     // export name as the client gave it
	info       ExportInfo // normalized
	flags      uint16     // transmission flags sent to the client
	structured bool       // NBD_OPT_STRUCTURED_REPLY acknowledged
	metaID     uint32     // base:allocation context ID, 0 if not negotiated
	tls        *tls.Conn  // the TLS layer over the connection, nil in plaintext
}

// handshake is the state of one connection's option phase.
type handshake struct {
	s   *Server
	sc  *serverConn // for isClosing; nil in unit tests
	log *slog.Logger
	// conn and br are the transport. A TLS upgrade (NBD_OPT_STARTTLS)
	// puts tls in conn, makes br read from it, and resets the negotiated
	// state below (structured, metaSet, metaExport).
	conn net.Conn
	br   *bufio.Reader
	tls  *tls.Conn // nil until NBD_OPT_STARTTLS succeeded
	peer Peer      // for Authorize; peer.TLS is set with tls

	fixed      bool   // client set NBD_FLAG_C_FIXED_NEWSTYLE
	noZeroes   bool   // client set NBD_FLAG_C_NO_ZEROES
	structured bool   // structured replies negotiated
	metaSet    bool   // NBD_OPT_SET_META_CONTEXT selected base:allocation ...
	metaExport string // ... for this export name

	out  []byte // reply scratch
	data []byte // option data scratch, at most maxOptionData
}

// run performs the handshake. It returns the session on entering the
// transmission phase; on error the connection must be closed.
func (h *handshake) run() (*session, error) {
	b := binary.BigEndian.AppendUint64(h.out[:0], magicNBD)
	b = binary.BigEndian.AppendUint64(b, magicOption)
	b = binary.BigEndian.AppendUint16(b, hsFlagFixedNewstyle|hsFlagNoZeroes)
	if err := h.write(b); err != nil {
		return nil, err
	}

	var cf [4]byte
	if _, err := io.ReadFull(h.br, cf[:]); err != nil {
		return nil, fmt.Errorf("read client flags: %w", err)
	}
	clientFlags := binary.BigEndian.Uint32(cf[:])
	if clientFlags&^clientFlagsKnown != 0 {
		return nil, fmt.Errorf("unknown client flags %#x", clientFlags)
	}
	// Clients without NBD_FLAG_C_FIXED_NEWSTYLE are served the same way
	// (the spec allows it); they only ever send NBD_OPT_EXPORT_NAME. TLS
	// is not offered to them (the spec keeps them in NOTLS mode).
	h.fixed = clientFlags&clientFlagFixedNewstyle != 0
	h.noZeroes = clientFlags&clientFlagNoZeroes != 0

	var hdr [optionHeaderLen]byte
	for {
		if _, err := io.ReadFull(h.br, hdr[:]); err != nil {
			return nil, fmt.Errorf("read option header: %w", err)
		}
		oh, err := parseOptionHeader(hdr[:])
		if err != nil {
			return nil, err
		}
		sess, err := h.option(oh)
		if err != nil || sess != nil {
			return sess, err
		}
	}
}

// option handles one option. It returns a session when the transmission
// phase begins, or an error that ends the connection.
func (h *handshake) option(oh optionHeader) (*session, error) {
	if h.tlsRequired() && oh.Option != optStartTLS && oh.Option != optAbort {
		return nil, h.refuseBeforeTLS(oh)
	}
	if oh.Length > maxOptionData {
		return nil, h.oversized(oh)
	}
	h.data = append(h.data[:0], make([]byte, oh.Length)...)
	if _, err := io.ReadFull(h.br, h.data); err != nil {
		return nil, fmt.Errorf("read option %d data: %w", oh.Option, err)
	}
	data := h.data

	switch oh.Option {
	case optExportName:
		return h.exportName(data)
	case optAbort:
		// Any data is ignored, as the spec recommends.
		if err := h.reply(oh.Option, repAck, nil); err != nil {
			return nil, err
		}
		return nil, errAbort
	case optList:
		if len(data) != 0 {
			return nil, h.replyErr(oh.Option, repErrInvalid, "NBD_OPT_LIST takes no data")
		}
		return nil, h.list()
	case optStartTLS:
		if len(data) != 0 {
			return nil, h.replyErr(oh.Option, repErrInvalid, "NBD_OPT_STARTTLS takes no data")
		}
		return nil, h.startTLS()
	case optInfo, optGo:
		return h.infoGo(oh.Option, data)
	case optStructuredReply:
		if len(data) != 0 {
			return nil, h.replyErr(oh.Option, repErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
		}
		h.structured = true
		return nil, h.reply(oh.Option, repAck, nil)
	case optListMetaContext, optSetMetaContext:
		return nil, h.metaContext(oh.Option, data)
	default:
		// Includes NBD_OPT_EXTENDED_HEADERS and NBD_OPT_PEEK_EXPORT.
		return nil, h.replyErr(oh.Option, repErrUnsup, fmt.Sprintf("option %d is not supported", oh.Option))
	}
}

// oversized handles an option whose data exceeds maxOptionData: skip it
// if it is not absurd, refuse it, and carry on; otherwise disconnect.
func (h *handshake) oversized(oh optionHeader) error {
	if oh.Option == optExportName {
		// Its name would exceed maxStringLen and this option cannot
		// return an error, so the session must end.
		return fmt.Errorf("NBD_OPT_EXPORT_NAME with %d bytes of data", oh.Length)
	}
	if oh.Length > maxOptionDiscard {
		return fmt.Errorf("option %d with %d bytes of data", oh.Option, oh.Length)
	}
	if _, err := io.CopyN(io.Discard, h.br, int64(oh.Length)); err != nil {
		return fmt.Errorf("skip option %d data: %w", oh.Option, err)
	}
	switch oh.Option {
	case optAbort:
		if err := h.reply(oh.Option, repAck, nil); err != nil {
			return err
		}
		return errAbort
	case optStartTLS:
		return h.replyErr(oh.Option, repErrInvalid, "NBD_OPT_STARTTLS takes no data")
	case optList, optInfo, optGo, optStructuredReply, optListMetaContext, optSetMetaContext:
		return h.replyErr(oh.Option, repErrTooBig, "option data too large")
	default:
		return h.replyErr(oh.Option, repErrUnsup, fmt.Sprintf("option %d is not supported", oh.Option))
	}
}

// exportName handles NBD_OPT_EXPORT_NAME. It cannot report errors, so any
// failure ends the session.
func (h *handshake) exportName(data []byte) (*session, error) {
	if len(data) > maxStringLen {
		return nil, fmt.Errorf("NBD_OPT_EXPORT_NAME name of %d bytes", len(data))
	}
	name := string(data)
	if err := h.authorize(name, OpOpen); err != nil {
		return nil, fmt.Errorf("NBD_OPT_EXPORT_NAME %q: %w", name, err)
	}
	sess, err := h.open(name)
	if err != nil {
		return nil, fmt.Errorf("NBD_OPT_EXPORT_NAME %q: %w", name, err)
	}
	b := binary.BigEndian.AppendUint64(h.out[:0], uint64(sess.info.Size))
	b = binary.BigEndian.AppendUint16(b, sess.flags)
	if !h.noZeroes {
		b = append(b, make([]byte, exportNamePadding)...)
	}
	h.out = b
	if err := h.write(b); err != nil {
		closeExport(sess.exp, h.log)
		return nil, err
	}
	return sess, nil
}

// open opens and describes an export for the transmission phase.
func (h *handshake) open(name string) (*session, error) {
	var exp Export
	if err := safeCall(func() (err error) {
		exp, err = h.s.cfg.Backend.Open(name)
		return err
	}); err != nil {
		return nil, err
	}
	if exp == nil {
		return nil, fmt.Errorf("backend returned no export: %w", ErrUnknownExport)
	}
	var info ExportInfo
	err := safeCall(func() error {
		info = exp.Info()
		return nil
	})
	if err == nil {
		info, err = normalizeInfo(info, h.s.cfg.MaxPayload)
	}
	if err != nil {
		closeExport(exp, h.log)
		return nil, err
	}
	sess := &session{
		exp:        exp,
		name:       name,
		info:       info,
		flags:      transmissionFlags(info, h.structured),
		structured: h.structured,
		tls:        h.tls,
	}
	if h.structured && h.metaSet && h.metaExport == name && info.CanBlockStatus {
		sess.metaID = metaIDAllocation
	}
	return sess, nil
}

// list handles NBD_OPT_LIST.
func (h *handshake) list() error {
	if err := h.authorize("", OpList); err != nil {
		return h.denied(optList, err)
	}
	var exports []ExportInfo
	if err := safeCall(func() (err error) {
		exports, err = h.s.cfg.Backend.List()
		return err
	}); err != nil {
		return h.backendErr(optList, err)
	}
	for _, e := range exports {
		name := sanitizeString(e.Name, maxStringLen)
		desc := sanitizeString(e.Description, maxStringLen)
		b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
		b = append(b, name...)
		b = append(b, desc...)
		if err := h.reply(optList, repServer, b); err != nil {
			return err
		}
	}
	return h.reply(optList, repAck, nil)
}

// infoGo handles NBD_OPT_INFO and NBD_OPT_GO. For GO it returns the
// session after acknowledging.
func (h *handshake) infoGo(opt uint32, data []byte) (*session, error) {
	req, err := parseInfoRequest(data)
	if err != nil {
		return nil, h.replyErr(opt, repErrInvalid, err.Error())
	}
	op := OpInfo
	if opt == optGo {
		op = OpOpen
	}
	if err := h.authorize(req.Name, op); err != nil {
		return nil, h.denied(opt, err)
	}
	var (
		sess *session
		info ExportInfo
	)
	if opt == optGo {
		sess, err = h.open(req.Name)
		if sess != nil {
			info = sess.info
		}
	} else {
		err = safeCall(func() (err error) {
			info, err = h.s.cfg.Backend.Info(req.Name)
			return err
		})
		if err == nil {
			info, err = normalizeInfo(info, h.s.cfg.MaxPayload)
		}
	}
	if err != nil {
		return nil, h.backendErr(opt, err)
	}
	if err := h.sendInfo(opt, req, info); err != nil {
		if sess != nil {
			closeExport(sess.exp, h.log)
		}
		return nil, err
	}
	return sess, nil
}

// sendInfo sends the NBD_REP_INFO replies and the final NBD_REP_ACK.
// NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE are always sent (the spec allows
// unrequested information, and this keeps INFO and GO answers identical);
// NBD_INFO_NAME and NBD_INFO_DESCRIPTION only when requested and known.
func (h *handshake) sendInfo(opt uint32, req infoRequest, info ExportInfo) error {
	b := binary.BigEndian.AppendUint16(nil, infoExport)
	b = binary.BigEndian.AppendUint64(b, uint64(info.Size))
	b = binary.BigEndian.AppendUint16(b, transmissionFlags(info, h.structured))
	if err := h.reply(opt, repInfo, b); err != nil {
		return err
	}
	b = binary.BigEndian.AppendUint16(b[:0], infoBlockSize)
	b = binary.BigEndian.AppendUint32(b, info.MinBlock)
	b = binary.BigEndian.AppendUint32(b, info.PrefBlock)
	b = binary.BigEndian.AppendUint32(b, info.MaxBlock)
	if err := h.reply(opt, repInfo, b); err != nil {
		return err
	}
	sent := map[uint16]bool{}
	for _, it := range req.Infos {
		if sent[it] {
			continue
		}
		sent[it] = true
		var s string
		switch it {
		case infoName:
			s = info.Name
		case infoDescription:
			s = info.Description
		default:
			continue // EXPORT and BLOCK_SIZE were sent; unknown ones are ignored
		}
		if s == "" {
			continue
		}
		b = binary.BigEndian.AppendUint16(b[:0], it)
		b = append(b, sanitizeString(s, maxStringLen)...)
		if err := h.reply(opt, repInfo, b); err != nil {
			return err
		}
	}
	return h.reply(opt, repAck, nil)
}

// metaContext handles NBD_OPT_LIST_META_CONTEXT and
// NBD_OPT_SET_META_CONTEXT. Only base:allocation exists.
func (h *handshake) metaContext(opt uint32, data []byte) error {
	if opt == optSetMetaContext {
		// A SET replaces the selection even when it fails.
		h.metaSet, h.metaExport = false, ""
		if !h.structured {
			return h.replyErr(opt, repErrInvalid, "NBD_OPT_SET_META_CONTEXT requires structured replies")
		}
	}
	req, err := parseMetaRequest(data)
	if err != nil {
		return h.replyErr(opt, repErrInvalid, err.Error())
	}
	if err := h.authorize(req.Name, OpInfo); err != nil {
		return h.denied(opt, err)
	}
	var info ExportInfo
	if err := safeCall(func() (err error) {
		info, err = h.s.cfg.Backend.Info(req.Name)
		return err
	}); err != nil {
		return h.backendErr(opt, err)
	}
	selected := false
	if info.CanBlockStatus {
		if opt == optListMetaContext && len(req.Queries) == 0 {
			selected = true
		}
		for _, q := range req.Queries {
			if q == metaBaseAllocation || (opt == optListMetaContext && q == metaBaseNamespace) {
				selected = true
			}
		}
	}
	if selected {
		var id uint32 // LIST replies carry ID 0
		if opt == optSetMetaContext {
			id = metaIDAllocation
			h.metaSet, h.metaExport = true, req.Name
		}
		b := binary.BigEndian.AppendUint32(nil, id)
		b = append(b, metaBaseAllocation...)
		if err := h.reply(opt, repMetaContext, b); err != nil {
			return err
		}
	}
	return h.reply(opt, repAck, nil)
}

// backendErr answers an option with the error reply matching a Backend
// error, carrying its text for the user.
func (h *handshake) backendErr(opt uint32, err error) error {
	typ := optionErrorReply(err)
	switch {
	case errors.Is(err, errPanic):
		h.log.Error("nbd backend panicked", "option", opt, "err", err)
	case typ != repErrUnknown || errors.Is(err, ErrUnknownExport):
		h.log.Debug("nbd option refused", "option", opt, "reply", typ, "err", err)
	default:
		h.log.Warn("nbd option failed", "option", opt, "err", err)
	}
	return h.replyErr(opt, typ, err.Error())
}

// replyErr sends an error reply with a human-readable message.
func (h *handshake) replyErr(opt, typ uint32, msg string) error {
	return h.reply(opt, typ, []byte(sanitizeString(msg, maxStringLen)))
}

// reply sends one option reply.
func (h *handshake) reply(opt, typ uint32, data []byte) error {
	b := appendOptionReply(h.out[:0], opt, typ, len(data))
	b = append(b, data...)
	h.out = b
	return h.write(b)
}

func (h *handshake) write(b []byte) error {
	if _, err := h.conn.Write(b); err != nil {
		return fmt.Errorf("write handshake: %w", err)
	}
	return nil
}

// transmissionFlags computes the transmission flags for an export.
// Write-type features are not advertised on read-only exports.
func transmissionFlags(info ExportInfo, structured bool) uint16 {
	f := tFlagHasFlags | tFlagSendFlush | tFlagSendFUA | tFlagSendCache
	if info.ReadOnly {
		f |= tFlagReadOnly
	} else {
		if info.CanTrim {
			f |= tFlagSendTrim
		}
		if info.CanZero {
			f |= tFlagSendWriteZeroes
			if info.CanFastZero {
				f |= tFlagSendFastZero
			}
		}
	}
	if info.MultiConn {
		f |= tFlagCanMultiConn
	}
	if structured {
		f |= tFlagSendDF
	}
	return f
}

// normalizeInfo applies block size defaults and validates an ExportInfo.
// Its errors describe a misconfigured export (reported to the client as
// NBD_REP_ERR_UNKNOWN with the text).
func normalizeInfo(info ExportInfo, maxPayload uint32) (ExportInfo, error) {
	if info.Size < 0 {
		return info, fmt.Errorf("export %q has negative size %d", info.Name, info.Size)
	}
	if info.MinBlock == 0 {
		info.MinBlock = 1
	}
	if info.PrefBlock == 0 {
		info.PrefBlock = max(4096, info.MinBlock)
	}
	if info.MaxBlock == 0 || info.MaxBlock > maxPayload {
		info.MaxBlock = maxPayload
	}
	switch {
	case bits.OnesCount32(info.MinBlock) != 1 || info.MinBlock > 64<<10:
		return info, fmt.Errorf("export %q: minimum block size %d is not a power of two ≤ 64 KiB", info.Name, info.MinBlock)
	case bits.OnesCount32(info.PrefBlock) != 1 || info.PrefBlock < max(info.MinBlock, 512):
		return info, fmt.Errorf("export %q: preferred block size %d is not a power of two ≥ max(%d, 512)", info.Name, info.PrefBlock, info.MinBlock)
	case info.MaxBlock < info.PrefBlock:
		return info, fmt.Errorf("export %q: maximum block size %d below preferred %d", info.Name, info.MaxBlock, info.PrefBlock)
	}
	if !info.CanZero {
		info.CanFastZero = false
	}
	return info, nil
}
