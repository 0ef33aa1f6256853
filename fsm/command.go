package fsm

// This file defines the replicated commands. They are the contract between
// the writers (dcd, cluster) and the state machine; their wire encoding is in
// codec.go.

// OpKind is the kind of one operation inside a WriteBatch.
type OpKind uint8

// Operation kinds. Every kind overwrites its range completely, so applying a
// sequence of ops twice from the same starting point gives the same bytes.
const (
	OpWrite OpKind = 1 // write Data at Off (Len == len(Data))
	OpTrim  OpKind = 2 // the range reads as zeros afterwards (hole punched)
	OpZero  OpKind = 3 // the range reads as zeros; NoHole keeps it allocated
)

// Op is one write-like operation on a volume.
type Op struct {
	Kind   OpKind
	NoHole bool   // only for OpZero
	Off    int64  // byte offset in the volume
	Len    int64  // byte length; for OpWrite equals len(Data)
	Data   []byte // only for OpWrite
}

// Command is one replicated command. The concrete types below are the only
// implementations.
type Command interface{ isCommand() }

// CreateVolume creates a volume at every site.
type CreateVolume struct {
	Name      string
	Size      int64
	BlockSize int
	Created   int64 // Unix nanoseconds, chosen by the proposer so every site agrees
	// SyncWrites is stored in the volume's metadata (volume.Meta): writers
	// acknowledge a write only once it is committed. Fixed at creation.
	SyncWrites bool
}

// DeleteVolume deletes a volume at every site.
type DeleteVolume struct {
	Name string
}

// ResizeVolume changes a volume's size at every site.
type ResizeVolume struct {
	Name string
	Size int64
}

// WriteBatch is a group of ops on one volume from one writer session. The FSM
// applies batches of a session exactly once and in Seq order: Seq must be
// the session's last applied Seq + 1; a smaller Seq is a duplicate (answered
// as success, not applied again) and a larger one is a gap (rejected with
// ErrSeqGap so the writer resends in order).
type WriteBatch struct {
	Volume  string
	Session uint64 // random per writer instance, never 0
	Seq     uint64 // 1, 2, 3, ... per session
	// Epoch is the volume lease epoch the writer holds (see AcquireLease).
	// A batch is applied only while it equals the volume's current lease
	// epoch and the lease is held; otherwise it is rejected with
	// ErrStaleEpoch (fencing: a writer that lost its lease, for example
	// behind a partition, can never land a write after the new holder's).
	// 0 is accepted only on a volume whose lease was never taken (tests
	// and tools; the agent always holds a lease).
	Epoch uint64
	// Created names the volume incarnation the writer attached to: its
	// CreateVolume.Created stamp. A batch for a volume that was deleted and
	// recreated under the same name since is rejected (ErrUnknownVolume),
	// so a stale writer never lands in the new volume. 0 skips the check
	// (tests and tools only; the agent always sets it).
	Created int64
	Ops     []Op
}

// EndSession forgets a writer session's dedup state once the writer closed.
type EndSession struct {
	Session uint64
}

// VerifyChunks asks every site to hash a range of a volume, chunk by chunk,
// at the log index where the command is applied, and keep the result locally
// under ID for a verify coordinator to collect.
type VerifyChunks struct {
	ID        string
	Volume    string
	Off       int64
	Len       int64
	ChunkSize int64
}

// AcquireLease makes Site the single writer of Volume: the lease's epoch
// becomes Prev+1 and its holder Site, provided the lease's epoch is still
// Prev (compare-and-set), so two sites racing for it can never both win,
// and every batch of the previous holder is fenced from then on. The
// proposer (the leader) decides whether the previous holder's lease has
// expired; the FSM only enforces the order. Created names the volume
// incarnation, as in WriteBatch (0 skips the check).
type AcquireLease struct {
	Volume  string
	Site    string
	Created int64
	Prev    uint64
}

// ReleaseLease gives up Site's lease on Volume at Epoch: the lease is then
// free (no holder, same epoch), and no batch of that epoch is applied any
// more. Anyone else's lease (another site, another epoch) is left alone
// and the command is rejected with ErrLeaseConflict.
type ReleaseLease struct {
	Volume string
	Site   string
	Epoch  uint64
}

// SetClusterID fixes the cluster's identity: the first leader of a cluster
// whose state has no cluster ID proposes one (random). It is a
// compare-and-set: applied only while the state has no ID; the same ID
// again is a duplicate (success, nothing done); another ID is the verdict
// ErrClusterIDSet. So the ID, once applied, never changes.
type SetClusterID struct {
	ID string
}

func (*CreateVolume) isCommand() {}
func (*DeleteVolume) isCommand() {}
func (*ResizeVolume) isCommand() {}
func (*WriteBatch) isCommand()   {}
func (*EndSession) isCommand()   {}
func (*VerifyChunks) isCommand() {}
func (*AcquireLease) isCommand() {}
func (*ReleaseLease) isCommand() {}
func (*SetClusterID) isCommand() {}
