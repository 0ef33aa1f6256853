package agent

import (
	"context"
	"errors"
	"fmt"

	"github.com/robib/robib/cluster"
	"github.com/robib/robib/volume"
)

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
	if err == nil || !errors.Is(err, volume.ErrDamaged) || r.node == nil {
		return n, err
	}
	if herr := r.node.ReadHealed(context.Background(), r.vol, p, off); herr != nil {
		return 0, fmt.Errorf("%w (this site's copy: %v)", herr, err)
	}
	return len(p), nil
}
