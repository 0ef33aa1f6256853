package dcdlog

import (
	"bufio"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

// The crash test: a child process (this test binary, re-executed) appends,
// truncates and compacts in a loop, printing each operation before it
// starts and again once it returned; the parent SIGKILLs it at a random
// moment, reopens the store and checks it against what was acknowledged.

const (
	crashDirEnv  = "DCDLOG_CRASH_DIR"
	crashTermEnv = "DCDLOG_CRASH_TERM"
	crashSegSize = 256 << 10 // small segments: rolls and recycling happen often
)

// crashSize is the data size of the child's entry i in term: mostly small,
// sometimes larger than a segment.
func crashSize(i, term uint64) int {
	h := (i*0x9e3779b97f4a7c15 ^ term*0x94d049bb133111eb) >> 7
	switch h % 40 {
	case 0:
		return 300<<10 + int(h%1000)
	case 1, 2, 3:
		return 40<<10 + int(h%10000)
	}
	return int(h % 6000)
}

func crashEntry(i, term uint64) *raft.Log { return entry(i, term, crashSize(i, term)) }

// TestCrashChild is the child's body; it runs only when re-executed.
func TestCrashChild(t *testing.T) {
	dir := os.Getenv(crashDirEnv)
	if dir == "" {
		t.Skip("only run as the crash test's child")
	}
	term, _ := strconv.ParseUint(os.Getenv(crashTermEnv), 10, 64)
	out := func(format string, a ...any) {
		// One write per line: the parent sees whole lines, in order.
		if _, err := os.Stdout.WriteString(fmt.Sprintf(format, a...) + "\n"); err != nil {
			os.Exit(3)
		}
	}
	fail := func(err error) {
		out("E %v", err)
		os.Exit(2)
	}
	s, err := Open(dir, Options{SegmentSize: crashSegSize})
	if err != nil {
		fail(err)
	}
	out("R")
	rng := rand.New(rand.NewPCG(term, 7))
	first, _ := s.FirstIndex()
	last, _ := s.LastIndex()
	next := uint64(1) // the first index when the log is empty
	for {
		switch r := rng.IntN(100); {
		case r < 8 && last > 0 && last-first > 200:
			hi := first + (last-first)/2
			out("h %d", hi)
			if err := s.DeleteRange(first, hi); err != nil {
				fail(err)
			}
			out("H")
			first = hi + 1
		case r < 14 && last > 0 && last-first > 20:
			lo := last - uint64(rng.IntN(15))
			term++ // entries written after a conflict come from a newer term
			out("t %d", lo)
			if err := s.DeleteRange(lo, last); err != nil {
				fail(err)
			}
			out("T")
			last = lo - 1
		case r < 15 && last > 0:
			// Everything goes, as after a snapshot restore; the log
			// restarts further on.
			out("d")
			if err := s.DeleteRange(first, last); err != nil {
				fail(err)
			}
			out("D")
			next = last + 1 + uint64(rng.IntN(100))
			first, last = 0, 0
		default:
			lo := last + 1
			if last == 0 {
				lo = next
			}
			n := 1 + rng.IntN(8)
			logs := make([]*raft.Log, n)
			for k := range logs {
				logs[k] = crashEntry(lo+uint64(k), term)
			}
			out("a %d %d %d", lo, lo+uint64(n)-1, term)
			if err := s.StoreLogs(logs); err != nil {
				fail(err)
			}
			out("A")
			last = lo + uint64(n) - 1
			if first == 0 {
				first = lo
			}
		}
	}
}

// crashModel is what the parent knows to be acknowledged.
type crashModel struct {
	first, last uint64
	terms       map[uint64]uint64
}

type crashOp struct {
	kind         byte // 'a', 't', 'h', 'd'
	lo, hi, term uint64
}

func TestCrashRecovery(t *testing.T) {
	if testing.Short() {
		t.Skip("crash test")
	}
	dir := t.TempDir()
	m := crashModel{terms: map[uint64]uint64{}}
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))
	start := time.Now()
	const budget = 40 * time.Second
	var runs, tornApplied, tornDropped, partial, opened int
	for runs < 400 && (time.Since(start) < budget || runs < 100) {
		runs++
		term := uint64(runs) * 1000
		cmd := exec.Command(os.Args[0], "-test.run=^TestCrashChild$", "-test.count=1")
		cmd.Env = append(os.Environ(), crashDirEnv+"="+dir, crashTermEnv+"="+strconv.FormatUint(term, 10))
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		lines := make(chan string, 1024)
		go func() {
			defer close(lines)
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				lines <- sc.Text()
			}
		}()
		// Kill at a random moment: sometimes while the child is still
		// opening (recovering), mostly while it writes.
		var got []string
		if rng.IntN(5) > 0 {
			l, ok := <-lines
			if !ok {
				t.Fatalf("run %d: the child exited before opening", runs)
			}
			got = append(got, l)
		}
		time.Sleep(time.Duration(rng.IntN(25000)) * time.Microsecond) // the crash point, not a wait for a condition
		if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		for l := range lines {
			got = append(got, l)
		}
		cmd.Wait()

		var pending *crashOp
		for _, l := range got {
			f := strings.Fields(l)
			num := func(i int) uint64 { v, _ := strconv.ParseUint(f[i], 10, 64); return v }
			switch f[0] {
			case "R":
				opened++
			case "E":
				dumpDir(t, dir)
				t.Fatalf("run %d: child failed: %s; lines %q", runs, l, got[max(0, len(got)-8):])
			case "a":
				pending = &crashOp{kind: 'a', lo: num(1), hi: num(2), term: num(3)}
			case "t":
				pending = &crashOp{kind: 't', lo: num(1)}
			case "h":
				pending = &crashOp{kind: 'h', hi: num(1)}
			case "d":
				pending = &crashOp{kind: 'd'}
			case "D":
				clear(m.terms)
				m.first, m.last, pending = 0, 0, nil
			case "A":
				for i := pending.lo; i <= pending.hi; i++ {
					m.terms[i] = pending.term
				}
				if m.first == 0 {
					m.first = pending.lo
				}
				m.last, pending = pending.hi, nil
			case "T":
				for i := pending.lo; i <= m.last; i++ {
					delete(m.terms, i)
				}
				m.last, pending = pending.lo-1, nil
			case "H":
				for i := m.first; i <= pending.hi; i++ {
					delete(m.terms, i)
				}
				m.first, pending = pending.hi+1, nil
			}
		}
		switch crashCheck(t, runs, dir, &m, pending) {
		case 1:
			tornApplied++
		case -1:
			tornDropped++
		case 2:
			partial++
		}
	}
	t.Logf("%d kills in %v (%d after the child opened); an unacknowledged append found whole %d times, in part %d, absent %d",
		runs, time.Since(start).Round(time.Millisecond), opened, tornApplied, partial, tornDropped)
	if tornApplied+partial+tornDropped < runs/4 {
		t.Fatalf("only %d of %d kills hit an append in flight: the test is not exercising crashes", tornApplied+partial+tornDropped, runs)
	}
}

// crashCheck opens the store and checks it against the acknowledged model
// and the operation in flight, then updates the model with what the
// in-flight operation left. It returns, for an append in flight, 1 if all
// of it is there, 2 if a prefix, -1 if none.
func crashCheck(t *testing.T, run int, dir string, m *crashModel, p *crashOp) int {
	t.Helper()
	s, err := Open(dir, Options{SegmentSize: crashSegSize})
	if err != nil {
		dumpDir(t, dir)
		t.Fatalf("run %d: reopen: %v", run, err)
	}
	defer s.Close()
	sf, _ := s.FirstIndex()
	sl, _ := s.LastIndex()
	bad := func(format string, a ...any) {
		t.Helper()
		t.Fatalf("run %d (in flight %+v, acknowledged %d..%d): %s", run, p, m.first, m.last, fmt.Sprintf(format, a...))
	}
	okFirst := sf == m.first ||
		(p != nil && p.kind == 'h' && sf == p.hi+1) ||
		(p != nil && p.kind == 'a' && m.first == 0 && sf == p.lo && sl >= p.lo) ||
		(p != nil && p.kind == 'd' && sf == 0 && sl == 0)
	if !okFirst {
		bad("first index %d", sf)
	}
	okLast := sl == m.last ||
		(p != nil && p.kind == 'a' && sl >= p.lo && sl <= p.hi) ||
		(p != nil && p.kind == 't' && sl == p.lo-1) ||
		(p != nil && p.kind == 'd' && sf == 0 && sl == 0)
	if !okLast {
		bad("last index %d", sl)
	}
	for i := sf; i <= sl && sl != 0; i++ {
		term, ok := m.terms[i]
		if i > m.last {
			term, ok = p.term, true
		}
		if !ok {
			bad("index %d in the store is not in the model", i)
		}
		var l raft.Log
		if err := s.GetLog(i, &l); err != nil {
			bad("GetLog(%d): %v", i, err)
		}
		sameLog(t, &l, crashEntry(i, term))
	}
	var l raft.Log
	if err := s.GetLog(sl+1, &l); err != raft.ErrLogNotFound {
		bad("GetLog(%d) past the end: %v", sl+1, err)
	}
	if sf > 1 {
		if err := s.GetLog(sf-1, &l); err != raft.ErrLogNotFound {
			bad("GetLog(%d) before the start: %v", sf-1, err)
		}
	}
	res := 0
	if p != nil && p.kind == 'a' {
		switch {
		case sl == p.hi:
			res = 1
		case sl >= p.lo:
			res = 2
		default:
			res = -1
		}
		for i := m.last + 1; i <= sl; i++ {
			m.terms[i] = p.term
		}
	}
	for i := sl + 1; i <= m.last; i++ {
		delete(m.terms, i)
	}
	for i := m.first; i < sf; i++ {
		delete(m.terms, i)
	}
	if sl == 0 {
		clear(m.terms)
	}
	m.first, m.last = sf, sl
	return res
}

// dumpDir logs what each file of a store directory holds (on failure).
func dumpDir(t *testing.T, dir string) {
	t.Helper()
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		b, _ := os.ReadFile(filepath.Join(dir, e.Name()))
		if e.Name() == "meta" {
			for i := 0; i < 2; i++ {
				if len(b) >= i*metaSlotGap+metaSlotSize {
					m, ok, _ := decodeMeta(b[i*metaSlotGap:])
					t.Logf("meta slot %d: %+v ok=%v", i, m, ok)
				}
			}
			continue
		}
		sc, ok, err := parseSegment(b, nil)
		t.Logf("%s size %d: ok=%v err=%v hdr=%+v n=%d", e.Name(), len(b), ok, err, sc.hdr, len(sc.offs)-1)
	}
}
