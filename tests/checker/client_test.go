package checker

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/robib/robib/tests/harness"
)

func dialFake(t *testing.T, s *fakeServer, export string) *Client {
	t.Helper()
	addr := s.start()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	cl, err := Dial(ctx, nil, addr, export)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { cl.Close() })
	return cl
}

func TestClientRoundTripAndFlags(t *testing.T) {
	s := newFakeServer(t, newFakeStore(1<<20))
	s.blockSizes = [3]uint32{512, 4096, 1 << 20}
	cl := dialFake(t, s, "disk")
	if cl.Size() != 1<<20 || !cl.CanFlush() || !cl.CanFUA() || cl.ReadOnly() || cl.Export() != "disk" {
		t.Fatalf("size %d flags %#x", cl.Size(), cl.TransmissionFlags())
	}
	if mn, pref, mx := cl.BlockSizes(); mn != 512 || pref != 4096 || mx != 1<<20 {
		t.Fatalf("block sizes %d %d %d", mn, pref, mx)
	}
	ctx := context.Background()
	data := bytes.Repeat([]byte("robib!"), 2048)[:8192]
	if err := cl.Write(ctx, 4096, data, true); err != nil {
		t.Fatal(err)
	}
	if err := cl.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data))
	if err := cl.Read(ctx, 4096, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("read back differs")
	}
	// FUA reached the durable layer by itself.
	if !bytes.Equal(s.store.durable[4096:4096+8192], data) {
		t.Fatal("FUA write not durable")
	}
	// The announced minimum block size is enforced locally.
	if err := cl.Read(ctx, 100, make([]byte, 512)); !errors.Is(err, ErrBadRequest) {
		t.Fatalf("unaligned read: %v", err)
	}
	if err := cl.Close(); err != nil {
		t.Fatal(err)
	}
	pollUntil(t, 5*time.Second, "NBD_CMD_DISC at the server", func() bool { return s.discCount() == 1 })
	if err := cl.Read(ctx, 0, got[:512]); !errors.Is(err, ErrClosed) {
		t.Fatalf("read after Close: %v", err)
	}
}

func TestClientOptionRefused(t *testing.T) {
	for _, tc := range []struct {
		name   string
		setup  func(*fakeServer)
		export string
		code   RepError
		text   string
	}{
		{"policy", func(s *fakeServer) { s.refuse, s.refuseMsg = ErrPolicy, "site is not the leader" }, "disk", ErrPolicy, "NBD_REP_ERR_POLICY: site is not the leader"},
		{"shutdown", func(s *fakeServer) { s.refuse, s.refuseMsg = ErrShutdown, "stopping" }, "disk", ErrShutdown, "NBD_REP_ERR_SHUTDOWN: stopping"},
		{"unknown", func(*fakeServer) {}, "nope", ErrUnknown, "NBD_REP_ERR_UNKNOWN: no export named nope"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newFakeServer(t, newFakeStore(1<<16))
			tc.setup(s)
			addr := s.start()
			_, err := Dial(context.Background(), nil, addr, tc.export)
			if !errors.Is(err, ErrOptionRefused) || !errors.Is(err, tc.code) {
				t.Fatalf("err = %v, want ErrOptionRefused and %v", err, tc.code)
			}
			var oe *OptionError
			if !errors.As(err, &oe) || oe.Code != tc.code {
				t.Fatalf("err %v is not an *OptionError with code %v", err, tc.code)
			}
			if !strings.Contains(err.Error(), tc.text) {
				t.Fatalf("err %q lacks %q", err, tc.text)
			}
		})
	}
}

func TestClientExportNameFallback(t *testing.T) {
	s := newFakeServer(t, newFakeStore(1<<16))
	s.noGo = true
	cl := dialFake(t, s, "disk")
	if cl.Size() != 1<<16 || !cl.CanFlush() {
		t.Fatalf("size %d flags %#x", cl.Size(), cl.TransmissionFlags())
	}
	if err := cl.Write(context.Background(), 0, []byte("hello"), false); err != nil {
		t.Fatal(err)
	}
}

func TestClientOutOfOrderReplies(t *testing.T) {
	const n = 8
	st := newFakeStore(n * 512)
	for i := 0; i < n; i++ {
		copy(st.visible[i*512:], bytes.Repeat([]byte{byte('a' + i)}, 512))
	}
	s := newFakeServer(t, st)
	s.reverseBatch = n
	cl := dialFake(t, s, "disk")
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 512)
			if err := cl.Read(context.Background(), uint64(i*512), buf); err != nil {
				errs[i] = err
				return
			}
			if !bytes.Equal(buf, bytes.Repeat([]byte{byte('a' + i)}, 512)) {
				errs[i] = fmt.Errorf("read %d got %q...", i, buf[:4])
			}
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
}

func TestClientServerErrors(t *testing.T) {
	s := newFakeServer(t, newFakeStore(1<<16))
	s.errnoFor = func(cmd uint16, off uint64) uint32 {
		switch {
		case cmd == cmdWrite && off == 512:
			return uint32(EIO)
		case cmd == cmdRead && off == 1024:
			return uint32(ENOSPC)
		case cmd == cmdWrite && off == 2048:
			return uint32(ESHUTDOWN)
		}
		return 0
	}
	cl := dialFake(t, s, "disk")
	ctx := context.Background()
	err := cl.Write(ctx, 512, make([]byte, 512), false)
	var se *ServerError
	if !errors.Is(err, EIO) || !errors.As(err, &se) || se.Errno != EIO || se.Cmd != "write" || se.Offset != 512 {
		t.Fatalf("write: %v", err)
	}
	if err := cl.Read(ctx, 1024, make([]byte, 512)); !errors.Is(err, ENOSPC) {
		t.Fatalf("read: %v", err)
	}
	// The connection survives error replies.
	if err := cl.Read(ctx, 0, make([]byte, 512)); err != nil {
		t.Fatal(err)
	}
	// Past the end: the server's EINVAL comes back.
	if err := cl.Read(ctx, 1<<16, make([]byte, 512)); !errors.Is(err, EINVAL) {
		t.Fatalf("read past end: %v", err)
	}
	// ESHUTDOWN makes the client disconnect softly.
	if err := cl.Write(ctx, 2048, make([]byte, 512), false); !errors.Is(err, ESHUTDOWN) {
		t.Fatalf("write: %v", err)
	}
	pollUntil(t, 5*time.Second, "soft disconnect after ESHUTDOWN", func() bool { return s.discCount() == 1 })
	<-cl.Done()
	if cl.Err() == nil {
		t.Fatal("Err() is nil after ESHUTDOWN")
	}
	if err := cl.Read(ctx, 0, make([]byte, 512)); err == nil {
		t.Fatal("read after ESHUTDOWN succeeded")
	}
}

func TestClientReadOnlyAndUnsupported(t *testing.T) {
	s := newFakeServer(t, newFakeStore(1<<16))
	s.flags = FlagHasFlags | FlagReadOnly
	cl := dialFake(t, s, "disk")
	if !cl.ReadOnly() || cl.CanFlush() || cl.CanFUA() {
		t.Fatalf("flags %#x", cl.TransmissionFlags())
	}
	ctx := context.Background()
	if err := cl.Write(ctx, 0, make([]byte, 512), false); !errors.Is(err, EPERM) {
		t.Fatalf("write on read-only export: %v", err)
	}
	if err := cl.Write(ctx, 0, make([]byte, 512), true); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("FUA write without NBD_FLAG_SEND_FUA: %v", err)
	}
	if err := cl.Flush(ctx); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("flush without NBD_FLAG_SEND_FLUSH: %v", err)
	}
}

func TestClientProtocolViolations(t *testing.T) {
	for _, tc := range []struct {
		name  string
		setup func(*fakeServer)
	}{
		{"unknown cookie", func(s *fakeServer) { s.badCookie = true }},
		{"structured reply", func(s *fakeServer) { s.structured = true }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newFakeServer(t, newFakeStore(1<<16))
			tc.setup(s)
			cl := dialFake(t, s, "disk")
			err := cl.Read(context.Background(), 0, make([]byte, 512))
			if !errors.Is(err, ErrProtocol) || !errors.Is(err, ErrDisconnected) {
				t.Fatalf("err = %v, want ErrProtocol and ErrDisconnected", err)
			}
			<-cl.Done()
		})
	}
}

func TestClientContextExpiry(t *testing.T) {
	s := newFakeServer(t, newFakeStore(1<<16))
	s.blackhole = true
	cl := dialFake(t, s, "disk")

	// Several requests outstanding; one of them times out.
	const others = 4
	errs := make(chan error, others)
	for i := 0; i < others; i++ {
		go func() { errs <- cl.Write(context.Background(), uint64(i*512), make([]byte, 512), false) }()
	}
	pollUntil(t, 5*time.Second, "requests at the server", func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.requests >= others
	})
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	err := cl.Read(ctx, 0, make([]byte, 512))
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("read: %v", err)
	}
	for i := 0; i < others; i++ {
		if err := <-errs; !errors.Is(err, ErrDisconnected) || !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("outstanding write: %v", err)
		}
	}
	<-cl.Done()
	if !errors.Is(cl.Err(), ErrDisconnected) {
		t.Fatalf("Err() = %v", cl.Err())
	}
	// An already-expired context sends nothing and fails at once.
	if err := cl.Flush(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("flush: %v", err)
	}
}

func TestClientHandshakeContext(t *testing.T) {
	s := newFakeServer(t, newFakeStore(1<<16))
	s.silent = true
	addr := s.start()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := Dial(ctx, nil, addr, "disk")
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Dial: %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("Dial took %v", d)
	}
}

func TestClientInjectedDial(t *testing.T) {
	s := newFakeServer(t, newFakeStore(1<<16))
	real := s.start()
	var dialed []string
	dial := func(ctx context.Context, addr string) (net.Conn, error) {
		dialed = append(dialed, addr)
		return DefaultDial(ctx, real)
	}
	cl, err := Dial(context.Background(), dial, "site-a", "disk")
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if len(dialed) != 1 || dialed[0] != "site-a" {
		t.Fatalf("dialed %v", dialed)
	}
	if _, err := Dial(context.Background(), func(context.Context, string) (net.Conn, error) {
		return nil, errors.New("no route")
	}, "site-b", "disk"); err == nil || !strings.Contains(err.Error(), "no route") {
		t.Fatalf("failing dial: %v", err)
	}
}

// startNbdkit runs `nbdkit memory` on a Unix socket; extra are arguments
// placed before the plugin (filters) and after it (parameters).
func startNbdkit(t *testing.T, filters []string, params ...string) string {
	t.Helper()
	bin := harness.RequireTool(t, "nbdkit")
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	args := []string{"-f", "-U", sock, "--exit-with-parent"}
	args = append(args, filters...)
	args = append(args, "memory", "64M")
	args = append(args, params...)
	cmd := exec.Command(bin, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting nbdkit: %v", err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("nbdkit stderr:\n%s", stderr.String())
		}
	})
	pollUntil(t, 10*time.Second, "nbdkit socket", func() bool {
		select {
		case <-exited:
			t.Fatalf("nbdkit exited: %s", stderr.String())
		default:
		}
		c, err := net.Dial("unix", sock)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	return "unix:" + sock
}

func TestNbdkitClient(t *testing.T) {
	addr := startNbdkit(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	cl, err := Dial(ctx, nil, addr, "")
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if cl.Size() != 64<<20 || !cl.CanFlush() || cl.ReadOnly() {
		t.Fatalf("size %d flags %#x", cl.Size(), cl.TransmissionFlags())
	}
	// Pipelined writes from many goroutines, then reads, then a flush.
	const n = 64
	var wg sync.WaitGroup
	errs := make(chan error, 2*n)
	block := func(i int) []byte { return bytes.Repeat([]byte{byte(i), byte(i >> 8), 0xA5, 0x5A}, 1024) }
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- cl.Write(ctx, uint64(i)*4096, block(i), i%3 == 0 && cl.CanFUA())
		}()
	}
	wg.Wait()
	if err := cl.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 4096)
			if err := cl.Read(ctx, uint64(i)*4096, buf); err != nil {
				errs <- err
				return
			}
			if !bytes.Equal(buf, block(i)) {
				errs <- fmt.Errorf("block %d differs", i)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	// Past the end of the export: an error reply, and the connection
	// carries on.
	var se *ServerError
	if err := cl.Read(ctx, 64<<20, make([]byte, 512)); !errors.As(err, &se) {
		t.Fatalf("read past the end: %v", err)
	}
	if err := cl.Read(ctx, 0, make([]byte, 512)); err != nil {
		t.Fatal(err)
	}
}

func TestNbdkitRefusedExport(t *testing.T) {
	addr := startNbdkit(t, []string{"--filter=exportname"}, "exportname=good", "exportname-strict=true")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := Dial(ctx, nil, addr, "bad")
	if !errors.Is(err, ErrOptionRefused) {
		t.Fatalf("Dial to a refused export: %v", err)
	}
	var oe *OptionError
	if !errors.As(err, &oe) || !strings.HasPrefix(oe.Code.Error(), "NBD_REP_ERR_") || !strings.Contains(err.Error(), oe.Code.Error()+": ") {
		t.Fatalf("error %v does not name the reply type", err)
	}
	t.Logf("nbdkit refused with: %v", err)
	cl, err := Dial(ctx, nil, addr, "good")
	if err != nil {
		t.Fatal(err)
	}
	cl.Close()
}
