# One pinned compiler for the committed BPF objects: Debian 12's clang-19.
BPF2GO_CC ?= clang-19
BPF2GO_CFLAGS ?= -O2 -g -Wall -Werror
BPF2GO_STRIP ?= llvm-strip-19
GO ?= go
export BPF2GO_CC BPF2GO_CFLAGS BPF2GO_STRIP
export PATH := $(PATH):/usr/local/go/bin

.PHONY: all deps generate build test test-host test-vm testsum check-generated lab bench

all: build

# Installs the apt packages and Go modules the build and the tests need.
deps:
	bash scripts/deps.sh

generate:
	cd bpf && $(GO) generate ./...

build:
	$(GO) build -o bin/mhbpf ./cmd/mhbpf

# The scenario in namespaces with mhbpf on its example configuration:
# failover and recovery, live. Needs root; touches no real interface.
lab: deps build
	./bin/mhbpf lab

# The benchmarks side by side, interleaved rounds, into bench/REPORT.md
# (medians, ratios to the test-run floor, kernel, CPU, the commands). As
# root; not run by `make test`, which builds them (go vet).
bench:
	GO=$(GO) bash bench/run.sh

# The committed bpf2go output must be what the pinned compiler makes of the
# committed C.
check-generated: generate
	@git diff --exit-code --stat -- bpf/ || { echo "generated BPF code is stale: run 'make generate' and commit" >&2; exit 1; }

# Everything CI runs. Needs root: the tests load BPF programs and build
# network namespaces. Every suite runs through scripts/testsum: it prints
# each skip with its reason and a line of counts, and fails on a skip that
# .ci/allowed-skips does not allow for that kernel. The last line is the
# total over all runs.
test: deps check-generated
	@rm -rf $(RESULTS)
	$(MAKE) --no-print-directory test-host test-vm
	@$(TESTSUM) -total $(RESULTS)/*.jsonl

RESULTS = $(CURDIR)/bin/test-results
TESTSUM = $(CURDIR)/bin/testsum

testsum:
	$(GO) build -o $(TESTSUM) ./scripts/testsum
	@mkdir -p $(RESULTS)

test-host: testsum
	$(GO) vet ./...
	@rm -f $(RESULTS)/host.jsonl
	$(TESTSUM) -where host -record $(RESULTS)/host.jsonl -jsonfile $(RESULTS)/host.json -- \
		$(GO) test -json -count=1 -timeout 20m ./...

# The same test binaries on Debian 12's 6.1 kernel in qemu (TCG; set
# MHBPF_VM_ACCEL=kvm where KVM works): the BPF programs under an older
# verifier, the clsact attach path (no tcx before 6.6), and real pppd.
# Of ./test/, the tests named in VM_TESTS run, each by its exact name: one
# that no longer exists (renamed, removed) fails the run, and so does a
# package of VM_PACKAGES without tests.
VM_EXEC = $(CURDIR)/test/vm/vm.sh
VM_PACKAGES = ./bpf/ ./internal/loader/ ./internal/routing/
VM_TESTS = TestPPPUplinks TestDaemonRestoresMainRouteWhenAnUplinkVanishes TestLANConnectionLeavesByChosenUplink \
	TestDaemonRepairsDetachedTC TestSpoofedPacketCannotRewritePolicy TestHairpinAndAnswersBeatSpecificRoutes
empty :=
space := $(empty) $(empty)
test-vm: build testsum
	@rm -f $(RESULTS)/vm.jsonl
	$(TESTSUM) -where vm -require-tests -record $(RESULTS)/vm.jsonl -jsonfile $(RESULTS)/vm-packages.json -- \
		$(GO) test -json -p 1 -count=1 -timeout 30m -exec $(VM_EXEC) $(VM_PACKAGES)
	MHBPF_BIN=$(CURDIR)/bin/mhbpf $(TESTSUM) -where vm -expect '$(VM_TESTS)' -record $(RESULTS)/vm.jsonl -jsonfile $(RESULTS)/vm-test.json -- \
		$(GO) test -json -count=1 -timeout 30m -exec $(VM_EXEC) -run '^($(subst $(space),|,$(strip $(VM_TESTS))))$$' ./test/
