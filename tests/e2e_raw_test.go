package tests

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/robib/robib/tests/harness"
)

// A minimal NBD client written from the protocol document, independent of
// nbdfront, for talking to the server in ways real clients never do.

const (
	nbdMagic        = 0x4e42444d41474943 // "NBDMAGIC"
	optMagic        = 0x49484156454f5054 // "IHAVEOPT"
	optReplyMagic   = 0x0003e889045565a9
	reqMagic        = 0x25609513
	simpleReplyMag  = 0x67446698
	flagFixedNew    = 1 << 0
	flagNoZeroes    = 1 << 1
	optGo           = 7
	optAbort        = 2
	repAck          = 1
	repInfo         = 3
	repFlagError    = 1 << 31
	cmdRead         = 0
	cmdWrite        = 1
	cmdDisc         = 2
	cmdFlush        = 3
	cmdTrim         = 4
	cmdWriteZeroes  = 6
	cmdFlagFUA      = 1 << 0
	nbdEINVAL       = 22
	rawIOTimeout    = 10 * time.Second
	rawCloseTimeout = 15 * time.Second
)

type rawConn struct {
	t      *testing.T
	c      *net.TCPConn
	size   uint64
	cookie uint64
}

func rawDial(t *testing.T, addr string) *rawConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, rawIOTimeout)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	rc := &rawConn{t: t, c: c.(*net.TCPConn)}
	rc.deadline()
	var hello struct {
		Magic, OptMagic uint64
		Flags           uint16
	}
	rc.read(&hello)
	if hello.Magic != nbdMagic || hello.OptMagic != optMagic || hello.Flags&flagFixedNew == 0 {
		t.Fatalf("server greeting %+v: not fixed newstyle", hello)
	}
	rc.write(uint32(flagFixedNew | flagNoZeroes&uint32(hello.Flags)))
	return rc
}

func (rc *rawConn) deadline() { rc.c.SetDeadline(time.Now().Add(rawIOTimeout)) }

func (rc *rawConn) read(v any) {
	rc.t.Helper()
	if err := binary.Read(rc.c, binary.BigEndian, v); err != nil {
		rc.t.Fatalf("reading from server: %v", err)
	}
}

func (rc *rawConn) write(v any) {
	rc.t.Helper()
	if err := binary.Write(rc.c, binary.BigEndian, v); err != nil {
		rc.t.Fatalf("writing to server: %v", err)
	}
}

// option sends one option and returns the replies up to the final one.
func (rc *rawConn) option(opt uint32, data []byte) (last uint32, infos [][]byte) {
	rc.t.Helper()
	rc.deadline()
	rc.write(struct {
		Magic    uint64
		Opt, Len uint32
	}{optMagic, opt, uint32(len(data))})
	rc.write(data)
	for {
		var hdr struct {
			Magic     uint64
			Opt, Type uint32
			Len       uint32
		}
		rc.read(&hdr)
		if hdr.Magic != optReplyMagic || hdr.Opt != opt {
			rc.t.Fatalf("option reply %+v for option %d", hdr, opt)
		}
		if hdr.Len > 1<<20 {
			rc.t.Fatalf("option reply length %d", hdr.Len)
		}
		body := make([]byte, hdr.Len)
		rc.read(body)
		if hdr.Type == repInfo {
			infos = append(infos, body)
			continue
		}
		return hdr.Type, infos
	}
}

// goExport negotiates NBD_OPT_GO for name and enters transmission.
func (rc *rawConn) goExport(name string) {
	rc.t.Helper()
	var b bytes.Buffer
	binary.Write(&b, binary.BigEndian, uint32(len(name)))
	b.WriteString(name)
	binary.Write(&b, binary.BigEndian, uint16(0))
	typ, infos := rc.option(optGo, b.Bytes())
	if typ != repAck {
		rc.t.Fatalf("NBD_OPT_GO %q: reply type %#x", name, typ)
	}
	for _, in := range infos {
		if len(in) >= 12 && binary.BigEndian.Uint16(in) == 0 { // NBD_INFO_EXPORT
			rc.size = binary.BigEndian.Uint64(in[2:])
		}
	}
	if rc.size == 0 {
		rc.t.Fatalf("NBD_OPT_GO %q: no NBD_INFO_EXPORT", name)
	}
}

func rawConnect(t *testing.T, addr, export string) *rawConn {
	t.Helper()
	rc := rawDial(t, addr)
	rc.goExport(export)
	return rc
}

type nbdRequest struct {
	Magic       uint32
	Flags, Type uint16
	Cookie      uint64
	Offset      uint64
	Length      uint32
}

func (rc *rawConn) send(typ uint16, off uint64, length uint32, payload []byte) uint64 {
	rc.t.Helper()
	return rc.sendFlags(0, typ, off, length, payload)
}

func (rc *rawConn) sendFlags(flags, typ uint16, off uint64, length uint32, payload []byte) uint64 {
	rc.t.Helper()
	rc.cookie++
	rc.deadline()
	var b bytes.Buffer
	binary.Write(&b, binary.BigEndian, nbdRequest{reqMagic, flags, typ, rc.cookie, off, length})
	b.Write(payload)
	if _, err := rc.c.Write(b.Bytes()); err != nil {
		rc.t.Fatalf("sending request: %v", err)
	}
	return rc.cookie
}

// reply reads one simple reply and its read payload (dataLen bytes if the
// reply is not an error).
func (rc *rawConn) reply(cookie uint64, dataLen int) (uint32, []byte) {
	rc.t.Helper()
	rc.deadline()
	var hdr struct {
		Magic, Error uint32
		Cookie       uint64
	}
	rc.read(&hdr)
	if hdr.Magic != simpleReplyMag || hdr.Cookie != cookie {
		rc.t.Fatalf("reply %+v, want simple reply to cookie %d", hdr, cookie)
	}
	if hdr.Error != 0 {
		return hdr.Error, nil
	}
	data := make([]byte, dataLen)
	rc.read(data)
	return 0, data
}

func (rc *rawConn) mustWrite(off uint64, data []byte) {
	rc.t.Helper()
	if e, _ := rc.reply(rc.send(cmdWrite, off, uint32(len(data)), data), 0); e != 0 {
		rc.t.Fatalf("write at %d: NBD error %d", off, e)
	}
}

func (rc *rawConn) mustRead(off uint64, n int) []byte {
	rc.t.Helper()
	e, data := rc.reply(rc.send(cmdRead, off, uint32(n), nil), n)
	if e != 0 {
		rc.t.Fatalf("read at %d: NBD error %d", off, e)
	}
	return data
}

// try sends one request and reads its reply without failing the test: it
// returns the NBD error code (0 for success) and the read payload, or err if
// the connection broke.
func (rc *rawConn) try(flags, typ uint16, off uint64, length uint32, payload []byte) (code uint32, data []byte, err error) {
	rc.cookie++
	cookie := rc.cookie
	rc.deadline()
	var b bytes.Buffer
	binary.Write(&b, binary.BigEndian, nbdRequest{reqMagic, flags, typ, cookie, off, length})
	b.Write(payload)
	if _, err := rc.c.Write(b.Bytes()); err != nil {
		return 0, nil, err
	}
	var hdr struct {
		Magic, Error uint32
		Cookie       uint64
	}
	if err := binary.Read(rc.c, binary.BigEndian, &hdr); err != nil {
		return 0, nil, err
	}
	if hdr.Magic != simpleReplyMag || hdr.Cookie != cookie {
		return 0, nil, fmt.Errorf("reply %+v, want simple reply to cookie %d", hdr, cookie)
	}
	if hdr.Error != 0 || typ != cmdRead {
		return hdr.Error, nil, nil
	}
	data = make([]byte, length)
	if _, err := io.ReadFull(rc.c, data); err != nil {
		return 0, nil, err
	}
	return 0, data, nil
}

// expectClosed waits for the server to close the connection.
func (rc *rawConn) expectClosed(what string) {
	rc.t.Helper()
	rc.c.SetDeadline(time.Now().Add(rawCloseTimeout))
	n, err := io.Copy(io.Discard, rc.c)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		rc.t.Fatalf("%s: server kept the connection open for %v (read %d bytes)", what, rawCloseTimeout, n)
	}
	if err != nil && !errors.Is(err, syscall.ECONNRESET) {
		rc.t.Logf("%s: connection ended with %v", what, err)
	}
}

// TestRawProtocolAbuse sends garbage, truncated and oversized requests on
// one connection and checks that only that connection is closed while
// another one, opened before, keeps working, and that the agent survives.
func TestRawProtocolAbuse(t *testing.T) {
	a := startAgent(t, "raw", "8MiB")
	good := rawConnect(t, a.NBDAddr, "raw")
	if good.size != 8*MiB {
		t.Fatalf("export size %d, want 8 MiB", good.size)
	}
	gen := uint64(0)
	checkGood := func(step string) {
		t.Helper()
		gen++
		data := randomBytes(100+gen, 64*KiB)
		off := (gen % 64) * 64 * KiB
		good.mustWrite(off, data)
		if got := good.mustRead(off, len(data)); !bytes.Equal(got, data) {
			t.Fatalf("after %s: the other connection reads back wrong data", step)
		}
	}
	checkGood("setup")

	steps := []struct {
		name string
		do   func(t *testing.T, rc *rawConn)
	}{
		{"garbage-after-handshake", func(t *testing.T, rc *rawConn) {
			rc.c.Write(bytes.Repeat([]byte{0xde, 0xad, 0xbe, 0xef}, 7))
		}},
		{"truncated-request-header", func(t *testing.T, rc *rawConn) {
			var b bytes.Buffer
			binary.Write(&b, binary.BigEndian, nbdRequest{reqMagic, 0, cmdRead, 1, 0, 4096})
			rc.c.Write(b.Bytes()[:10])
			rc.c.CloseWrite()
		}},
		{"truncated-write-payload", func(t *testing.T, rc *rawConn) {
			var b bytes.Buffer
			binary.Write(&b, binary.BigEndian, nbdRequest{reqMagic, 0, cmdWrite, 1, 7 * MiB, 64 * KiB})
			b.Write(bytes.Repeat([]byte{0xee}, 1000))
			rc.c.Write(b.Bytes())
			rc.c.CloseWrite()
		}},
		{"oversized-write", func(t *testing.T, rc *rawConn) {
			var b bytes.Buffer
			binary.Write(&b, binary.BigEndian, nbdRequest{reqMagic, 0, cmdWrite, 1, 0, 0xfffffff0})
			b.Write(make([]byte, 4096))
			rc.c.Write(b.Bytes())
			// A server that reads and discards the payload sees EOF.
			rc.c.CloseWrite()
		}},
		{"oversized-read", func(t *testing.T, rc *rawConn) {
			// A read far above the maximum block size: the server may
			// answer EINVAL or close; either way the connection ends when
			// we disconnect, and the server must not allocate 4 GiB.
			cookie := rc.send(cmdRead, 0, 0xfffffff0, nil)
			rc.c.SetDeadline(time.Now().Add(rawIOTimeout))
			var hdr struct {
				Magic, Error uint32
				Cookie       uint64
			}
			err := binary.Read(rc.c, binary.BigEndian, &hdr)
			t.Logf("oversized read: reply %+v, err %v", hdr, err)
			if err == nil {
				if hdr.Cookie != cookie || hdr.Error == 0 {
					t.Errorf("oversized read: reply %+v, want an error", hdr)
				}
				rc.send(cmdDisc, 0, 0, nil)
			}
		}},
		{"bad-option-magic", func(t *testing.T, rc *rawConn) {}}, // handled below: before GO
		{"unknown-command", func(t *testing.T, rc *rawConn) {
			cookie := rc.send(99, 0, 0, nil)
			rc.deadline()
			var hdr struct {
				Magic, Error uint32
				Cookie       uint64
			}
			err := binary.Read(rc.c, binary.BigEndian, &hdr)
			t.Logf("unknown command: reply %+v, err %v", hdr, err)
			if err == nil {
				if hdr.Cookie != cookie || hdr.Error != nbdEINVAL {
					t.Errorf("unknown command: reply %+v, want EINVAL (%d)", hdr, nbdEINVAL)
				}
				// Still usable after an EINVAL.
				if got := rc.mustRead(0, 512); len(got) != 512 {
					t.Errorf("read after unknown command: %d bytes", len(got))
				}
				rc.send(cmdDisc, 0, 0, nil)
			}
		}},
		{"disconnect-with-requests-in-flight", func(t *testing.T, rc *rawConn) {
			for i := range 16 {
				rc.send(cmdWrite, uint64(i)*64*KiB+4*MiB, 64*KiB, bytes.Repeat([]byte{byte(i + 1)}, 64*KiB))
			}
			rc.send(cmdDisc, 0, 0, nil)
		}},
	}
	for _, s := range steps {
		t.Run(s.name, func(t *testing.T) {
			var rc *rawConn
			if s.name == "bad-option-magic" {
				rc = rawDial(t, a.NBDAddr)
				rc.c.Write(bytes.Repeat([]byte("NOTANOPT"), 3))
			} else {
				rc = rawConnect(t, a.NBDAddr, "raw")
				s.do(t, rc)
			}
			rc.expectClosed(s.name)
			checkGood(s.name)
		})
	}

	// The partial write was not applied.
	if got := good.mustRead(7*MiB, 64*KiB); bytes.Contains(got, []byte{0xee}) {
		t.Errorf("a write whose payload never fully arrived was (partly) applied")
	}
	// Writes sent before NBD_CMD_DISC completed (the spec says the server
	// must handle outstanding requests before closing).
	for i := range 16 {
		got := good.mustRead(uint64(i)*64*KiB+4*MiB, 64*KiB)
		if !bytes.Equal(got, bytes.Repeat([]byte{byte(i + 1)}, 64*KiB)) {
			t.Errorf("write %d sent before NBD_CMD_DISC was not applied", i)
		}
	}
	// Many half-open connections, then close them all.
	var many []*rawConn
	for range 20 {
		many = append(many, rawDial(t, a.NBDAddr))
	}
	for _, rc := range many {
		rc.c.Close()
	}
	checkGood("20 abandoned handshakes")
	// Clean shutdown of the good connection; NBD_OPT_ABORT on a fresh one.
	good.send(cmdDisc, 0, 0, nil)
	good.expectClosed("NBD_CMD_DISC")
	rc := rawDial(t, a.NBDAddr)
	if typ, _ := rc.option(optAbort, nil); typ != repAck {
		t.Errorf("NBD_OPT_ABORT reply %#x, want ACK", typ)
	}
	rc.expectClosed("NBD_OPT_ABORT")
	if err := a.Health(); err != nil {
		t.Fatalf("agent unhealthy: %v", err)
	}
	if harness.RequireTool(t, "nbdinfo") != "" {
		nbdinfoJSON(t, "--no-content", a.NBDURI("raw"))
	}
}
