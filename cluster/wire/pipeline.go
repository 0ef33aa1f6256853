package wire

import (
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/raft"
)

// AppendEntriesPipeline implements raft.Transport: requests are written
// back to back on one connection and their responses read in order by one
// goroutine, which completes the futures in that order. It returns
// raft.ErrPipelineReplicationNotSupported if MaxRPCsInFlight is 1.
func (t *Transport) AppendEntriesPipeline(_ raft.ServerID, target raft.ServerAddress) (raft.AppendPipeline, error) {
	if t.cfg.MaxRPCsInFlight < 2 {
		return nil, raft.ErrPipelineReplicationNotSupported
	}
	c, err := t.getConn(target)
	if err != nil {
		return nil, err
	}
	// As in raft's netPipeline, a request is written before it is queued
	// and the reader takes one off the queue before it waits, so a queue of
	// n-2 keeps n in flight.
	p := &pipeline{
		t:          t,
		c:          c,
		inprogress: make(chan *future, t.cfg.MaxRPCsInFlight-2),
		done:       make(chan raft.AppendFuture, t.cfg.MaxRPCsInFlight-2),
		shutdownCh: make(chan struct{}),
	}
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		t.untrack(c.nc)
		return nil, ErrShutdown
	}
	t.pipes[p] = struct{}{}
	t.mu.Unlock()
	p.wg.Add(1)
	go p.readResponses()
	return p, nil
}

type pipeline struct {
	t          *Transport
	c          *conn
	inprogress chan *future
	done       chan raft.AppendFuture
	shutdownCh chan struct{}
	closeOnce  sync.Once
	sendMu     sync.Mutex // raft sends from one goroutine; this makes it safe anyway
	wg         sync.WaitGroup
}

// AppendEntries implements raft.AppendPipeline; it blocks while
// MaxRPCsInFlight requests are outstanding.
func (p *pipeline) AppendEntries(args *raft.AppendEntriesRequest, resp *raft.AppendEntriesResponse) (raft.AppendFuture, error) {
	f := &future{start: time.Now(), args: args, resp: resp, ch: make(chan struct{})}
	p.sendMu.Lock()
	defer p.sendMu.Unlock()
	select {
	case <-p.shutdownCh:
		return nil, fmt.Errorf("%w: pipeline to %s", ErrShutdown, p.c.target)
	default:
	}
	if written, err := p.t.send(p.c, args, p.t.deadline); err != nil {
		if written {
			p.Close()
		}
		return nil, p.t.shutdownErr(err)
	}
	select {
	case p.inprogress <- f:
		return f, nil
	case <-p.shutdownCh:
		return nil, fmt.Errorf("%w: pipeline to %s", ErrShutdown, p.c.target)
	}
}

// readResponses completes the futures in the order of their requests.
// After a frame-level error the connection is closed and every later
// future fails too.
func (p *pipeline) readResponses() {
	defer p.wg.Done()
	var broken error
	for {
		var f *future
		select {
		case f = <-p.inprogress:
		case <-p.shutdownCh:
			return
		}
		if broken == nil {
			if err := p.c.nc.SetReadDeadline(time.Now().Add(p.t.cfg.Timeout)); err != nil {
				broken = err
			}
		}
		if broken == nil {
			rpcErr, err := p.t.readResponse(p.c, kindAppendEntries, f.resp)
			switch {
			case err != nil:
				broken = err
				p.c.nc.Close()
			case rpcErr != "":
				f.err = fmt.Errorf("%s", rpcErr)
			}
		}
		if broken != nil {
			f.err = broken
		}
		close(f.ch)
		select {
		case p.done <- f:
		case <-p.shutdownCh:
			return
		}
	}
}

// Consumer implements raft.AppendPipeline.
func (p *pipeline) Consumer() <-chan raft.AppendFuture { return p.done }

// Close implements raft.AppendPipeline: it closes the connection, which
// fails the request being read, and ends the reader.
func (p *pipeline) Close() error {
	p.closeOnce.Do(func() {
		close(p.shutdownCh)
		p.t.untrack(p.c.nc)
		p.t.mu.Lock()
		delete(p.t.pipes, p)
		p.t.mu.Unlock()
	})
	p.wg.Wait()
	return nil
}

// future is a raft.AppendFuture.
type future struct {
	start time.Time
	args  *raft.AppendEntriesRequest
	resp  *raft.AppendEntriesResponse
	err   error
	ch    chan struct{}
}

func (f *future) Error() error {
	<-f.ch
	return f.err
}

func (f *future) Start() time.Time                      { return f.start }
func (f *future) Request() *raft.AppendEntriesRequest   { return f.args }
func (f *future) Response() *raft.AppendEntriesResponse { return f.resp }
