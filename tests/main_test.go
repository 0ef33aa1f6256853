// Package tests holds robib's end-to-end tests: a real `robib agent`
// process driven by NBD clients robib's authors did not write (libnbd's
// nbdinfo, nbdcopy, nbdfuse and Python bindings, qemu-io, fio, the kernel's
// loop device and ext4) and by the robib CLI. The harness lives in
// tests/harness. Missing tools skip their tests unless ROBIB_REQUIRE_TOOLS=1
// (set by `make test` and CI), which turns a skip into a failure.
package tests

import (
	"os"
	"testing"

	"github.com/robib/robib/tests/harness"
)

func TestMain(m *testing.M) {
	code := m.Run()
	harness.Cleanup()
	os.Exit(code)
}
