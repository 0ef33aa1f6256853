package nbdfront

import (
	"sync"
	"testing"
	"time"
)

// TestObserveReportsWhereTheTimeWent: Config.Observe is called once per
// served request, after its reply, with the device's time in Device (a
// flush held 30 ms by the device shows at least that) and nothing for a
// rejected request.
func TestObserveReportsWhereTheTimeWent(t *testing.T) {
	type seen struct {
		cmd string
		t   Timing
	}
	var mu sync.Mutex
	var got []seen
	e := newEnv(t, func(c *Config) {
		c.Observe = func(cmd string, tm Timing) {
			mu.Lock()
			got = append(got, seen{cmd, tm})
			mu.Unlock()
		}
	})
	const hold = 30 * time.Millisecond
	e.disk.setHook(func(op string, off, length int64) error {
		if op == "flush" {
			time.Sleep(hold)
		}
		return nil
	})
	c, _ := e.open("disk", false, false)
	c.mustOK(0, cmdWrite, 0, 4, []byte("data"))
	c.mustOK(0, cmdFlush, 0, 0, nil)
	c.expectErrno(0, cmdFlush, 1, 0, nil, EINVAL) // rejected: not observed
	waitFor(t, "two observations", func() bool { mu.Lock(); defer mu.Unlock(); return len(got) >= 2 })
	mu.Lock()
	defer mu.Unlock()
	if len(got) != 2 || got[0].cmd != "write" || got[1].cmd != "flush" {
		t.Fatalf("observed %+v, want a write and a flush", got)
	}
	for _, s := range got {
		if s.t.Recv < 0 || s.t.Queue < 0 || s.t.Device < 0 || s.t.Reply < 0 {
			t.Errorf("%s: negative timing %+v", s.cmd, s.t)
		}
	}
	if got[1].t.Device < hold {
		t.Errorf("flush device time %v, the device held it %v", got[1].t.Device, hold)
	}
	if got[0].t.Device >= hold {
		t.Errorf("write device time %v: the flush's hold leaked into it", got[0].t.Device)
	}
}
