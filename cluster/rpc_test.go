package cluster

import (
	"bytes"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestReadBody(t *testing.T) {
	const limit = 1 << 10
	payload := bytes.Repeat([]byte("x"), 700)
	cases := []struct {
		name    string
		body    io.Reader
		length  int64 // -1: unknown
		want    []byte
		wantErr bool
	}{
		{"exact length", bytes.NewReader(payload), int64(len(payload)), payload, false},
		{"unknown length", bytes.NewReader(payload), -1, payload, false},
		{"empty", bytes.NewReader(nil), 0, []byte{}, false},
		{"body shorter than its length", bytes.NewReader(payload), 900, nil, true},
		{"declared over the limit", strings.NewReader(strings.Repeat("y", 2*limit)), 2 * limit, nil, true},
		{"unknown length over the limit", strings.NewReader(strings.Repeat("y", 2*limit)), -1, nil, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := httptest.NewRequest(http.MethodPost, "/", c.body)
			r.ContentLength = c.length
			got, err := readBody(httptest.NewRecorder(), r, limit)
			if c.wantErr {
				if err == nil {
					t.Fatalf("read %d bytes, want an error", len(got))
				}
				return
			}
			if err != nil || !bytes.Equal(got, c.want) {
				t.Fatalf("got %d bytes, %v; want %d bytes", len(got), err, len(c.want))
			}
		})
	}
}

func TestLogWriterLevels(t *testing.T) {
	var buf bytes.Buffer
	w := &logWriter{log: slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug})), component: "raft"}
	for _, line := range []string{
		`2026-11-24T22:27:52.837Z [ERROR] raft: peer has newer term, stopping replication: peer="{Voter site2 x}"`,
		`2026-11-24T22:27:52.837Z [ERROR] raft: failed to appendEntries to: peer=x`,
		`2026-11-24T22:27:52.837Z [WARN]  raft: heartbeat timeout reached, starting election`,
	} {
		w.Write([]byte(line + "\n"))
	}
	out := buf.String()
	for _, want := range []string{
		`level=INFO msg="raft: peer has newer term`,
		`level=ERROR msg="raft: failed to appendEntries`,
		`level=WARN msg="raft: heartbeat timeout reached`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("log output lacks %s:\n%s", want, out)
		}
	}
}
