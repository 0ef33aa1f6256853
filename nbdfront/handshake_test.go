package nbdfront

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestGreeting(t *testing.T) {
	e := newEnv(t, nil)
	c := e.dial()
	if hs := c.greet(clientFlagFixedNewstyle); hs != hsFlagFixedNewstyle|hsFlagNoZeroes {
		t.Fatalf("handshake flags %#x", hs)
	}
	c.mustAck(optAbort, nil)
	c.expectClosed()
}

func TestUnknownClientFlagsClose(t *testing.T) {
	e := newEnv(t, nil)
	for _, f := range []uint32{1 << 2, 1 << 31, clientFlagFixedNewstyle | 1<<5} {
		c := e.dialGreet(f)
		c.expectClosed()
	}
}

func TestExportName(t *testing.T) {
	for _, noZeroes := range []bool{false, true} {
		t.Run(fmt.Sprintf("noZeroes=%v", noZeroes), func(t *testing.T) {
			e := newEnv(t, nil)
			want := pattern(4096, 3)
			if _, err := e.disk.WriteAt(want, 8192); err != nil {
				t.Fatal(err)
			}
			flags := clientFlagFixedNewstyle
			if noZeroes {
				flags |= clientFlagNoZeroes
			}
			c := e.dialGreet(flags)
			c.sendOption(optExportName, []byte("disk"))
			r := c.readN(exportNameReplyLen)
			if size := binary.BigEndian.Uint64(r); size != testSize {
				t.Fatalf("size %d", size)
			}
			tf := binary.BigEndian.Uint16(r[8:])
			wantFlags := tFlagHasFlags | tFlagSendFlush | tFlagSendFUA | tFlagSendCache | tFlagSendTrim |
				tFlagSendWriteZeroes | tFlagSendFastZero | tFlagCanMultiConn
			if tf != wantFlags {
				t.Fatalf("transmission flags %#x, want %#x", tf, wantFlags)
			}
			if !noZeroes {
				pad := c.readN(exportNamePadding)
				for i, b := range pad {
					if b != 0 {
						t.Fatalf("padding byte %d = %d", i, b)
					}
				}
			}
			// The next bytes must be the reply to this read, so padding
			// was exactly right.
			res := c.mustOK(0, cmdRead, 8192, 4096, nil)
			mustEqual(t, "read", res.data, want)
			c.disc()
			c.expectClosed()
		})
	}
}

func TestExportNameDefault(t *testing.T) {
	e := newEnv(t, nil)
	c := e.dialGreet(clientFlagFixedNewstyle | clientFlagNoZeroes)
	c.sendOption(optExportName, nil)
	r := c.readN(exportNameReplyLen)
	if size := binary.BigEndian.Uint64(r); size != testSize {
		t.Fatalf("size %d", size)
	}
	c.mustOK(0, cmdFlush, 0, 0, nil)
}

func TestExportNameFailuresClose(t *testing.T) {
	e := newEnv(t, nil)
	c := e.dialGreet(clientFlagFixedNewstyle)
	c.sendOption(optExportName, []byte("nope"))
	c.expectClosed()

	c = e.dialGreet(clientFlagFixedNewstyle)
	c.sendOption(optExportName, []byte(strings.Repeat("x", maxStringLen+1)))
	c.expectClosed()

	// Oversized EXPORT_NAME: closed without reading the data.
	c = e.dialGreet(clientFlagFixedNewstyle)
	h := binary.BigEndian.AppendUint64(nil, magicOption)
	h = binary.BigEndian.AppendUint32(h, optExportName)
	h = binary.BigEndian.AppendUint32(h, 1<<30)
	c.write(h)
	c.expectClosed()
}

func TestList(t *testing.T) {
	e := newEnv(t, nil)
	c := e.dialGreet(clientFlagFixedNewstyle)
	rs := c.option(optList, nil)
	if len(rs) != 3 || rs[2].typ != repAck {
		t.Fatalf("LIST replies %+v", rs)
	}
	var got []string
	for _, r := range rs[:2] {
		if r.typ != repServer {
			t.Fatalf("reply type %#x", r.typ)
		}
		n := binary.BigEndian.Uint32(r.data)
		got = append(got, string(r.data[4:4+n])+"|"+string(r.data[4+n:]))
	}
	if want := "disk|test disk,ro|"; strings.Join(got, ",") != want {
		t.Fatalf("LIST = %q, want %q", got, want)
	}
	c.expectErr(optList, []byte{0}, repErrInvalid)
	// Still negotiating.
	c.goExport("disk")
}

func TestInfoAndGo(t *testing.T) {
	e := newEnv(t, nil)
	c := e.dialGreet(clientFlagFixedNewstyle | clientFlagNoZeroes)

	check := func(rs []optReply, wantName bool) {
		t.Helper()
		if rs[len(rs)-1].typ != repAck {
			t.Fatalf("final reply %#x %q", rs[len(rs)-1].typ, rs[len(rs)-1].data)
		}
		infos := infoReplies(t, rs)
		ex := infos[infoExport]
		if binary.BigEndian.Uint64(ex) != testSize {
			t.Fatalf("size %d", binary.BigEndian.Uint64(ex))
		}
		bs := infos[infoBlockSize]
		if len(bs) != 12 {
			t.Fatalf("block size info %x", bs)
		}
		min, pref, max := binary.BigEndian.Uint32(bs), binary.BigEndian.Uint32(bs[4:]), binary.BigEndian.Uint32(bs[8:])
		if min != 1 || pref != 4096 || max != 256<<10 {
			t.Fatalf("block sizes %d/%d/%d", min, pref, max)
		}
		if wantName {
			if string(infos[infoName]) != "disk" || string(infos[infoDescription]) != "test disk" {
				t.Fatalf("name %q description %q", infos[infoName], infos[infoDescription])
			}
		} else if _, ok := infos[infoName]; ok {
			t.Fatalf("unrequested NBD_INFO_NAME sent")
		}
	}

	// INFO with every request type, a duplicate and an unknown one.
	check(c.option(optInfo, goData("disk", infoName, infoDescription, infoBlockSize, infoName, 999)), true)
	check(c.option(optInfo, goData("disk")), false)
	msg := c.expectErr(optInfo, goData("missing", infoName), repErrUnknown)
	if !strings.Contains(msg, "missing") {
		t.Fatalf("error message %q does not name the export", msg)
	}
	c.expectErr(optGo, goData("missing"), repErrUnknown)

	// Malformed INFO/GO data.
	for _, bad := range [][]byte{
		nil,
		{0, 0, 0},
		{0, 0, 0, 10, 'd'},       // name longer than data
		{0, 0, 0, 0},             // missing count
		{0, 0, 0, 0, 0, 2, 0, 1}, // 2 infos, one present
		{0, 0, 0, 0, 0, 0, 9},    // trailing byte
		binary.BigEndian.AppendUint32(nil, 0xffffffff), // huge name length
		append(binary.BigEndian.AppendUint32(nil, maxStringLen+1), make([]byte, maxStringLen+3)...),
	} {
		c.expectErr(optInfo, bad, repErrInvalid)
		c.expectErr(optGo, bad, repErrInvalid)
	}

	rs := c.option(optGo, goData("disk", infoName, infoDescription))
	check(rs, true)
	res := c.mustOK(0, cmdWrite, 0, 4, []byte("abcd"))
	_ = res
	mustEqual(t, "device", e.disk.bytes(0, 4), []byte("abcd"))
}

func TestAbortWithData(t *testing.T) {
	e := newEnv(t, nil)
	c := e.dialGreet(clientFlagFixedNewstyle)
	c.mustAck(optAbort, []byte("ignored"))
	c.expectClosed()
}

func TestStructuredReplyOption(t *testing.T) {
	e := newEnv(t, nil)
	c := e.dialGreet(clientFlagFixedNewstyle)
	c.expectErr(optStructuredReply, []byte{1}, repErrInvalid)
	c.mustAck(optStructuredReply, nil)
	c.mustAck(optStructuredReply, nil) // repeating is harmless
	_, flags := c.goExport("disk")
	if flags&tFlagSendDF == 0 {
		t.Fatalf("SEND_DF not set with structured replies: %#x", flags)
	}
	c2, flags := e.open("disk", false, false)
	if flags&tFlagSendDF != 0 {
		t.Fatalf("SEND_DF set without structured replies: %#x", flags)
	}
	c2.disc()
}

func TestStartTLSUnsupported(t *testing.T) {
	e := newEnv(t, nil)
	c := e.dialGreet(clientFlagFixedNewstyle)
	if msg := c.expectErr(optStartTLS, nil, repErrUnsup); msg == "" {
		t.Fatalf("no message with STARTTLS refusal")
	}
	c.expectErr(optStartTLS, []byte{1}, repErrInvalid)
	c.goExport("disk")
}

func TestUnknownOptions(t *testing.T) {
	e := newEnv(t, nil)
	c := e.dialGreet(clientFlagFixedNewstyle)
	for _, opt := range []uint32{0, optPeekExport, optExtendedHeaders, 12, 1000, 0xffffffff} {
		c.expectErr(opt, []byte("some data"), repErrUnsup)
	}
	c.goExport("disk")
}

func TestOversizedOptions(t *testing.T) {
	e := newEnv(t, nil)
	c := e.dialGreet(clientFlagFixedNewstyle)
	big := make([]byte, maxOptionData+1)
	c.expectErr(optGo, big, repErrTooBig)
	c.expectErr(optList, big, repErrTooBig)
	c.expectErr(777, big, repErrUnsup)
	c.goExport("disk") // stream stayed in sync

	c = e.dialGreet(clientFlagFixedNewstyle)
	c.mustAck(optAbort, big)
	c.expectClosed()

	// Beyond the discard limit the server disconnects without reading.
	c = e.dialGreet(clientFlagFixedNewstyle)
	h := binary.BigEndian.AppendUint64(nil, magicOption)
	h = binary.BigEndian.AppendUint32(h, optInfo)
	h = binary.BigEndian.AppendUint32(h, maxOptionDiscard+1)
	c.write(h)
	c.expectClosed()
}

func TestBadOptionMagic(t *testing.T) {
	e := newEnv(t, nil)
	c := e.dialGreet(clientFlagFixedNewstyle)
	b := binary.BigEndian.AppendUint64(nil, magicOption+1)
	b = binary.BigEndian.AppendUint32(b, optList)
	b = binary.BigEndian.AppendUint32(b, 0)
	c.write(b)
	c.expectClosed()
}

func TestTruncatedHandshake(t *testing.T) {
	e := newEnv(t, nil)
	for _, tail := range [][]byte{
		{0, 0},                 // short client flags
		{0, 0, 0, 1, 'I', 'H'}, // short option header
		append([]byte{0, 0, 0, 1}, append(binary.BigEndian.AppendUint64(nil, magicOption), 0, 0, 0, 7, 0, 0, 0, 20, 0)...), // short data
	} {
		c := e.dial()
		c.readN(greetingLen)
		c.write(tail)
		c.conn.(interface{ CloseWrite() error }).CloseWrite()
		c.expectClosed()
	}
	// The server is still fine.
	c, _ := e.open("disk", false, false)
	c.mustOK(0, cmdFlush, 0, 0, nil)
}

func TestHandshakeTimeout(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.HandshakeTimeout = 100 * time.Millisecond })
	c := e.dialGreet(clientFlagFixedNewstyle)
	start := time.Now()
	c.expectClosed()
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("closed after %v", d)
	}
	// The deadline does not apply after the handshake.
	c2, _ := e.open("disk", false, false)
	time.Sleep(300 * time.Millisecond)
	c2.mustOK(0, cmdFlush, 0, 0, nil)
}

func TestMetaContextOptions(t *testing.T) {
	e := newEnv(t, nil)
	noBS := newMemDevice(4096)
	e.be.mu.Lock()
	e.be.exports["nobs"] = &memTarget{info: ExportInfo{Name: "nobs", Size: 4096}, dev: noBS}
	e.be.mu.Unlock()

	c := e.dialGreet(clientFlagFixedNewstyle)
	// SET requires structured replies.
	c.expectErr(optSetMetaContext, metaData("disk", metaBaseAllocation), repErrInvalid)

	// LIST works without, and lists base:allocation for no query, "base:"
	// and the exact name; unknown namespaces are ignored.
	listOne := func(queries ...string) []optReply {
		t.Helper()
		return c.option(optListMetaContext, metaData("disk", queries...))
	}
	for _, q := range [][]string{nil, {"base:"}, {metaBaseAllocation}, {"x-foo:bar", "base:allocation"}} {
		rs := listOne(q...)
		if len(rs) != 2 || rs[0].typ != repMetaContext || rs[1].typ != repAck {
			t.Fatalf("LIST %q: %+v", q, rs)
		}
		if id := binary.BigEndian.Uint32(rs[0].data); id != 0 {
			t.Fatalf("LIST context id %d, want 0", id)
		}
		if name := string(rs[0].data[4:]); name != metaBaseAllocation {
			t.Fatalf("LIST context %q", name)
		}
	}
	for _, q := range [][]string{{"x-foo:bar"}, {"base:nothing"}, {"qemu:dirty-bitmap:x"}} {
		if rs := listOne(q...); len(rs) != 1 || rs[0].typ != repAck {
			t.Fatalf("LIST %q: %+v", q, rs)
		}
	}
	c.expectErr(optListMetaContext, metaData("disk", "nocolon"), repErrInvalid)
	c.expectErr(optListMetaContext, metaData("missing"), repErrUnknown)
	if rs := c.option(optListMetaContext, metaData("nobs")); len(rs) != 1 || rs[0].typ != repAck {
		t.Fatalf("LIST on export without block status: %+v", rs)
	}

	c.mustAck(optStructuredReply, nil)
	// Malformed requests.
	for _, bad := range [][]byte{
		nil,
		{0, 0, 0, 0},
		{0, 0, 0, 0, 0, 0, 0, 1}, // one query, none present
		{0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 9, 'b'},      // query longer than data
		append(metaData("disk", "base:allocation"), 0), // trailing byte
		metaData("disk", ":"+strings.Repeat("x", maxStringLen)),
		{0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff}, // absurd count
	} {
		c.expectErr(optSetMetaContext, bad, repErrInvalid)
	}
	// "base:" selects nothing in SET.
	if rs := c.option(optSetMetaContext, metaData("disk", "base:")); len(rs) != 1 || rs[0].typ != repAck {
		t.Fatalf("SET base: %+v", rs)
	}
	rs := c.option(optSetMetaContext, metaData("disk", metaBaseAllocation, metaBaseAllocation))
	if len(rs) != 2 || rs[0].typ != repMetaContext || rs[1].typ != repAck {
		t.Fatalf("SET: %+v", rs)
	}
	if id := binary.BigEndian.Uint32(rs[0].data); id == 0 || string(rs[0].data[4:]) != metaBaseAllocation {
		t.Fatalf("SET reply id %d name %q", id, rs[0].data[4:])
	}
	c.expectErr(optSetMetaContext, metaData("missing", metaBaseAllocation), repErrUnknown)
	// The failed SET cleared the selection: block status is refused.
	c.goExport("disk")
	c.expectErrno(0, cmdBlockStatus, 0, 4096, nil, EINVAL)
}

func TestMetaContextMustMatchExport(t *testing.T) {
	e := newEnv(t, nil)
	c := e.dialGreet(clientFlagFixedNewstyle)
	c.mustAck(optStructuredReply, nil)
	rs := c.option(optSetMetaContext, metaData("ro", metaBaseAllocation))
	if len(rs) != 2 {
		t.Fatalf("SET: %+v", rs)
	}
	c.goExport("disk") // different export: no context
	c.expectErrno(0, cmdBlockStatus, 0, 4096, nil, EINVAL)
}

func TestBackendErrors(t *testing.T) {
	e := newEnv(t, nil)
	for _, tc := range []struct {
		err  error
		want uint32
	}{
		{ErrUnknownExport, repErrUnknown},
		{fmt.Errorf("wrapped: %w", ErrReadOnly), repErrPolicy},
		{fmt.Errorf("held elsewhere: %w", ErrBusy), repErrPolicy},
		{syscall.EACCES, repErrPolicy},
		{ErrShutdown, repErrShutdown},
		{ErrInvalidArgument, repErrInvalid},
		{errors.New("raft: no leader"), repErrUnknown},
	} {
		e.be.mu.Lock()
		e.be.openErr = tc.err
		e.be.mu.Unlock()
		c := e.dialGreet(clientFlagFixedNewstyle)
		msg := c.expectErr(optGo, goData("disk"), tc.want)
		if msg != tc.err.Error() {
			t.Fatalf("message %q, want %q", msg, tc.err.Error())
		}
		c.expectErr(optInfo, goData("disk"), tc.want)
		c.mustAck(optAbort, nil)
	}
	e.be.mu.Lock()
	e.be.openErr = nil
	e.be.mu.Unlock()
}

type panicBackend struct{ Backend }

func (panicBackend) Open(string) (Export, error)     { panic("open exploded") }
func (panicBackend) Info(string) (ExportInfo, error) { panic("info exploded") }
func (panicBackend) List() ([]ExportInfo, error)     { panic("list exploded") }

func TestBackendPanics(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.Backend = panicBackend{} })
	c := e.dialGreet(clientFlagFixedNewstyle)
	c.expectErr(optGo, goData("disk"), repErrUnknown)
	c.expectErr(optInfo, goData("disk"), repErrUnknown)
	c.expectErr(optList, nil, repErrUnknown)
	c.expectErr(optListMetaContext, metaData("disk"), repErrUnknown)
	c.mustAck(optAbort, nil)
}

func TestMisconfiguredExport(t *testing.T) {
	for _, info := range []ExportInfo{
		{Name: "bad", Size: -1},
		{Name: "bad", Size: 4096, MinBlock: 3},
		{Name: "bad", Size: 4096, MinBlock: 128 << 10},
		{Name: "bad", Size: 4096, PrefBlock: 256},
		{Name: "bad", Size: 4096, MinBlock: 4096, PrefBlock: 2048},
		{Name: "bad", Size: 4096, PrefBlock: 65536, MaxBlock: 4096},
	} {
		e := newEnv(t, nil)
		e.be.add(info)
		c := e.dialGreet(clientFlagFixedNewstyle)
		c.expectErr(optGo, goData("bad"), repErrUnknown)
		c.expectErr(optInfo, goData("bad"), repErrUnknown)
		c.mustAck(optAbort, nil)
	}
}

func TestNormalizeInfo(t *testing.T) {
	got, err := normalizeInfo(ExportInfo{Size: 10, MaxBlock: 1 << 30, CanFastZero: true}, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if got.MinBlock != 1 || got.PrefBlock != 4096 || got.MaxBlock != 1<<20 || got.CanFastZero {
		t.Fatalf("normalized %+v", got)
	}
	got, err = normalizeInfo(ExportInfo{Size: 10, MinBlock: 8192}, 1<<20)
	if err != nil || got.PrefBlock != 8192 {
		t.Fatalf("normalized %+v, %v", got, err)
	}
}

func TestNonFixedNewstyleClient(t *testing.T) {
	// A client that does not set NBD_FLAG_C_FIXED_NEWSTYLE is still served.
	e := newEnv(t, nil)
	c := e.dialGreet(0)
	c.sendOption(optExportName, []byte("disk"))
	c.readN(exportNameReplyLen + exportNamePadding)
	c.mustOK(0, cmdWrite, 0, 3, []byte("xyz"))
}
