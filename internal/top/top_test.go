package top

import "testing"

func TestSparkline(t *testing.T) {
	for _, c := range []struct {
		h    []float64
		want string
	}{
		{nil, ""},
		{[]float64{0, 0}, "▁▁"},
		{[]float64{0, 4, 8}, "▁▅█"},
		{[]float64{8, -1, -1, 2, 8}, "█××▃█"},
	} {
		if got := Sparkline(c.h); got != c.want {
			t.Errorf("%v: %q, want %q", c.h, got, c.want)
		}
	}
}
