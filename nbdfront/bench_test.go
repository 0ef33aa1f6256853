package nbdfront

import (
	"encoding/binary"
	"fmt"
	"io"
	"testing"
)

// benchmarkIO pipelines requests of size bytes with a raw client that
// allocates nothing per request, so allocs/op are the server's.
func benchmarkIO(b *testing.B, typ uint16, size int, structured bool) {
	e := newEnv(b, nil)
	c, _ := e.open("disk", structured, false)
	slots := testSize / size
	req := make([]byte, requestHeaderLen+size)
	binary.BigEndian.PutUint32(req, magicRequest)
	binary.BigEndian.PutUint16(req[6:], typ)
	binary.BigEndian.PutUint32(req[24:], uint32(size))
	msg := req[:requestHeaderLen]
	if typ == cmdWrite {
		msg = req
	}
	replyLen := simpleReplyLen
	if typ == cmdRead {
		replyLen += size
		if structured {
			replyLen = structuredHeaderLen + 8 + size
		}
	}
	reply := make([]byte, replyLen)

	b.SetBytes(int64(size))
	b.ReportAllocs()
	b.ResetTimer()
	errc := make(chan error, 1)
	go func() {
		for i := 0; i < b.N; i++ {
			if _, err := io.ReadFull(c.r, reply); err != nil {
				errc <- err
				return
			}
			ok := binary.BigEndian.Uint32(reply[4:]) == 0 // simple reply errno
			if structured && typ == cmdRead {
				ok = binary.BigEndian.Uint16(reply[6:]) == replyTypeOffsetData
			}
			if !ok {
				errc <- fmt.Errorf("request failed: %x", reply[:structuredHeaderLen])
				return
			}
		}
		errc <- nil
	}()
	for i := 0; i < b.N; i++ {
		binary.BigEndian.PutUint64(req[8:], uint64(i))
		binary.BigEndian.PutUint64(req[16:], uint64(i%slots*size))
		if _, err := c.conn.Write(msg); err != nil {
			b.Fatal(err)
		}
	}
	if err := <-errc; err != nil {
		b.Fatal(err)
	}
}

func BenchmarkRead4K(b *testing.B)           { benchmarkIO(b, cmdRead, 4096, false) }
func BenchmarkRead4KStructured(b *testing.B) { benchmarkIO(b, cmdRead, 4096, true) }
func BenchmarkWrite4K(b *testing.B)          { benchmarkIO(b, cmdWrite, 4096, false) }
func BenchmarkRead128K(b *testing.B)         { benchmarkIO(b, cmdRead, 128<<10, false) }
func BenchmarkWrite128K(b *testing.B)        { benchmarkIO(b, cmdWrite, 128<<10, false) }
