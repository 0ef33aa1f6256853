// Package checker is a consistency checker for fault-injection tests of an
// NBD export: it writes self-describing blocks through its own NBD client,
// records exactly what the protocol lets it conclude about each write, and
// afterwards reads every block back and classifies it. It is meant not to
// be fooled: a block passes only if it is, byte for byte, one write this
// run issued to that very block and not older than what was made durable.
//
// # Client
//
// Client (client.go) speaks the NBD protocol as specified in the reference
// implementation's doc/proto.md: fixed newstyle handshake
// (NBD_FLAG_C_FIXED_NEWSTYLE, plus NBD_FLAG_C_NO_ZEROES when the server
// offers it), NBD_OPT_GO with an NBD_INFO_BLOCK_SIZE request (falling back
// to NBD_OPT_EXPORT_NAME on NBD_REP_ERR_UNSUP), simple replies only, and
// NBD_CMD_READ, WRITE (optionally with NBD_CMD_FLAG_FUA), FLUSH and DISC.
// Requests from many goroutines are pipelined on one connection and matched
// to replies by cookie. A refused option is an *OptionError (errors.Is
// ErrOptionRefused and the RepError code, e.g. ErrPolicy; its text carries
// the server's message); an error reply is a *ServerError (errors.Is the
// Errno, e.g. EIO). When a call's context ends after its request was sent,
// the connection is closed (a simple reply cannot be abandoned alone) and
// every outstanding request fails with ErrDisconnected; a request not yet
// handed to the connection simply fails.
//
// # Block format
//
// Every write covers one whole block of BlockSize bytes (a multiple of 512;
// default 4096) at BaseOffset + block*BlockSize. Integers are big-endian:
//
//	offset  size  field
//	0       8     magic "robibCK1" (BlockMagic)
//	8       8     run ID: random per Checker, so blocks of other runs differ
//	16      8     block number
//	24      8     seq: per-block write sequence, 1, 2, 3, ...
//	32      8     write ID: unique within the run
//	40      4     writer: the issuing slot (0..QueueDepth-1)
//	44      4     session: the connection number (1, 2, ...)
//	48      4     block size
//	52      4     flags: bit 0 = written with FUA
//	56      n-60  payload: a pseudo-random stream determined by (run, block, seq)
//	n-4     4     CRC-32C (Castagnoli) of bytes 0..n-4
//
// Flags bit 1 marks a read-modify-write block (Options.RMWFraction): its
// payload is divided into RMWSegments equal segments, each starting with
// an 8-byte tag, the seq of the write that last wrote that segment,
// followed by that write's payload stream at the same positions (a tag of
// 0: the segment is all zeros). Such a write reads the block first, on the
// writing connection, and replaces one segment (number write ID mod
// RMWSegments) with its own seq, writing the others back as read, like a
// file system updating a few bytes. A stale read so turns into stale data
// on every site.
//
// A block mixing sectors of two writes (or of a write and zeros) fails the
// checksum, and since every sector's payload depends on (run, block, seq),
// Verify can also say which write each 512-byte sector came from.
//
// # What the checker records
//
// For every block: each write issued (seq, ID, writer, session, FUA) and its
// state: pending, acked (success reply received), failed (error reply) or
// unanswered (connection lost, timeout, cancellation before a reply).
// Failed and unanswered writes are "maybe" writes: they may or may not have
// taken effect. Besides, per block: the newest seq issued, the newest
// acknowledged, and the durable seq: the newest seq known to be on
// permanent storage. A write becomes durable when
//
//   - it was a FUA write and was acknowledged, or
//   - a FLUSH succeeded that covered it. A FLUSH covers exactly the writes
//     whose success replies had been received on the same connection
//     before the FLUSH was sent (the snapshot is taken immediately before
//     the request is queued). That is what the protocol guarantees: the
//     server must not answer a FLUSH before every write it had answered
//     reached permanent storage. Writes whose replies had not been received
//     when the FLUSH was sent are not covered, even if the server happened
//     to complete them before processing it; a FLUSH on a new
//     connection covers nothing acknowledged on an earlier one; a failed
//     FLUSH covers nothing (its writes stay candidates for the next FLUSH
//     on the same connection).
//
// The runner never has two writes to one block in flight at once: the next
// write to a block is issued only after the previous one was answered or
// its connection was given up, so the per-block seq order is the issue
// order. It keeps QueueDepth writes outstanding, sends a FLUSH once
// FlushEvery writes were issued on a connection since the previous FLUSH
// was sent (one FLUSH in flight at a time; writes continue meanwhile), and
// ends a Run that stops by Duration or Writes by letting outstanding writes
// finish and sending a final FLUSH. On a lost connection, a request
// exceeding OpTimeout, repeated error replies or a refused attach
// (ErrOptionRefused, a read-only export), it moves to the next address
// after a short backoff. Timelines of flushes (sent, answered, ok/error)
// and connections are kept; Stats.LongestStall is the longest gap between
// consecutive successful FLUSH acknowledgements and StallAround(t) the time
// from t to the acknowledgement of the first successful FLUSH sent after t
// (the failover time when t is when a site was killed).
//
// # Classification
//
// Verify reads each block that was ever written (and, on request, some
// never written) and compares it with the floor: the durable seq
// (FloorDurable, the default), or the newest acknowledged seq (FloorAcked,
// for checks where even unflushed acknowledged writes must survive). The
// rule: the block must hold exactly one write W that this checker issued
// to this block, acknowledged or maybe, with W.seq >= floor; all zeros are
// acceptable only when the floor is 0 (no durable write exists). Otherwise:
//
//   - MISSING: all zeros, or unrecognisable content, although a write is
//     durable.
//   - STALE: a valid write of this block whose seq is below the floor.
//   - TORN: the magic is there but the checksum fails, or every sector is
//     zeros or a sector of one of this block's writes, from two or more
//     origins (the detail lists sectors: "0-3:seq 5, 4-7:seq 6").
//   - FOREIGN: a valid block (checksum intact) of another block number,
//     another run, another block size, a seq never issued for this block,
//     or whose writer, session, write ID or FUA flag differ from the write
//     issued with that seq.
//   - CORRUPT: unrecognisable content where no write is durable, or a
//     valid header and checksum over a payload the write did not carry.
//   - UNREADABLE: the read failed.
//
// Read-modify-writes add a rule: no segment of the block may carry a seq
// older than what the durable write carried there, nor older than what a
// correct read could have supplied to the write found (per segment: the
// segments of the write that was durable when its read began, and what the
// write it read had to carry itself, transitively). Otherwise the block is
// STALE ("built on stale data"). The read of a read-modify-write is also
// judged at once: one returning a seq below the block's durable seq when
// the read began counts in Stats.RMWStaleReads (see ReadProblems).
//
// # Reads while things break
//
// A Reader (NewReader, reader.go) is a second client of the same run that
// reads during the run, while faults happen: it attaches again and again
// at the targets a callback names (typically the writer's current site
// read-write, and the other sites' VOLUME@ro), reads random written blocks
// immediately after each attach (no catch-up wait), and judges each read
// against the record at once. A read must return the block's durable write
// as of the moment the read began, or a newer write (acknowledged, maybe or
// in flight); an acknowledged write that was never flushed sets no floor
// (it may be lost with its site). A ReadTarget with FloorAtAttach (a
// read-only attach, which promises what was committed when the attach
// began) uses the durable seqs at the start of the attach instead. Reads
// older than the floor are STALE, content that is no write of the block
// TORN (allowed only while a write to the block was in flight), a block of
// another block or run FOREIGN; ReadStats counts them, and Checked /
// FirstChecked say how many reads had a durable floor at all (and were
// among the first of their session), so a test can refuse a vacuous pass.
//
// A never-written block must read as zeros. The checker assumes the
// working set read as zeros before the run (a fresh volume), and that a
// write whose answer never came cannot take effect after a newer write to
// the same block was made durable (a late "zombie" write is reported as
// STALE).
//
// Reports count blocks checked, written, with a durable write and
// unwritten, so a test can refuse a vacuous pass (nothing durable, nothing
// read). The Record (Checker.Record, WriteJSON, Load) is plain JSON, so a
// failed soak can save it and a later Verify can use it again.
//
// Typical use in a fault test:
//
//	chk, _ := checker.New(checker.Options{Addrs: []string{siteA, siteB}, Export: "vol", Blocks: 1024})
//	go func() { done <- chk.Run(ctx) }()
//	// ... wait for chk.Snapshot().FlushesOK > 0, kill site A at time t ...
//	failover, ok := chk.StallAround(t)
//	// ... cancel ctx or let Duration/Writes end the run ...
//	cl, _ := chk.Connect(ctx)
//	rep, _ := chk.Verify(ctx, cl, checker.VerifyOptions{})
//	if rep.Durable == 0 || rep.Err() != nil { ... }
package checker
