# robib build, test and demo targets. `make test` installs the third-party
# NBD clients the tests drive (apt-get, as root) before running anything.

GO        ?= go
BIN       := bin/robib
VERSION   ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -s -w -X main.version=$(VERSION)
# An execution count, not a duration: with a duration, Go 1.26's fuzz
# coordinator can fail a target with a bare "context deadline exceeded" when
# the time runs out (go.dev/issue/75804, fixed in Go 1.27). A count has no
# deadline to race. `make fuzz FUZZTIME=5m` still runs by time.
FUZZTIME  ?= 200000x
# make soak: randomised fault rounds and leader kills (tests/faults).
SOAK_ROUNDS    ?= 300
FAILOVER_KILLS ?= 12
RECREATE_CYCLES ?= 60
# package:FuzzTarget[:count] run briefly by `make fuzz` (and so by `make
# test`): every fuzz target of the module; a count after a second colon
# replaces FUZZTIME for a slow target (a full TLS handshake per input).
FUZZ      := ./nbdfront:FuzzHandshake ./nbdfront:FuzzTransmission ./nbdfront:FuzzHandshakeRequireTLS \
	./nbdfront:FuzzOptionsAfterTLS:3000x ./volume:FuzzMeta ./volume:FuzzSumsHeader ./fsm:FuzzDecode ./fsm:FuzzDecodeState ./fsm:FuzzStream \
	./cmd/internal/config:FuzzParseSize ./cmd/internal/auth:FuzzParse ./cmd/internal/pki:FuzzParseGossipKey \
	./cmd/internal/pki:FuzzParseCerts ./cluster:FuzzDecodeKeyring ./cluster/dcdlog:FuzzSegment \
	./cluster/dcdlog:FuzzDamagedSegment ./cluster/wire:FuzzDecodeFrame ./cluster/wire:FuzzDecodeStream \
	./cluster:FuzzParseReadQuery ./cluster:FuzzParseReadResponse ./cluster:FuzzParseRepairRequest ./cluster:FuzzDecodeCatchUpBase

# staticcheck 2026.2.2 (module v0.8.2) supports Go 1.26; `make lint`
# installs it into $(go env GOPATH)/bin when that one is missing or another
# version.
STATICCHECK_VERSION ?= v0.8.2
STATICCHECK := $(shell $(GO) env GOPATH)/bin/staticcheck
# Every shell script in the repository: the *.sh files and .ci/run.
SHELL_SCRIPTS = $$(git ls-files '*.sh') .ci/run

.PHONY: all build test check unit e2e fuzz tools lint-tools bench demo lint soak image compose-smoke compose-up compose-down clean

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/robib

tools:
	@ops/scripts/install-test-tools.sh

# The whole suite: unit tests with the race detector, the end-to-end tests
# against real NBD clients, and a short run of every fuzz target.
test: tools lint
	ROBIB_REQUIRE_TOOLS=1 $(GO) test -race -count=1 -timeout 40m ./...
	@$(MAKE) --no-print-directory fuzz

# The fast lane: lint, then the unit tests with the race detector (every
# package but ./tests/...: no root, no Docker, no NBD tools, no e2e).
check: lint
	@$(MAKE) --no-print-directory unit

unit:
	$(GO) test -race -count=1 $$($(GO) list ./... | grep -v /tests)

e2e: tools
	ROBIB_REQUIRE_TOOLS=1 $(GO) test -count=1 -v -timeout 40m ./tests/...

fuzz:
	@set -e; for t in $(FUZZ); do \
		pkg=$${t%%:*}; rest=$${t#*:}; fn=$${rest%%:*}; n=$(FUZZTIME); \
		case $$rest in *:*) n=$${rest#*:};; esac; \
		echo "fuzz $$pkg $$fn ($$n)"; \
		$(GO) test -run='^$$' -fuzz="^$$fn$$" -fuzztime=$$n $$pkg; \
	done

# gofmt, go vet, go mod tidy -diff, staticcheck, shellcheck.
lint: lint-tools
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) mod tidy -diff
	$(STATICCHECK) ./...
	shellcheck $(SHELL_SCRIPTS)

# The linters lint needs: staticcheck from the Go module proxy, shellcheck
# from apt (as root; otherwise it says what to install).
lint-tools:
	@$(STATICCHECK) -version 2>/dev/null | grep -qF '($(STATICCHECK_VERSION:v%=%))' || \
		{ echo "installing staticcheck $(STATICCHECK_VERSION)"; $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION); }
	@command -v shellcheck >/dev/null || { \
		if [ "$$(id -u)" = 0 ]; then apt-get install -y shellcheck || { apt-get update && apt-get install -y shellcheck; }; \
		else echo "shellcheck is missing: apt-get install -y shellcheck (as root)"; exit 1; fi; }

# Fault-injection soak: SOAK_ROUNDS randomised fault rounds under a writing
# client, then FAILOVER_KILLS leader kills timed; one JSON line per fault in
# tests/faults/results/report.jsonl. `make test` runs a short version.
soak: tools
	mkdir -p tests/faults/results
	ROBIB_REQUIRE_TOOLS=1 ROBIB_SOAK_ROUNDS=$(SOAK_ROUNDS) ROBIB_FAILOVER_KILLS=$(FAILOVER_KILLS) ROBIB_RECREATE_CYCLES=$(RECREATE_CYCLES) \
	ROBIB_FAULT_REPORT=$(CURDIR)/tests/faults/results/report.jsonl ROBIB_FAULT_RECORDS=$(CURDIR)/tests/faults/results \
		$(GO) test -count=1 -v -timeout 240m -run '^(TestSoak|TestFailoverTime|TestDeleteRecreateUnderKill9)$$' ./tests/faults/ 2>&1 | tee tests/faults/results/soak.log | grep -E 'REPORT|FAILOVER|soak|leader kills|lease holder|kills:|^(---|ok|FAIL|PASS)'

bench: build tools
	$(GO) test -run='^$$' -bench=. -benchmem ./volume ./nbdfront ./dcd ./fsm ./cluster
	$(GO) test -run='^$$' -bench='LogStoreAppend|RawFloor' ./cluster/dcdlog > bin/logstore-bench.txt
	tests/bench/storegoals.py < bin/logstore-bench.txt
	ROBIB_BIN=$(CURDIR)/$(BIN) tests/bench/run.sh

demo: build
	ops/scripts/demo.sh

# Container image (FROM scratch) around the static binary; ROBIB_IMAGE=name:tag to retag.
image: build
	ops/scripts/build-image.sh

# Three sites in containers (ops/compose): build, start, check, tear down.
compose-smoke: build
	ROBIB_BIN=$(BIN) ops/scripts/compose-smoke.sh

# Start / stop the three-site compose deploy (data kept; `down -v` deletes it).
compose-up: image
	docker-compose -f ops/compose/docker-compose.yml up -d
compose-down:
	docker-compose -f ops/compose/docker-compose.yml down

clean:
	rm -rf bin
