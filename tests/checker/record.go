package checker

import (
	"encoding/json"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"sync"
)

// Record is the whole state of a Checker in a JSON-friendly form: enough
// to Verify again later (Load) and to read the timeline of a failed soak.
type Record struct {
	Version  int             `json:"version"`
	RunID    uint64          `json:"run_id"`
	Options  Options         `json:"options"`
	Stats    Stats           `json:"stats"`
	NextID   uint64          `json:"next_write_id"`
	Blocks   []BlockRecord   `json:"blocks"` // blocks with at least one write
	Flushes  []FlushRecord   `json:"flushes"`
	Sessions []SessionRecord `json:"sessions"`
	Attempts []AttemptRecord `json:"attempts,omitempty"`
}

// Record returns a deep copy of the checker's state.
func (c *Checker) Record() *Record {
	c.mu.Lock()
	defer c.mu.Unlock()
	r := &Record{
		Version:  recordVersion,
		RunID:    c.runID,
		Options:  c.opts,
		Stats:    c.snapshotLocked(),
		NextID:   c.nextID,
		Flushes:  append([]FlushRecord(nil), c.flushes...),
		Sessions: append([]SessionRecord(nil), c.sessions...),
		Attempts: append([]AttemptRecord(nil), c.attempts...),
	}
	for i := range c.blocks {
		b := &c.blocks[i]
		if b.lastSeq == 0 {
			continue
		}
		r.Blocks = append(r.Blocks, BlockRecord{
			Block: uint64(i), LastSeq: b.lastSeq, Acked: b.acked, Durable: b.durable,
			Writes: append([]WriteRecord(nil), b.writes...),
		})
	}
	return r
}

// MarshalJSON encodes the checker's Record.
func (c *Checker) MarshalJSON() ([]byte, error) { return json.Marshal(c.Record()) }

// WriteJSON writes the Record, indented, to w.
func (c *Checker) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", " ")
	return enc.Encode(c.Record())
}

// Load rebuilds a Checker from a Record written by WriteJSON (or
// MarshalJSON), so that a saved run can be verified again. Options.Dial
// and Logf are not saved: set them with dial and logf (nil for defaults).
func Load(r io.Reader, dial DialFunc, logf func(string, ...any)) (*Checker, error) {
	var rec Record
	if err := json.NewDecoder(r).Decode(&rec); err != nil {
		return nil, fmt.Errorf("checker: decoding record: %w", err)
	}
	return FromRecord(&rec, dial, logf)
}

// FromRecord rebuilds a Checker from rec (see Load).
func FromRecord(rec *Record, dial DialFunc, logf func(string, ...any)) (*Checker, error) {
	if rec.Version != recordVersion {
		return nil, fmt.Errorf("checker: record version %d, want %d", rec.Version, recordVersion)
	}
	opts := rec.Options
	opts.Dial, opts.Logf = dial, logf
	if err := opts.normalise(); err != nil {
		return nil, err
	}
	c := &Checker{
		opts:     opts,
		runID:    rec.RunID,
		blocks:   make([]blockState, opts.Blocks),
		rng:      mrand.New(mrand.NewPCG(opts.Seed, opts.Seed^0x5deece66d^rec.NextID)),
		nextID:   rec.NextID,
		flushes:  append([]FlushRecord(nil), rec.Flushes...),
		sessions: append([]SessionRecord(nil), rec.Sessions...),
		attempts: append([]AttemptRecord(nil), rec.Attempts...),
		stats:    rec.Stats,
	}
	c.stats.Running = false
	c.cond = sync.NewCond(&c.mu)
	for _, b := range rec.Blocks {
		if b.Block >= uint64(len(c.blocks)) {
			return nil, fmt.Errorf("checker: record has block %d outside the working set of %d", b.Block, len(c.blocks))
		}
		if n := uint64(len(b.Writes)); n > 0 && (b.Writes[n-1].Seq != b.LastSeq || b.Writes[0].Seq+n-1 != b.LastSeq) {
			return nil, fmt.Errorf("checker: record of block %d: writes are not consecutive up to seq %d", b.Block, b.LastSeq)
		}
		st := &c.blocks[b.Block]
		st.lastSeq, st.acked, st.durable = b.LastSeq, b.Acked, b.Durable
		st.writes = append([]WriteRecord(nil), b.Writes...)
		for i := range st.writes {
			if st.writes[i].State == WritePending {
				// Saved mid-run: its answer never came.
				st.writes[i].State = WriteUnanswered
			}
		}
	}
	if !c.stats.Started.IsZero() {
		c.ended = c.stats.Started.Add(c.stats.Elapsed)
	}
	return c, nil
}
