package config

import (
	"errors"
	"testing"
)

// Any input gives a config or a config.Error naming the file, never a
// panic or another kind of error.
func FuzzParse(f *testing.F) {
	f.Add(Scenario)
	f.Add([]byte(base))
	f.Add([]byte("[[uplink]]\nname = \"a\"\n[[uplink]\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		_, err := Parse("f.toml", data)
		var ce *Error
		if err != nil && !errors.As(err, &ce) {
			t.Fatalf("error of type %T: %v", err, err)
		}
	})
}
