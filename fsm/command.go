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
	Epoch   uint64 // volume lease epoch (fencing); 0 until leases exist
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

func (*CreateVolume) isCommand() {}
func (*DeleteVolume) isCommand() {}
func (*ResizeVolume) isCommand() {}
func (*WriteBatch) isCommand()   {}
func (*EndSession) isCommand()   {}
func (*VerifyChunks) isCommand() {}
