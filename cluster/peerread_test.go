package cluster

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Every malformed peer read is a 400 with its reason, through the real
// handler and in the parser alone; none reaches the volume.
func TestPeerReadBadInput(t *testing.T) {
	const size = 64 << 10
	s := newHealSites(t, size, "a")[0]
	writeAt(randData(10, size), 0, s) // index 1
	for _, c := range []struct{ query, reason string }{
		{"", `missing parameter "volume"`},
		{"volume=v&off=0&len=10", `missing parameter "min_index"`},
		{"volume=v&len=10&min_index=0", `missing parameter "off"`},
		{"volume=v&off=0&min_index=0", `missing parameter "len"`},
		{"volume=v&off=0&len=10&min_index=0&x=1", `unknown parameter "x"`},
		{"volume=v&volume=w&off=0&len=10&min_index=0", `parameter "volume" given 2 times`},
		{"volume=v&off=0&off=0&len=10&min_index=0", `parameter "off" given 2 times`},
		{"volume=&off=0&len=10&min_index=0", "volume: "},
		{"volume=..&off=0&len=10&min_index=0", "volume: "},
		{"volume=a%2Fb&off=0&len=10&min_index=0", "volume: "},
		{"volume=v&off=-1&len=10&min_index=0", `off="-1" is not a decimal number`},
		{"volume=v&off=%2B1&len=10&min_index=0", `off="+1" is not a decimal number`},
		{"volume=v&off=01&len=10&min_index=0", `off="01" is not a decimal number`},
		{"volume=v&off=1e3&len=10&min_index=0", `off="1e3" is not a decimal number`},
		{"volume=v&off=0x10&len=10&min_index=0", `off="0x10" is not a decimal number`},
		{"volume=v&off=&len=10&min_index=0", `off="" is not a decimal number`},
		{"volume=v&off=123456789012345678901&len=10&min_index=0", "is not a decimal number"},
		{"volume=v&off=1125899906842625&len=10&min_index=0", "off=1125899906842625 is out of range"},
		{"volume=v&off=0&len=0&min_index=0", "len=0: nothing to read"},
		{"volume=v&off=0&len=4194305&min_index=0", "len=4194305 is out of range (at most 4194304)"},
		{"volume=v&off=0&len=-5&min_index=0", `len="-5" is not a decimal number`},
		{"volume=v&off=0&len=10&min_index=abc", `min_index="abc" is not a decimal number`},
		{"volume=v&off=0&len=10&min_index=18446744073709551616", "min_index=18446744073709551616 is out of range"},
		{"volume=v&off=0&len=10&min_index=0&%zz", "query: "},
		{"volume=v;off=0&len=10&min_index=0", "query: "},
		{"volume=v&off=65536&len=1&min_index=0", "out of range (size 65536 at index 1)"},
		{"volume=v&off=65000&len=1000&min_index=0", "out of range (size 65536 at index 1)"},
	} {
		resp, err := http.Get("http://" + s.api + pathRead + "?" + c.query)
		if err != nil {
			t.Fatal(err)
		}
		e := statusError(resp)
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest || !errors.Is(e, ErrInvalidRequest) || !strings.Contains(e.Error(), c.reason) {
			t.Errorf("query %q: %d %v, want 400 saying %q", c.query, resp.StatusCode, e, c.reason)
		}
		if _, err := parseReadQuery(c.query); err == nil && !strings.Contains(c.reason, "out of range (size") {
			t.Errorf("query %q parsed", c.query)
		}
	}
	// The handler mounted under the other verbs' paths answers no POST.
	resp, err := http.Post("http://"+s.api+pathRead+"?volume=v&off=0&len=1&min_index=0", "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("POST: %d", resp.StatusCode)
	}
}

// The read serves exactly the bytes asked for, at an index at or above
// the one asked for, after waiting for it; a site that does not reach it
// refuses (503).
func TestPeerReadWaitsForIndex(t *testing.T) {
	const size = 64 << 10
	s := newHealSites(t, size, "a")[0]
	data := randData(11, size)
	writeAt(data, 0, s) // 1
	c := s.heal.rpc.(*rpcClient)
	done := make(chan error, 1)
	go func() {
		got, idx, err := c.readRange(testCtx(t), s.api, "v", 100, 1000, 3)
		switch {
		case err != nil:
		case idx < 3:
			err = fmt.Errorf("index %d below 3", idx)
		case !bytes.Equal(got, data[100:1100]):
			err = errors.New("wrong bytes")
		}
		done <- err
	}()
	writeAt(data[:1], 0, s) // 2
	writeAt(data[:1], 0, s) // 3
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	s.heal.catchUp = 10 * time.Millisecond
	if _, _, err := c.readRange(testCtx(t), s.api, "v", 0, 10, 9); !errors.Is(err, ErrPeerRefused) || !strings.Contains(err.Error(), "it has applied index 3, the read needs 9") {
		t.Fatalf("behind: %v", err)
	}
	// A read longer than one boundary read, across several.
	big := newHealSites(t, 3<<20, "b")[0]
	bigData := randData(12, 3<<20)
	writeAt(bigData, 0, big)
	got, _, err := c.readRange(testCtx(t), big.api, "v", 1000, 3<<20-2000, 0)
	if err != nil || !bytes.Equal(got, bigData[1000:3<<20-1000]) {
		t.Fatalf("read across boundary reads: %v", err)
	}
}

// A peer read served while entries are applied never returns a torn
// range or bytes newer than the index it names: every boundary read (1
// MiB) holds one entry's bytes (entry i fills the volume with i as 8-byte
// words, in eight ops), of an entry at or below that index.
func TestPeerReadUntornUnderApply(t *testing.T) {
	const size, reads = 2 << 20, 30 // two boundary reads
	s := newHealSites(t, size, "a")[0]
	fill := func(i uint64) []byte {
		b := make([]byte, size/8)
		for o := 0; o < len(b); o += 8 {
			binary.BigEndian.PutUint64(b[o:], i)
		}
		return b
	}
	c := s.heal.rpc.(*rpcClient)
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		for i := uint64(1); ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			b := fill(i)
			s.fsm.apply(func() {
				for o := int64(0); o < size; o += size / 8 {
					s.vol.write(b, o)
				}
			})
		}
	}()
	defer func() { close(stop); <-done }()
	moved := 0
	var last uint64
	for range reads {
		got, idx, err := c.readRange(testCtx(t), s.api, "v", 0, size, 0)
		if err != nil {
			t.Fatal(err)
		}
		if idx != last {
			moved++
		}
		last = idx
		for half := 0; half < 2; half++ {
			part := got[half<<20 : (half+1)<<20]
			j := binary.BigEndian.Uint64(part)
			if bytes.Count(part, part[:8]) != len(part)/8 {
				t.Fatalf("a boundary read is torn")
			}
			if j > idx {
				t.Fatalf("bytes of entry %d in a read at index %d", j, idx)
			}
		}
	}
	if moved < reads/2 {
		t.Fatalf("the apply loop hardly ran during the reads (%d index changes in %d reads)", moved, reads)
	}
}

// The wire format of the peer read (version 1) is frozen: the request
// path, the answer's status, headers and body. The golden answer parses
// back to the bytes and the index.
func TestPeerReadGolden(t *testing.T) {
	v := newFakeVolume("vol-1", 64<<10)
	f := newFakeFSM()
	body := make([]byte, 16)
	for i := range body {
		body[i] = byte(i * 17)
	}
	for range 9 {
		f.apply(nil)
	}
	v.write(body, 4096)
	h := &healer{self: "a", log: slog.New(slog.DiscardHandler), fsm: f, vols: fakeVolumes{"vol-1": v},
		readSlots: make(chan struct{}, 1), catchUp: time.Second}
	path := readPath("vol-1", 4096, 16, 7)
	rec := httptest.NewRecorder()
	h.handleRead(rec, httptest.NewRequest(http.MethodGet, path, nil))
	var b strings.Builder
	fmt.Fprintf(&b, "GET %s\n%d\n", path, rec.Code)
	keys := slices.Sorted(func(yield func(string) bool) {
		for k := range rec.Header() {
			if !yield(k) {
				return
			}
		}
	})
	for _, k := range keys {
		fmt.Fprintf(&b, "%s: %s\n", k, strings.Join(rec.Header().Values(k), ","))
	}
	fmt.Fprintf(&b, "\n%s\n", hex.EncodeToString(rec.Body.Bytes()))
	got := b.String()
	file := filepath.Join("testdata", "peer-read.v1")
	if *updateGolden {
		if err := os.WriteFile(file, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if got != string(want) {
		t.Fatalf("peer read format changed (needs a version bump):\n%s\nwant (frozen):\n%s", got, want)
	}
	// Parse the frozen answer as a client does.
	sc := bufio.NewScanner(strings.NewReader(string(want)))
	sc.Scan() // request
	sc.Scan() // status
	hdr := http.Header{}
	var clen int64
	for sc.Scan() && sc.Text() != "" {
		k, val, _ := strings.Cut(sc.Text(), ": ")
		hdr.Add(k, val)
		if k == "Content-Length" {
			clen, _ = strconv.ParseInt(val, 10, 64)
		}
	}
	sc.Scan()
	raw, err := hex.DecodeString(sc.Text())
	if err != nil {
		t.Fatal(err)
	}
	data, idx, err := parseReadResponse(hdr, clen, bytes.NewReader(raw), 16, 7)
	if err != nil || idx != 9 || !bytes.Equal(data, body) {
		t.Fatalf("golden answer parses to %x at %d, %v", data, idx, err)
	}
	if !strings.HasPrefix(string(want), "GET /internal/v1/read?volume=vol-1&off=4096&len=16&min_index=7\n200\n") {
		t.Fatalf("unexpected request line:\n%s", want)
	}
}

// Answers a client must not accept.
func TestPeerReadBadAnswers(t *testing.T) {
	ok := func() http.Header {
		return http.Header{headerReadVersion: {"1"}, headerReadIndex: {"9"}}
	}
	body := bytes.Repeat([]byte{7}, 16)
	for _, c := range []struct {
		name   string
		edit   func(http.Header)
		clen   int64
		body   []byte
		min    uint64
		reason string
	}{
		{"no version", func(h http.Header) { h.Del(headerReadVersion) }, 16, body, 0, "Robib-Read-Version"},
		{"version 2", func(h http.Header) { h.Set(headerReadVersion, "2") }, 16, body, 0, "reads version 1"},
		{"two versions", func(h http.Header) { h.Add(headerReadVersion, "1") }, 16, body, 0, "Robib-Read-Version"},
		{"no index", func(h http.Header) { h.Del(headerReadIndex) }, 16, body, 0, "not one decimal index"},
		{"signed index", func(h http.Header) { h.Set(headerReadIndex, "+9") }, 16, body, 0, "not one decimal index"},
		{"index 09", func(h http.Header) { h.Set(headerReadIndex, "09") }, 16, body, 0, "not one decimal index"},
		{"huge index", func(h http.Header) { h.Set(headerReadIndex, "99999999999999999999") }, 16, body, 0, "value out of range"},
		{"index below the asked", func(http.Header) {}, 16, body, 10, "below the 10 asked for"},
		{"short declared", func(http.Header) {}, 15, body, 0, "content length 15"},
		{"unknown length", func(http.Header) {}, -1, body, 0, "content length -1"},
		{"short body", func(http.Header) {}, 16, body[:15], 0, "body: unexpected EOF"},
		{"long body", func(http.Header) {}, 16, append(body, 1), 0, "longer than asked"},
	} {
		h := ok()
		c.edit(h)
		_, _, err := parseReadResponse(h, c.clen, bytes.NewReader(c.body), 16, c.min)
		if err == nil || !strings.Contains(err.Error(), c.reason) {
			t.Errorf("%s: %v, want an error saying %q", c.name, err, c.reason)
		}
	}
	if _, idx, err := parseReadResponse(ok(), 16, bytes.NewReader(body), 16, 9); err != nil || idx != 9 {
		t.Fatalf("good answer: %d %v", idx, err)
	}
}

func FuzzParseReadQuery(f *testing.F) {
	f.Add("volume=v&off=0&len=10&min_index=0")
	f.Add("volume=vol-1&off=4096&len=4194304&min_index=18446744073709551615")
	f.Add("volume=v&off=01&len=10&min_index=0&x")
	f.Fuzz(func(t *testing.T, raw string) {
		q, err := parseReadQuery(raw)
		if err != nil {
			if !errors.Is(err, ErrInvalidRequest) {
				t.Fatalf("%q: error %v does not wrap ErrInvalidRequest", raw, err)
			}
			return
		}
		if q.len <= 0 || q.len > MaxPeerRead || q.off < 0 {
			t.Fatalf("%q accepted as %+v", raw, q)
		}
		_, query, _ := strings.Cut(readPath(q.volume, q.off, q.len, q.minIndex), "?")
		again, err := parseReadQuery(query)
		if err != nil || again != q {
			t.Fatalf("%q: %+v does not round-trip: %+v %v", raw, q, again, err)
		}
	})
}

func FuzzParseReadResponse(f *testing.F) {
	f.Add("1", "9", int64(4), []byte{1, 2, 3, 4}, int64(4), uint64(3))
	f.Add("1", "009", int64(4), []byte{1, 2, 3}, int64(4), uint64(3))
	f.Fuzz(func(t *testing.T, version, index string, clen int64, body []byte, length int64, minIndex uint64) {
		h := http.Header{headerReadVersion: {version}, headerReadIndex: {index}}
		data, idx, err := parseReadResponse(h, clen, bytes.NewReader(body), length, minIndex)
		if err != nil {
			return
		}
		if int64(len(data)) != length || idx < minIndex || !bytes.Equal(data, body) || strconv.FormatUint(idx, 10) != index {
			t.Fatalf("accepted %q %q %d %x for %d at %d: %x %d", version, index, clen, body, length, minIndex, data, idx)
		}
	})
}
