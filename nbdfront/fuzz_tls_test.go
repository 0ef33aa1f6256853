package nbdfront

import (
	"bufio"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"testing"
	"time"
)

// FuzzHandshakeRequireTLS feeds arbitrary client bytes to a server that
// requires TLS. Before a STARTTLS is acknowledged the server must answer
// every option but ABORT and STARTTLS with NBD_REP_ERR_TLS_REQD (with a
// message; NBD_REP_ERR_POLICY for a client without fixed newstyle), never
// give any information, and never open an export. Bytes after an
// acknowledged STARTTLS go to the TLS handshake.
func FuzzHandshakeRequireTLS(f *testing.F) {
	pki := newTestPKI(f, "fuzz CA")
	srv, be := newFuzzServerWith(f, func(c *Config) { c.TLS, c.TLSMode = pki.serverConfig(), TLSRequire })
	f.Add([]byte{})
	f.Add(clientFlagsBytes)
	f.Add(cat(clientFlagsBytes, optBytes(optList, nil), optBytes(optAbort, nil)))
	f.Add(cat(clientFlagsBytes, optBytes(optExportName, []byte("disk")), reqBytes(0, cmdRead, 1, 0, 512, nil)))
	f.Add(cat([]byte{0, 0, 0, 0}, optBytes(optList, nil), optBytes(optStartTLS, nil), optBytes(optExportName, []byte("ro"))))
	f.Add(cat(clientFlagsBytes, optBytes(optInfo, goData("disk", infoName)), optBytes(optGo, goData("disk")),
		optBytes(optStructuredReply, nil), optBytes(optSetMetaContext, metaData("disk", metaBaseAllocation)),
		optBytes(optListMetaContext, metaData("disk")), optBytes(99, []byte("junk")), optBytes(optGo, goData(""))))
	f.Add(cat(clientFlagsBytes, optBytes(optStartTLS, []byte("data")), optBytes(optStartTLS, nil),
		[]byte("\x16\x03\x01\x00\x05hello")))
	f.Add(cat(clientFlagsBytes, optBytes(optStartTLS, nil), optBytes(optList, nil)))
	f.Add(cat(clientFlagsBytes, binary.BigEndian.AppendUint64(nil, magicOption), []byte{0, 0, 0, 7, 0, 0x10, 0, 0}))

	f.Fuzz(func(t *testing.T, input []byte) {
		opens := be.opens.Load()
		fuzzServe(t, srv, be, input, func(r io.Reader) error {
			err := checkRequireTLSStream(bufio.NewReader(r), input)
			io.Copy(io.Discard, r)
			return err
		})
		if n := be.opens.Load() - opens; n != 0 {
			t.Fatalf("%d exports opened without TLS", n)
		}
	})
}

// checkRequireTLSStream checks the server's side of a require-mode
// session up to an acknowledged STARTTLS (after which TLS bytes follow).
func checkRequireTLSStream(r *bufio.Reader, input []byte) error {
	if len(input) < 4 {
		return nil
	}
	fixed := binary.BigEndian.Uint32(input)&clientFlagFixedNewstyle != 0
	if _, err := io.ReadFull(r, make([]byte, greetingLen)); err != nil {
		return nil
	}
	for {
		h := make([]byte, optionReplyLen)
		if _, err := io.ReadFull(r, h); err != nil {
			return nil // the server may hang up (EXPORT_NAME, bad magic, TLS failure)
		}
		if binary.BigEndian.Uint64(h) != magicOptionReply {
			return fmt.Errorf("bytes %x where an option reply was due", h)
		}
		opt, typ := binary.BigEndian.Uint32(h[8:]), binary.BigEndian.Uint32(h[12:])
		data := make([]byte, binary.BigEndian.Uint32(h[16:]))
		if _, err := io.ReadFull(r, data); err != nil {
			return nil
		}
		refused := repErrTLSReqd
		if !fixed {
			refused = repErrPolicy
		}
		var ok bool
		switch opt {
		case optAbort:
			ok = typ == repAck
		case optStartTLS:
			if typ == repAck && fixed {
				return nil // TLS from here on
			}
			ok = typ == repErrInvalid || (!fixed && typ == repErrPolicy)
		default:
			ok = typ == refused
		}
		if !ok {
			return fmt.Errorf("option %d answered %#x before TLS (fixed newstyle %v)", opt, typ, fixed)
		}
		if typ&repErrBit != 0 && len(data) == 0 {
			return fmt.Errorf("option %d refused without a message", opt)
		}
	}
}

// FuzzOptionsAfterTLS negotiates a real TLS session (NBD_OPT_STARTTLS and
// a crypto/tls client over net.Pipe) and then feeds arbitrary option (and
// request) bytes over it. The server must not panic or hang, must never
// send NBD_REP_ERR_TLS_REQD, must refuse another STARTTLS with
// NBD_REP_ERR_INVALID, and must close every export it opens.
func FuzzOptionsAfterTLS(f *testing.F) {
	pki := newTestPKI(f, "fuzz CA")
	srv, be := newFuzzServerWith(f, func(c *Config) { c.TLS, c.TLSMode = pki.serverConfig(), TLSRequire })
	alice := pki.issue(f, "alice", false)
	// No session resumption: a resumed TLS 1.3 server sends its tickets
	// in the flight the client reads only partly during the handshake,
	// which deadlocks on an unbuffered net.Pipe.
	ccfg := pki.clientConfig(&alice)

	f.Add([]byte{})
	f.Add(optBytes(optList, nil))
	f.Add(cat(optBytes(optStartTLS, nil), optBytes(optStartTLS, []byte("x")), optBytes(optAbort, nil)))
	f.Add(cat(optBytes(optStructuredReply, nil), optBytes(optSetMetaContext, metaData("disk", metaBaseAllocation)),
		optBytes(optGo, goData("disk")), reqBytes(0, cmdBlockStatus, 1, 0, 4096, nil),
		reqBytes(0, cmdWrite, 2, 0, 4, []byte("data")), reqBytes(0, cmdRead, 3, 0, 4, nil), reqBytes(0, cmdDisc, 4, 0, 0, nil)))
	f.Add(cat(optBytes(optExportName, []byte("disk")), reqBytes(0, cmdRead, 1, 0, 512, nil)))
	f.Add(cat(optBytes(optInfo, goData("disk", infoName, infoDescription, infoBlockSize)),
		optBytes(optGo, goData("missing")), optBytes(optListMetaContext, metaData("ro")), optBytes(optGo, goData("ro"))))
	f.Add(cat(optBytes(99, []byte("junk")), optBytes(optExtendedHeaders, nil), optBytes(optInfo, []byte{0, 0, 0, 9, 1})))
	f.Add(cat(binary.BigEndian.AppendUint64(nil, magicOption), []byte{0, 0, 0, 7, 0, 1, 0, 0}))

	f.Fuzz(func(t *testing.T, input []byte) {
		client, server := net.Pipe()
		done := make(chan struct{})
		go func() {
			defer close(done)
			srv.ServeConn(server)
		}()
		defer func() {
			client.Close()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				t.Fatalf("server did not finish the connection")
			}
			if o, c := be.opens.Load(), be.closes.Load(); o != c {
				t.Fatalf("%d exports opened, %d closed", o, c)
			}
		}()
		client.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.ReadFull(client, make([]byte, greetingLen)); err != nil {
			t.Fatal(err)
		}
		if _, err := client.Write(cat(clientFlagsBytes, optBytes(optStartTLS, nil))); err != nil {
			t.Fatal(err)
		}
		ack := make([]byte, optionReplyLen)
		if _, err := io.ReadFull(client, ack); err != nil {
			t.Fatal(err)
		}
		if typ := binary.BigEndian.Uint32(ack[12:]); typ != repAck || binary.BigEndian.Uint32(ack[16:]) != 0 {
			t.Fatalf("STARTTLS reply %x", ack)
		}
		tc := tls.Client(client, ccfg)
		if err := tc.Handshake(); err != nil {
			t.Fatalf("TLS handshake: %v", err)
		}
		output := make(chan error, 1)
		go func() {
			r := bufio.NewReader(tc)
			err := checkAfterTLSStream(r)
			io.Copy(io.Discard, r)
			output <- err
		}()
		tc.Write(input) // fails once the server stops reading; fine
		tc.CloseWrite()
		select {
		case err := <-output:
			if err != nil {
				t.Fatalf("invalid server output: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("server output did not end")
		}
	})
}

// checkAfterTLSStream checks option replies sent under TLS until the
// transmission phase (or the end).
func checkAfterTLSStream(r *bufio.Reader) error {
	for {
		h := make([]byte, optionReplyLen)
		if _, err := io.ReadFull(r, h[:8]); err != nil {
			return nil
		}
		if binary.BigEndian.Uint64(h) != magicOptionReply {
			return nil // NBD_OPT_EXPORT_NAME's reply: transmission follows
		}
		if _, err := io.ReadFull(r, h[8:]); err != nil {
			return nil
		}
		opt, typ := binary.BigEndian.Uint32(h[8:]), binary.BigEndian.Uint32(h[12:])
		n := binary.BigEndian.Uint32(h[16:])
		if n > maxOptionData {
			return fmt.Errorf("option reply of %d bytes", n)
		}
		if _, err := io.ReadFull(r, make([]byte, n)); err != nil {
			return nil
		}
		switch {
		case typ == repErrTLSReqd:
			return fmt.Errorf("NBD_REP_ERR_TLS_REQD for option %d after TLS", opt)
		case opt == optStartTLS && typ != repErrInvalid:
			return fmt.Errorf("STARTTLS under TLS answered %#x", typ)
		case opt == optGo && typ == repAck:
			return nil
		}
	}
}
