package wire

import (
	"bytes"
	"net"
	"testing"
)

// countingConn is a net.Conn without vectored writes that records them.
type countingConn struct {
	net.Conn
	buf    bytes.Buffer
	writes []int
}

func (c *countingConn) Write(p []byte) (int, error) {
	c.writes = append(c.writes, len(p))
	return c.buf.Write(p)
}

// TestWriteFrameCoalesces: on a connection without vectored writes (TLS) a
// frame of many small slices goes out in few writes of at most
// coalesceChunk bytes, large slices as they are, and the bytes are the
// frame's, in order.
func TestWriteFrameCoalesces(t *testing.T) {
	var bufs net.Buffers
	var want []byte
	for i := range 300 {
		b := bytes.Repeat([]byte{byte(i)}, 40+i%7) // entry metadata-sized
		if i%10 == 0 {
			b = bytes.Repeat([]byte{byte(i)}, 4096) // a 4 KiB payload
		}
		bufs = append(bufs, b)
		want = append(want, b...)
	}
	big := bytes.Repeat([]byte{0xab}, coalesceChunk+1)
	bufs = append(bufs, big, []byte("tail"))
	want = append(want, big...)
	want = append(want, "tail"...)
	var e encoder
	c := &countingConn{}
	if err := e.writeFrame(c, append(net.Buffers(nil), bufs...)); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(c.buf.Bytes(), want) {
		t.Fatalf("wrote %d bytes, not the frame's %d", c.buf.Len(), len(want))
	}
	if len(c.writes) > 4 {
		t.Errorf("%d writes for %d slices: %v", len(c.writes), len(bufs), c.writes)
	}
	for _, n := range c.writes {
		if n > coalesceChunk && n != len(big) {
			t.Errorf("a write of %d bytes (chunk %d)", n, coalesceChunk)
		}
	}
}
