package wire

import (
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

// BenchmarkAppendEntries512K pipelines AppendEntries of one 512 KiB entry
// over loopback, with this transport and with raft.NetworkTransport
// (msgpack), in the same run. Allocations count both ends (same process).
func BenchmarkAppendEntries512K(b *testing.B) {
	b.Run("wire", func(b *testing.B) {
		server, client := newNode(b, nil), newNode(b, nil)
		benchAppend(b, server.Transport, client.Transport)
	})
	b.Run("wire-payloadcrc", func(b *testing.B) {
		crc := func(c *Config) { c.PayloadChecksum = true }
		server, client := newNode(b, crc), newNode(b, crc)
		benchAppend(b, server.Transport, client.Transport)
	})
	b.Run("msgpack", func(b *testing.B) {
		benchAppend(b, netTransport(b), netTransport(b))
	})
}

func netTransport(b *testing.B) *raft.NetworkTransport {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	tr := raft.NewNetworkTransport(&tcpStream{ln}, 4, 10*time.Second, io.Discard)
	b.Cleanup(func() { tr.Close() })
	return tr
}

func benchAppend(b *testing.B, server, client raft.Transport) {
	done := make(chan struct{})
	b.Cleanup(func() { close(done) })
	go func() {
		for {
			select {
			case rpc := <-server.Consumer():
				req := rpc.Command.(*raft.AppendEntriesRequest)
				rpc.Respond(&raft.AppendEntriesResponse{Term: req.Term, LastLog: req.Entries[0].Index, Success: true}, nil)
			case <-done:
				return
			}
		}
	}()
	p, err := client.AppendEntriesPipeline("s", server.LocalAddr())
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	data := randomBytes(512 << 10)
	now := time.Now()
	errc := make(chan error, 1)
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := cpuTime(b)
	go func() {
		for i := range b.N {
			f := <-p.Consumer()
			if err := f.Error(); err != nil {
				errc <- err
				return
			}
			if f.Response().LastLog != uint64(i+1) {
				b.Errorf("response %d for entry %d", f.Response().LastLog, i+1)
			}
		}
		errc <- nil
	}()
	for i := range b.N {
		req := &raft.AppendEntriesRequest{
			RPCHeader: raft.RPCHeader{ID: []byte("leader"), Addr: []byte("127.0.0.1:1")},
			Term:      1, PrevLogEntry: uint64(i), PrevLogTerm: 1, LeaderCommitIndex: uint64(i),
			Entries: []*raft.Log{{Index: uint64(i + 1), Term: 1, Type: raft.LogCommand, Data: data, AppendedAt: now}},
		}
		if _, err := p.AppendEntries(req, new(raft.AppendEntriesResponse)); err != nil {
			b.Fatal(err)
		}
	}
	if err := <-errc; err != nil {
		b.Fatal(err)
	}
	// CPU of the whole process (both ends, raft's side of the benchmark
	// included) per entry: the figure issue 12 is about.
	b.ReportMetric(float64(cpuTime(b)-cpu0)/float64(b.N), "cpu-ns/op")
}

// cpuTime is the process's user+system CPU time so far.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
