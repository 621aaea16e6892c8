# One pinned compiler for the committed BPF objects: Debian 12's clang-19.
BPF2GO_CC ?= clang-19
BPF2GO_CFLAGS ?= -O2 -g -Wall -Werror
GO ?= go
export BPF2GO_CC BPF2GO_CFLAGS

.PHONY: all generate build test check-generated

all: build

generate:
	cd bpf && $(GO) generate ./...

build:
	$(GO) build -o bin/mhbpf ./cmd/mhbpf

check-generated: generate
	git diff --exit-code -- bpf/ || (echo "generated BPF code is stale: run make generate and commit" >&2; exit 1)
