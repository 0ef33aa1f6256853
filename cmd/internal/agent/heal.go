package agent

import (
	"context"
	"errors"
	"fmt"

	"github.com/robib/robib/cluster"
	"github.com/robib/robib/volume"
)

// errVolumeDamaged is the error a volume's own read fails with when
// blocks of the local copy are damaged (volume.ErrDamaged, once package
// volume keeps block checksums: replace this placeholder with it then).
var errVolumeDamaged error = errNoDamageAPI

var errNoDamageAPI = errors.New("volume damage API not present in this build")

// healingReader is a local volume as DCD and read-only exports read it:
// the volume's own ReadAt, and only when that reports damaged blocks the
// cluster's repair path (cluster.Node.ReadHealed), which reads them from
// another site and repairs them here. A healthy read costs nothing more.
type healingReader struct {
	vol  *volume.Volume
	node *cluster.Node
}

func (r healingReader) Size() int64 { return r.vol.Size() }

func (r healingReader) ReadAt(p []byte, off int64) (int, error) {
	n, err := r.vol.ReadAt(p, off)
	if err == nil || !errors.Is(err, errVolumeDamaged) {
		return n, err
	}
	rv, ok := any(r.vol).(cluster.RepairableVolume)
	if !ok {
		return n, err
	}
	if herr := r.node.ReadHealed(context.Background(), rv, p, off); herr != nil {
		return 0, fmt.Errorf("%w (this site's copy: %v)", herr, err)
	}
	return len(p), nil
}
