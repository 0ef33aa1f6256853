package fsm

import (
	"cmp"
	"fmt"
	"maps"
	"slices"

	"github.com/robib/robib/volume"
)

// Lease is a volume's single-writer lease as the replicated state records
// it. Epoch only grows (every AcquireLease adds one); Holder is "" while
// nobody holds it (never taken, or released).
type Lease struct {
	Holder string `json:"holder,omitempty"`
	Epoch  uint64 `json:"epoch"`
}

// leaseEntry is a lease with its volume, as stored.
type leaseEntry struct {
	Volume string
	Lease
}

// Lease returns the lease of a volume as of the last applied entry. ok is
// false when the lease was never taken (or the volume does not exist). It is
// safe from any goroutine.
func (f *FSM) Lease(volume string) (l Lease, ok bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	l, ok = f.leases[volume]
	return l, ok
}

// Leases returns every recorded lease by volume name. It is safe from any
// goroutine.
func (f *FSM) Leases() map[string]Lease {
	f.mu.Lock()
	defer f.mu.Unlock()
	return maps.Clone(f.leases)
}

// setLease records a lease change (FSM goroutine only).
func (f *FSM) setLease(volume string, l Lease, ok bool) {
	f.mu.Lock()
	if ok {
		f.leases[volume] = l
	} else {
		delete(f.leases, volume)
	}
	f.mu.Unlock()
}

// checkEpoch is the fencing rule for a write batch on volume (see
// WriteBatch.Epoch).
func (f *FSM) checkEpoch(volume string, epoch uint64) error {
	l, ok := f.leases[volume]
	switch {
	case !ok && epoch == 0:
		return nil
	case !ok:
		return fmt.Errorf("%w: batch for %q carries epoch %d but the volume's lease was never taken", ErrStaleEpoch, volume, epoch)
	case epoch != l.Epoch:
		return fmt.Errorf("%w: batch for %q carries epoch %d, the lease is at epoch %d (held by %q)", ErrStaleEpoch, volume, epoch, l.Epoch, l.Holder)
	case l.Holder == "":
		return fmt.Errorf("%w: the lease on %q at epoch %d was released", ErrStaleEpoch, volume, epoch)
	}
	return nil
}

func (f *FSM) applyAcquire(c *AcquireLease) (outcome, error) {
	v, verdict, local := f.getVolume(c.Volume)
	if verdict != nil || local != nil {
		return outcome{err: verdict}, local
	}
	if c.Created != 0 && v.Meta().Created.UnixNano() != c.Created {
		return outcome{err: fmt.Errorf("%w: %q was deleted and recreated since this writer looked it up", ErrUnknownVolume, c.Volume)}, nil
	}
	cur := f.leases[c.Volume]
	if cur.Epoch != c.Prev {
		return outcome{err: fmt.Errorf("%w: %q: acquire expected epoch %d, the lease is at epoch %d (held by %q)",
			ErrLeaseConflict, c.Volume, c.Prev, cur.Epoch, cur.Holder)}, nil
	}
	f.setLease(c.Volume, Lease{Holder: c.Site, Epoch: c.Prev + 1}, true)
	f.dropSessions(c.Volume)
	return outcome{}, nil
}

func (f *FSM) applyRelease(c *ReleaseLease) outcome {
	cur, ok := f.leases[c.Volume]
	if !ok || cur.Holder != c.Site || cur.Epoch != c.Epoch {
		return outcome{err: fmt.Errorf("%w: %q: %s does not hold the lease at epoch %d (epoch %d, holder %q)",
			ErrLeaseConflict, c.Volume, c.Site, c.Epoch, cur.Epoch, cur.Holder)}
	}
	f.setLease(c.Volume, Lease{Epoch: cur.Epoch}, true)
	f.dropSessions(c.Volume)
	return outcome{}
}

// leaseList returns the lease table sorted by volume.
func leaseList(m map[string]Lease) []leaseEntry {
	out := make([]leaseEntry, 0, len(m))
	for name, l := range m {
		out = append(out, leaseEntry{Volume: name, Lease: l})
	}
	slices.SortFunc(out, func(a, b leaseEntry) int { return cmp.Compare(a.Volume, b.Volume) })
	return out
}

// leaseMap builds a lease table from a list.
func leaseMap(list []leaseEntry) map[string]Lease {
	m := make(map[string]Lease, len(list))
	for _, l := range list {
		m[l.Volume] = l.Lease
	}
	return m
}

// dropOrphanLeases enforces "no lease entry for a volume that does not
// exist" on a lease table loaded from disk (FSM goroutine only, or before
// raft starts). Applying the log never creates such an entry, but a state
// file can hold one: it is written by the checkpoint before a Delete, and a
// crash after the store removed the volume leaves the file at that
// checkpoint (DESIGN.md, "Restart and replay"). The entry is exactly what
// the interrupted Delete would have dropped.
func (f *FSM) dropOrphanLeases(from string, exists func(volume string) bool) {
	for name := range f.leases {
		if !exists(name) {
			f.log.Info("fsm: dropping the lease of a volume that does not exist", "volume", name, "from", from)
			f.setLease(name, Lease{}, false)
		}
	}
}

// existingLeases returns img's lease list without entries for volumes that
// are not in img (a snapshot taken by a site that still had the defect
// dropOrphanLeases repairs).
func existingLeases(img *stateImage) []leaseEntry {
	out := make([]leaseEntry, 0, len(img.Leases))
	for _, l := range img.Leases {
		if slices.ContainsFunc(img.Volumes, func(m volume.Meta) bool { return m.Name == l.Volume }) {
			out = append(out, l)
		}
	}
	return out
}
