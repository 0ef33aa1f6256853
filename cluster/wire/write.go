package wire

import "net"

// coalesceChunk is the largest write writeFrame makes on a connection
// without vectored writes: big enough that a TLS connection fills whole
// records (16 KiB each) and makes few system calls per frame.
const coalesceChunk = 256 << 10

// writeFrame writes one encoded frame (bufs, from encode) to nc. A plain
// TCP or Unix connection gets one vectored write straight from the
// slices. Anything else (a TLS connection, the link-delay wrapper) has no
// vectored write: net.Buffers would call Write once per slice, which on
// TLS is a record and a system call per entry header and payload, so the
// slices are copied into few writes of at most coalesceChunk bytes
// (slices of that size or more are written as they are). The copy costs
// far less than the encryption it saves records of.
func (e *encoder) writeFrame(nc net.Conn, bufs net.Buffers) error {
	switch nc.(type) {
	case *net.TCPConn, *net.UnixConn:
		_, err := bufs.WriteTo(nc)
		return err
	}
	if cap(e.out) < coalesceChunk {
		e.out = make([]byte, 0, coalesceChunk)
	}
	out := e.out[:0]
	for _, b := range bufs {
		if len(out) == 0 && len(b) >= coalesceChunk {
			if _, err := nc.Write(b); err != nil {
				return err
			}
			continue
		}
		for len(b) > 0 {
			n := min(len(b), coalesceChunk-len(out))
			out = append(out, b[:n]...)
			b = b[n:]
			if len(out) == coalesceChunk {
				if _, err := nc.Write(out); err != nil {
					return err
				}
				out = out[:0]
			}
		}
	}
	if len(out) > 0 {
		if _, err := nc.Write(out); err != nil {
			return err
		}
	}
	return nil
}
