package harness

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func TestParseServing(t *testing.T) {
	for _, tc := range []struct {
		line string
		want servingInfo
	}{
		{`time=2026-01-01T00:00:00Z level=INFO msg="robib site serving" site=s1 site=s1 nbd=127.0.0.1:1234 api=127.0.0.1:5678 data_dir=/tmp/x`,
			servingInfo{"127.0.0.1:1234", "127.0.0.1:5678", "/tmp/x"}},
		{`time=x level=INFO msg="robib site serving" nbd=[::]:10809 api=0.0.0.0:80 data_dir="/tmp/with space"`,
			servingInfo{"127.0.0.1:10809", "127.0.0.1:80", "/tmp/with space"}},
		{`{"time":"x","level":"INFO","msg":"robib site serving","site":"s","nbd":"127.0.0.2:1","api":"127.0.0.3:2","data_dir":"/d"}`,
			servingInfo{"127.0.0.2:1", "127.0.0.3:2", "/d"}},
		{`msg="robib site serving"`, servingInfo{}},
	} {
		if got := parseServing(tc.line); got != tc.want {
			t.Errorf("parseServing(%s) = %+v, want %+v", tc.line, got, tc.want)
		}
	}
}

func TestPoll(t *testing.T) {
	n := 0
	if err := Poll(5*time.Second, func() (bool, error) { n++; return n == 3, nil }); err != nil || n != 3 {
		t.Fatalf("Poll = %v after %d calls", err, n)
	}
	err := Poll(50*time.Millisecond, func() (bool, error) { return false, errors.New("not yet: boom") })
	if err == nil || !strings.Contains(err.Error(), "boom") {
		t.Fatalf("Poll timeout error = %v, want the last error in it", err)
	}
	// A true with an error is not done.
	err = Poll(20*time.Millisecond, func() (bool, error) { return true, errors.New("x") })
	if err == nil {
		t.Fatal("Poll accepted (true, error)")
	}
}

func TestTail(t *testing.T) {
	if got := Tail("a\nb\nc\n", 2); got != "... (1 lines omitted)\nb\nc" {
		t.Errorf("Tail = %q", got)
	}
	if got := Tail("a", 5); got != "a" {
		t.Errorf("Tail = %q", got)
	}
}

func TestFreePort(t *testing.T) {
	p := FreePort(t)
	if p <= 0 || p > 65535 {
		t.Fatalf("FreePort = %d", p)
	}
}

func TestRunTimeout(t *testing.T) {
	start := time.Now()
	r := Run(t, 200*time.Millisecond, nil, "sleep", "30")
	if r.Err == nil || time.Since(start) > 10*time.Second {
		t.Fatalf("Run did not time out: %+v after %v", r, time.Since(start))
	}
	r = Run(t, 10*time.Second, []string{"X_HARNESS=1"}, "sh", "-c", "echo out; echo err >&2; echo $X_HARNESS; exit 3")
	if r.ExitCode != 3 || r.Stdout != "out\n1\n" || r.Stderr != "err\n" {
		t.Fatalf("Run = %+v", r)
	}
}
