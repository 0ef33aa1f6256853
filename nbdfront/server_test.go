package nbdfront

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"reflect"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

func TestNewServerValidation(t *testing.T) {
	be := newMemBackend()
	for _, tc := range []struct {
		cfg Config
		ok  bool
	}{
		{Config{}, false},
		{Config{Backend: be}, true},
		{Config{Backend: be, MaxPayload: 1000}, false},
		{Config{Backend: be, MaxPayload: 2 << 30}, false},
		{Config{Backend: be, MaxPayload: 1 << 20, MaxConnBuffer: 1 << 19}, false},
		{Config{Backend: be, MaxWorkers: -1}, false},
		{Config{Backend: be, HandshakeTimeout: -time.Second}, false},
		{Config{Backend: be, MaxPayload: 128 << 20}, true},
	} {
		s, err := NewServer(tc.cfg)
		if (err == nil) != tc.ok {
			t.Errorf("NewServer(%+v): %v", tc.cfg, err)
		}
		if s != nil {
			s.Close()
		}
	}
	s, err := NewServer(Config{Backend: be})
	if err != nil {
		t.Fatal(err)
	}
	c := s.cfg
	if c.MaxPayload != DefaultMaxPayload || c.MaxConnBuffer != DefaultMaxConnBuffer || c.MaxWorkers != DefaultMaxWorkers ||
		c.HandshakeTimeout != DefaultHandshakeTimeout || c.Logger == nil || c.ErrorCode == nil {
		t.Fatalf("defaults not applied: %+v", c)
	}
	s, _ = NewServer(Config{Backend: be, MaxPayload: 128 << 20})
	if s.cfg.MaxConnBuffer != 128<<20 {
		t.Fatalf("MaxConnBuffer %d below MaxPayload", s.cfg.MaxConnBuffer)
	}
}

func TestDefaultErrorCode(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want uint32
	}{
		{nil, 0},
		{ErrReadOnly, EPERM},
		{ErrBusy, EPERM},
		{fmt.Errorf("x: %w", ErrNoSpace), ENOSPC},
		{ErrInvalidArgument, EINVAL},
		{ErrUnsupported, ENOTSUP},
		{ErrShutdown, ESHUTDOWN},
		{ErrUnknownExport, EIO},
		{context.Canceled, ESHUTDOWN},
		{context.DeadlineExceeded, EIO},
		{fs.ErrPermission, EPERM},
		{&os.PathError{Op: "write", Path: "/x", Err: syscall.EROFS}, EPERM},
		{syscall.EACCES, EPERM},
		{syscall.ENOSPC, ENOSPC},
		{syscall.EDQUOT, ENOSPC},
		{syscall.EFBIG, ENOSPC},
		{syscall.EINVAL, EINVAL},
		{syscall.EOPNOTSUPP, ENOTSUP},
		{syscall.ENOMEM, ENOMEM},
		{syscall.ESHUTDOWN, ESHUTDOWN},
		{syscall.EIO, EIO},
		{errors.New("other"), EIO},
	} {
		if got := DefaultErrorCode(tc.err); got != tc.want {
			t.Errorf("DefaultErrorCode(%v) = %d, want %d", tc.err, got, tc.want)
		}
	}
}

func TestCloseWaitsForInFlight(t *testing.T) {
	be := newMemBackend()
	dev := be.add(ExportInfo{Name: "disk", Size: testSize})
	srv, err := NewServer(Config{Backend: be, Logger: quietLogger()})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	env := &testEnv{t: t, srv: srv, addr: l.Addr().String(), be: be}

	release := make(chan struct{})
	var started atomic.Bool
	dev.setHook(func(op string, off, length int64) error {
		if op == "write" {
			started.Store(true)
			<-release
		}
		return nil
	})
	c, _ := env.open("disk", false, false)
	negotiating := env.dialGreet(clientFlagFixedNewstyle)
	if err := c.send(0, cmdWrite, 9, 0, 2, []byte("hi")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "write started", started.Load)

	closed := make(chan error, 1)
	go func() { closed <- srv.Close() }()
	// The negotiating connection is dropped at once.
	negotiating.expectClosed()
	select {
	case err := <-closed:
		t.Fatalf("Close returned (%v) with a request in flight", err)
	case <-time.After(50 * time.Millisecond):
	}
	close(release)
	m, err := c.readMsg()
	if err != nil || m.cookie != 9 || m.errno != 0 {
		t.Fatalf("in-flight reply %+v, %v", m, err)
	}
	c.expectClosed()
	if err := <-closed; err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := <-served; err != nil {
		t.Fatalf("Serve: %v", err)
	}
	be.waitAllClosed(t)
	mustEqual(t, "device", dev.bytes(0, 2), []byte("hi"))

	// After Close: new connections are refused, Serve returns nil at once.
	a, b := net.Pipe()
	go srv.ServeConn(b)
	if _, err := a.Read(make([]byte, 1)); err == nil {
		t.Fatal("ServeConn after Close served")
	}
	l2, _ := net.Listen("tcp", "127.0.0.1:0")
	if err := srv.Serve(l2); err != nil {
		t.Fatalf("Serve after Close: %v", err)
	}
	if err := srv.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

func TestServeConnPipe(t *testing.T) {
	be := newMemBackend()
	be.add(ExportInfo{Name: "disk", Size: testSize})
	srv, err := NewServer(Config{Backend: be, Logger: quietLogger()})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	c := pipeClient(t, srv)
	c.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
	c.goExport("")
	c.mustOK(0, cmdWrite, 100, 3, []byte("abc"))
	mustEqual(t, "read", c.mustOK(0, cmdRead, 100, 3, nil).data, []byte("abc"))
	c.disc()
	c.expectClosed()
	be.waitAllClosed(t)
}

func TestParseRequestHeader(t *testing.T) {
	b := binary.BigEndian.AppendUint32(nil, magicRequest)
	b = binary.BigEndian.AppendUint16(b, 0x0102)
	b = binary.BigEndian.AppendUint16(b, 0x0304)
	b = binary.BigEndian.AppendUint64(b, 0x05060708090a0b0c)
	b = binary.BigEndian.AppendUint64(b, 0x0d0e0f1011121314)
	b = binary.BigEndian.AppendUint32(b, 0x15161718)
	got, err := parseRequestHeader(b)
	want := request{Flags: 0x0102, Type: 0x0304, Cookie: 0x05060708090a0b0c, Offset: 0x0d0e0f1011121314, Length: 0x15161718}
	if err != nil || got != want {
		t.Fatalf("parse = %+v, %v", got, err)
	}
	b[0] ^= 1
	if _, err := parseRequestHeader(b); !errors.Is(err, errBadMagic) {
		t.Fatalf("bad magic: %v", err)
	}
	if _, err := parseRequestHeader(b[:10]); err == nil {
		t.Fatal("short header accepted")
	}
	if _, err := parseOptionHeader(make([]byte, optionHeaderLen)); !errors.Is(err, errBadMagic) {
		t.Fatalf("option bad magic: %v", err)
	}
}

func TestParseInfoAndMetaRequests(t *testing.T) {
	got, err := parseInfoRequest(goData("name", 1, 3))
	if err != nil || !reflect.DeepEqual(got, infoRequest{Name: "name", Infos: []uint16{1, 3}}) {
		t.Fatalf("parseInfoRequest = %+v, %v", got, err)
	}
	m, err := parseMetaRequest(metaData("e", "base:allocation", "x:y"))
	if err != nil || !reflect.DeepEqual(m, metaRequest{Name: "e", Queries: []string{"base:allocation", "x:y"}}) {
		t.Fatalf("parseMetaRequest = %+v, %v", m, err)
	}
	m, err = parseMetaRequest(metaData(""))
	if err != nil || m.Name != "" || len(m.Queries) != 0 {
		t.Fatalf("empty meta request = %+v, %v", m, err)
	}
}

func TestSanitizeString(t *testing.T) {
	if got := sanitizeString("a\x00b\xffc", 100); got != "ab\uFFFDc" {
		t.Fatalf("sanitize = %q", got)
	}
	if got := sanitizeString("héllo", 2); got != "h" {
		t.Fatalf("truncate at rune boundary = %q", got)
	}
}
