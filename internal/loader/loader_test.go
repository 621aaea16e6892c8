package loader_test

import (
	"testing"

	"github.com/mhbpf/mhbpf/internal/loader"
	"github.com/mhbpf/mhbpf/internal/testutil"
)

func TestLoadVerifies(t *testing.T) {
	testutil.RequireRoot(t)
	dir := testutil.PinDir(t, loader.Remove)
	d, err := loader.Load(loader.Options{PinDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
}
