package routing

import "testing"

// The diff of a state to itself is empty; from both uplinks up to isp2's
// link gone, only the routes change (the rules stay: the kernel falls
// through them), main's route replaced in its slot, isp2's table emptied.
func TestChanges(t *testing.T) {
	both := Desired(settings, uplinks(2, 3, true), lan)
	if d := Changes(both, both); !d.Empty() {
		t.Fatalf("diff of a state to itself:\n%s", d)
	}
	down := Desired(settings, uplinks(2, 3, false), lan)
	got := Changes(both, down).String()
	want := `+ default table 254 via 100.64.0.1 dev #2
- default table 101 via 100.64.1.1 dev #3
`
	if got != want {
		t.Fatalf("diff, both up to isp2 down:\n%s\nwant:\n%s", got, want)
	}
	if got := Changes(State{}, both); len(got.AddRules) != len(both.Rules) || len(got.PutRoutes) != len(both.Routes) {
		t.Fatalf("from nothing: %d rules, %d routes; want %d, %d", len(got.AddRules), len(got.PutRoutes), len(both.Rules), len(both.Routes))
	}
}
