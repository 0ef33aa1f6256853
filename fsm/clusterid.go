package fsm

import "fmt"

// applySetClusterID is a compare-and-set on the cluster ID (see
// SetClusterID).
func (f *FSM) applySetClusterID(c *SetClusterID) outcome {
	switch f.clusterID {
	case "":
		f.mu.Lock()
		f.clusterID = c.ID
		f.mu.Unlock()
		f.log.Info("fsm: cluster ID set", "cluster_id", c.ID)
		return outcome{}
	case c.ID:
		return outcome{duplicate: true}
	}
	return outcome{err: fmt.Errorf("%w: the cluster ID is %s, not %s", ErrClusterIDSet, f.clusterID, c.ID)}
}

// ClusterID returns the cluster ID as of the last applied entry, "" while
// none was set. It is safe from any goroutine.
func (f *FSM) ClusterID() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.clusterID
}
