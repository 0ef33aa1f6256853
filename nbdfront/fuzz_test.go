package nbdfront

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// halfConn is one end of an in-memory connection built from two io.Pipes,
// so the client can half-close (CloseWrite) and still read every reply.
// Deadlines are accepted and ignored.
type halfConn struct {
	r    *io.PipeReader
	w    *io.PipeWriter
	once sync.Once
}

func halfPipe() (client, server *halfConn) {
	c2sR, c2sW := io.Pipe()
	s2cR, s2cW := io.Pipe()
	return &halfConn{r: s2cR, w: c2sW}, &halfConn{r: c2sR, w: s2cW}
}

func (c *halfConn) Read(b []byte) (int, error)  { return c.r.Read(b) }
func (c *halfConn) Write(b []byte) (int, error) { return c.w.Write(b) }
func (c *halfConn) CloseWrite() error           { return c.w.Close() }
func (c *halfConn) Close() error {
	c.once.Do(func() {
		c.r.Close()
		c.w.Close()
	})
	return nil
}
func (c *halfConn) LocalAddr() net.Addr              { return pipeAddr{} }
func (c *halfConn) RemoteAddr() net.Addr             { return pipeAddr{} }
func (c *halfConn) SetDeadline(time.Time) error      { return nil }
func (c *halfConn) SetReadDeadline(time.Time) error  { return nil }
func (c *halfConn) SetWriteDeadline(time.Time) error { return nil }

type pipeAddr struct{}

func (pipeAddr) Network() string { return "pipe" }
func (pipeAddr) String() string  { return "pipe" }

// fuzzBackend hands out exports over one shared small device and counts
// opens and closes.
type fuzzBackend struct {
	dev           *memDevice
	opens, closes atomic.Int64
	ro            ExportInfo
	disk          ExportInfo
}

type fuzzExport struct {
	*memDevice
	info ExportInfo
	b    *fuzzBackend
	done atomic.Bool
}

func (e *fuzzExport) Info() ExportInfo { return e.info }
func (e *fuzzExport) Close() error {
	if e.done.Swap(true) {
		panic("export closed twice")
	}
	e.b.closes.Add(1)
	return nil
}

func newFuzzBackend() *fuzzBackend {
	const size = 64 << 10
	return &fuzzBackend{
		dev:  newMemDevice(size),
		disk: ExportInfo{Name: "disk", Description: "fuzz", Size: size, CanTrim: true, CanZero: true, CanFastZero: true, CanBlockStatus: true},
		ro:   ExportInfo{Name: "ro", Size: size, ReadOnly: true, MinBlock: 512},
	}
}

func (b *fuzzBackend) List() ([]ExportInfo, error) { return []ExportInfo{b.disk, b.ro}, nil }

func (b *fuzzBackend) Info(name string) (ExportInfo, error) {
	switch name {
	case "disk", "":
		return b.disk, nil
	case "ro":
		return b.ro, nil
	}
	return ExportInfo{}, ErrUnknownExport
}

func (b *fuzzBackend) Open(name string) (Export, error) {
	info, err := b.Info(name)
	if err != nil {
		return nil, err
	}
	b.opens.Add(1)
	return &fuzzExport{memDevice: b.dev, info: info, b: b}, nil
}

func newFuzzServer(f *testing.F) (*Server, *fuzzBackend) {
	return newFuzzServerWith(f, nil)
}

// newFuzzServerWith is newFuzzServer with mod applied to the config.
func newFuzzServerWith(f *testing.F, mod func(*Config)) (*Server, *fuzzBackend) {
	be := newFuzzBackend()
	cfg := Config{
		Backend:          be,
		Logger:           quietLogger(),
		MaxPayload:       64 << 10,
		MaxConnBuffer:    256 << 10,
		MaxWorkers:       4,
		HandshakeTimeout: 5 * time.Second,
	}
	if mod != nil {
		mod(&cfg)
	}
	srv, err := NewServer(cfg)
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { srv.Close() })
	return srv, be
}

// fuzzServe feeds input to a server connection, half-closes, hands the
// server's output to consume (which must read to EOF) and checks that the
// handler ends promptly and closed every export it opened.
func fuzzServe(t *testing.T, srv *Server, be *fuzzBackend, input []byte, consume func(io.Reader) error) {
	client, server := halfPipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.ServeConn(server)
	}()
	go func() {
		client.Write(input) // fails once the server stops reading; fine
		client.CloseWrite()
	}()
	consumed := make(chan error, 1)
	go func() { consumed <- consume(client.r) }()

	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatalf("server did not finish the connection")
	}
	var err error
	select {
	case err = <-consumed:
	case <-time.After(10 * time.Second):
		t.Fatalf("server output did not end")
	}
	client.Close()
	if err != nil {
		t.Fatalf("invalid server output: %v", err)
	}
	if o, c := be.opens.Load(), be.closes.Load(); o != c {
		t.Fatalf("%d exports opened, %d closed", o, c)
	}
}

func optBytes(opt uint32, data []byte) []byte {
	b := binary.BigEndian.AppendUint64(nil, magicOption)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

func reqBytes(flags, typ uint16, cookie, off uint64, length uint32, data []byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, magicRequest)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint64(b, off)
	b = binary.BigEndian.AppendUint32(b, length)
	return append(b, data...)
}

func cat(parts ...[]byte) []byte {
	var b []byte
	for _, p := range parts {
		b = append(b, p...)
	}
	return b
}

var clientFlagsBytes = binary.BigEndian.AppendUint32(nil, clientFlagFixedNewstyle|clientFlagNoZeroes)

// FuzzHandshake feeds arbitrary client bytes into the option phase (and
// whatever follows it). The server must not panic or hang, and must close
// every export it opens.
func FuzzHandshake(f *testing.F) {
	srv, be := newFuzzServer(f)
	f.Add([]byte{})
	f.Add(clientFlagsBytes)
	f.Add(cat(clientFlagsBytes, optBytes(optList, nil), optBytes(optAbort, nil)))
	f.Add(cat(clientFlagsBytes, optBytes(optExportName, []byte("disk")), reqBytes(0, cmdRead, 1, 0, 512, nil)))
	f.Add(cat([]byte{0, 0, 0, 1}, optBytes(optExportName, []byte("ro"))))
	f.Add(cat(clientFlagsBytes, optBytes(optInfo, goData("disk", infoName, infoDescription, infoBlockSize)),
		optBytes(optGo, goData("missing")), optBytes(optGo, goData("", infoBlockSize)), reqBytes(0, cmdDisc, 0, 0, 0, nil)))
	f.Add(cat(clientFlagsBytes, optBytes(optStructuredReply, nil),
		optBytes(optListMetaContext, metaData("disk")),
		optBytes(optListMetaContext, metaData("disk", "base:")),
		optBytes(optSetMetaContext, metaData("disk", metaBaseAllocation)),
		optBytes(optGo, goData("disk")), reqBytes(0, cmdBlockStatus, 1, 0, 4096, nil)))
	f.Add(cat(clientFlagsBytes, optBytes(optStartTLS, nil), optBytes(optExtendedHeaders, nil),
		optBytes(99, []byte("junk")), optBytes(optSetMetaContext, metaData("disk", metaBaseAllocation))))
	f.Add(cat(clientFlagsBytes, optBytes(optInfo, []byte{0, 0, 0, 9, 1})))
	f.Add(cat(clientFlagsBytes, binary.BigEndian.AppendUint64(nil, magicOption), []byte{0, 0, 0, 7, 0, 1, 0, 0}))
	f.Add(cat([]byte{0, 0, 0, 8}))

	f.Fuzz(func(t *testing.T, input []byte) {
		fuzzServe(t, srv, be, input, func(r io.Reader) error {
			_, err := io.Copy(io.Discard, r)
			return err
		})
	})
}

// FuzzTransmission feeds arbitrary bytes after a valid handshake. The
// first input byte picks the negotiation: bit 0 set selects structured
// replies with base:allocation (and the server output is then checked to
// be well-framed), otherwise simple replies; bit 1 selects the read-only
// export.
func FuzzTransmission(f *testing.F) {
	srv, be := newFuzzServer(f)
	seeds := [][]byte{
		reqBytes(0, cmdRead, 1, 0, 512, nil),
		cat(reqBytes(cmdFlagFUA, cmdWrite, 2, 100, 4, []byte("data")), reqBytes(0, cmdRead, 3, 100, 4, nil),
			reqBytes(0, cmdFlush, 4, 0, 0, nil), reqBytes(0, cmdDisc, 5, 0, 0, nil)),
		cat(reqBytes(0, cmdTrim, 1, 0, 4096, nil), reqBytes(cmdFlagNoHole, cmdWriteZeroes, 2, 4096, 4096, nil),
			reqBytes(cmdFlagFastZero, cmdWriteZeroes, 3, 0, 100, nil), reqBytes(0, cmdCache, 4, 0, 65536, nil)),
		cat(reqBytes(0, cmdBlockStatus, 1, 0, 65536, nil), reqBytes(cmdFlagReqOne, cmdBlockStatus, 2, 10, 10, nil)),
		cat(reqBytes(cmdFlagDF, cmdRead, 1, 0, 65536, nil), reqBytes(0, cmdRead, 2, 0, 65537, nil)),
		cat(reqBytes(0, cmdWrite, 1, 65535, 2, []byte{1, 2}), reqBytes(0, 42, 2, 0, 0, nil), reqBytes(0xffff, cmdRead, 3, 0, 1, nil)),
		reqBytes(0, cmdWrite, 1, 0, 100000, make([]byte, 100)), // oversized, truncated
		reqBytes(0, cmdWrite, 1, 0, 1000, []byte{1}),           // truncated payload
		{0x25, 0x60, 0x95},             // truncated header
		make([]byte, requestHeaderLen), // bad magic
	}
	for _, s := range seeds {
		f.Add(append([]byte{0}, s...))
		f.Add(append([]byte{1}, s...))
		f.Add(append([]byte{3}, s...))
	}

	f.Fuzz(func(t *testing.T, input []byte) {
		if len(input) == 0 {
			return
		}
		mode, body := input[0], input[1:]
		structured := mode&1 != 0
		name := "disk"
		if mode&2 != 0 {
			name = "ro"
		}
		prefix := clientFlagsBytes
		if structured {
			prefix = cat(prefix, optBytes(optStructuredReply, nil),
				optBytes(optSetMetaContext, metaData(name, metaBaseAllocation)))
		}
		prefix = cat(prefix, optBytes(optGo, goData(name)))
		fuzzServe(t, srv, be, cat(prefix, body), func(r io.Reader) error {
			if !structured {
				_, err := io.Copy(io.Discard, r)
				return err
			}
			return checkStructuredStream(bufio.NewReader(r))
		})
	})
}

// checkStructuredStream validates the server side of a session that
// negotiated structured replies: the greeting, option replies up to the GO
// acknowledgement, then context-free framing of every reply until EOF.
func checkStructuredStream(r *bufio.Reader) error {
	if _, err := io.ReadFull(r, make([]byte, greetingLen)); err != nil {
		return fmt.Errorf("greeting: %w", err)
	}
	var metaID uint32
	for {
		h := make([]byte, optionReplyLen)
		if _, err := io.ReadFull(r, h); err != nil {
			return fmt.Errorf("option reply: %w", err)
		}
		if binary.BigEndian.Uint64(h) != magicOptionReply {
			return fmt.Errorf("option reply magic")
		}
		opt, typ := binary.BigEndian.Uint32(h[8:]), binary.BigEndian.Uint32(h[12:])
		data := make([]byte, binary.BigEndian.Uint32(h[16:]))
		if _, err := io.ReadFull(r, data); err != nil {
			return err
		}
		if typ&repErrBit != 0 {
			return fmt.Errorf("option %d failed: %#x %q", opt, typ, data)
		}
		if typ == repMetaContext {
			metaID = binary.BigEndian.Uint32(data)
		}
		if opt == optGo && typ == repAck {
			break
		}
	}
	// A read error ends the check: after a protocol violation the server
	// may hang up in the middle of a reply.
	for {
		var magic [4]byte
		if _, err := io.ReadFull(r, magic[:]); err != nil {
			return nil
		}
		switch binary.BigEndian.Uint32(magic[:]) {
		case magicSimpleReply:
			if _, err := io.ReadFull(r, make([]byte, 12)); err != nil {
				return nil
			}
		case magicStructuredReply:
			h := make([]byte, 16)
			if _, err := io.ReadFull(r, h); err != nil {
				return nil
			}
			flags, typ := binary.BigEndian.Uint16(h), binary.BigEndian.Uint16(h[2:])
			n := binary.BigEndian.Uint32(h[12:])
			if flags != replyFlagDone {
				return fmt.Errorf("chunk flags %#x", flags)
			}
			if n > 64<<10+8 {
				return fmt.Errorf("chunk of %d bytes", n)
			}
			p := make([]byte, n)
			if _, err := io.ReadFull(r, p); err != nil {
				return nil
			}
			switch typ {
			case replyTypeOffsetData:
				if n < 9 || binary.BigEndian.Uint64(p)+uint64(n-8) > 64<<10 {
					return fmt.Errorf("bad OFFSET_DATA chunk (%d bytes)", n)
				}
			case replyTypeBlockStatus:
				if n < 12 || (n-4)%8 != 0 || binary.BigEndian.Uint32(p) != metaID || metaID == 0 {
					return fmt.Errorf("bad BLOCK_STATUS chunk (%d bytes)", n)
				}
				for i := 4; i < len(p); i += 8 {
					if binary.BigEndian.Uint32(p[i:]) == 0 {
						return fmt.Errorf("zero-length extent")
					}
				}
			case replyTypeError:
				if n < 6 || binary.BigEndian.Uint32(p) == 0 || int(binary.BigEndian.Uint16(p[4:])) != len(p)-6 {
					return fmt.Errorf("bad ERROR chunk")
				}
			default:
				return fmt.Errorf("chunk type %d", typ)
			}
		default:
			return fmt.Errorf("reply magic %#x", magic)
		}
	}
}
