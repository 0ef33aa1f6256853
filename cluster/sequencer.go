package cluster

import (
	"sync"
	"time"
)

// sequencer keeps each writer session's batches in Seq order on their way
// into the Raft log on the leader.
//
// A writer (dcd) pipelines several batches; they reach the leader over
// separate calls (local goroutines or forwarded HTTP requests) and may
// overtake each other. The FSM applies a session's batches strictly in Seq
// order and rejects a gap, so an overtaking batch would cost a wasted Raft
// entry and a resend. The sequencer holds a batch whose predecessor has not
// been appended yet, for at most maxHold, then lets it through anyway: it is
// an optimisation, correctness stays with the FSM's Seq check.
type sequencer struct {
	mu       sync.Mutex // guards sessions and serialises appends to Raft
	sessions map[uint64]*seqState
	maxHold  time.Duration
}

type seqState struct {
	last    uint64        // highest Seq appended by this leader
	changed chan struct{} // closed when last changes
}

// maxSessions bounds the table; past it the table is reset (the only cost is
// possible gaps, which the FSM and the writer handle).
const maxSessions = 8192

func newSequencer(maxHold time.Duration) *sequencer {
	return &sequencer{sessions: map[uint64]*seqState{}, maxHold: maxHold}
}

// append calls do (which appends one entry to Raft) once the session's
// previous Seq has been appended, or maxHold has passed. Appends of all
// sessions are serialised, which Raft's apply channel does anyway.
func (q *sequencer) append(session, seq uint64, do func()) {
	deadline := time.Now().Add(q.maxHold)
	q.mu.Lock()
	st := q.sessions[session]
	if st == nil {
		if len(q.sessions) >= maxSessions {
			q.sessions = map[uint64]*seqState{}
		}
		st = &seqState{changed: make(chan struct{})}
		q.sessions[session] = st
	}
	for st.last != 0 && seq > st.last+1 {
		wait := time.Until(deadline)
		if wait <= 0 {
			break
		}
		ch := st.changed
		q.mu.Unlock()
		t := time.NewTimer(wait)
		select {
		case <-ch:
		case <-t.C:
		}
		t.Stop()
		q.mu.Lock()
		if cur := q.sessions[session]; cur != nil {
			st = cur
		} else {
			st = &seqState{changed: make(chan struct{})}
			q.sessions[session] = st
		}
	}
	do()
	if seq > st.last {
		st.last = seq
		close(st.changed)
		st.changed = make(chan struct{})
	}
	q.mu.Unlock()
}

// forget drops a session (it ended).
func (q *sequencer) forget(session uint64) {
	q.mu.Lock()
	delete(q.sessions, session)
	q.mu.Unlock()
}
