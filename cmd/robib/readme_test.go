package main

import (
	"fmt"
	"maps"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/spf13/pflag"

	"github.com/robib/robib/cmd/internal/config"
)

const readme = "../../README.md"

// readmeRow is one flag of the README's agent flag table. A row may name
// several flags ("`--a` / `--b`") with as many defaults ("1 / 2").
type readmeRow struct {
	flag, def, meaning string
	line               int
}

var readmeFlag = regexp.MustCompile("^`--([a-z0-9-]+)`$")

// readmeFlagTable parses the table under the header "| flag | default |
// meaning |" in the README.
func readmeFlagTable(text string) ([]readmeRow, error) {
	lines := strings.Split(text, "\n")
	start := -1
	for i, l := range lines {
		if strings.TrimSpace(l) == "| flag | default | meaning |" {
			if start >= 0 {
				return nil, fmt.Errorf("two agent flag tables (lines %d and %d)", start+1, i+1)
			}
			start = i
		}
	}
	if start < 0 {
		return nil, fmt.Errorf(`no agent flag table (a header "| flag | default | meaning |")`)
	}
	var rows []readmeRow
	for i := start + 2; i < len(lines) && strings.HasPrefix(lines[i], "|"); i++ {
		cells := strings.Split(strings.Trim(strings.TrimSpace(lines[i]), "|"), "|")
		if len(cells) < 3 {
			return nil, fmt.Errorf("line %d: %d cells, want flag | default | meaning", i+1, len(cells))
		}
		flags := strings.Split(strings.TrimSpace(cells[0]), " / ")
		defs := strings.Split(strings.TrimSpace(cells[1]), " / ")
		if len(defs) != len(flags) {
			return nil, fmt.Errorf("line %d: %d flags but %d defaults (write them as \"a / b\")", i+1, len(flags), len(defs))
		}
		for j, f := range flags {
			m := readmeFlag.FindStringSubmatch(strings.TrimSpace(f))
			if m == nil {
				return nil, fmt.Errorf("line %d: %q is not a flag written as `--name`", i+1, f)
			}
			def := strings.Trim(strings.TrimSpace(defs[j]), "`")
			rows = append(rows, readmeRow{flag: m[1], def: def, meaning: strings.TrimSpace(strings.Join(cells[2:], "|")), line: i + 1})
		}
	}
	return rows, nil
}

// TestREADMEFlagTable: the README's agent flag table lists exactly the
// flags of `robib agent --help`, each with its default as the settings
// table documents it ("host name" where --help shows this host's name).
func TestREADMEFlagTable(t *testing.T) {
	text, err := os.ReadFile(readme)
	if err != nil {
		t.Fatal(err)
	}
	rows, err := readmeFlagTable(string(text))
	if err != nil {
		t.Fatalf("%s: %v", readme, err)
	}
	doc := map[string]config.Setting{}
	for _, s := range config.Settings() {
		doc[s.Key] = s
	}
	_, agent := agentCmd(t)
	want := map[string]*pflag.Flag{}
	agent.LocalFlags().VisitAll(func(f *pflag.Flag) {
		if f.Name != "help" {
			want[f.Name] = f
		}
	})
	seen := map[string]int{}
	for _, r := range rows {
		if prev, ok := seen[r.flag]; ok {
			t.Errorf("%s:%d: --%s is listed again (first on line %d): remove one", readme, r.line, r.flag, prev)
			continue
		}
		seen[r.flag] = r.line
		f, ok := want[r.flag]
		if !ok {
			t.Errorf("%s:%d: --%s is not a flag of robib agent: remove it from the table", readme, r.line, r.flag)
			continue
		}
		def := f.DefValue
		if s, ok := doc[r.flag]; ok {
			def = s.Doc
		}
		if r.def != def {
			t.Errorf("%s:%d: --%s default is %q, robib agent's is %q: change the default column to %q", readme, r.line, r.flag, r.def, f.DefValue, def)
		}
		if r.meaning == "" {
			t.Errorf("%s:%d: --%s has no meaning: write one (--help says %q)", readme, r.line, r.flag, f.Usage)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(want)) {
		if f := want[name]; seen[name] == 0 {
			def := f.DefValue
			if s, ok := doc[name]; ok {
				def = s.Doc
			}
			t.Errorf("%s: the agent flag table has no row for --%s: add | `--%s` | %s | %s |", readme, name, name, def, f.Usage)
		}
	}
	// The CLI's --api is documented in the text about the CLI.
	for _, s := range config.ClientSettings() {
		for _, must := range []string{"`--" + s.Key, "`" + s.Env + "`", "`" + s.Default + "`"} {
			if !strings.Contains(string(text), must) {
				t.Errorf("%s: the CLI section does not mention %s (--%s, %s, default %s)", readme, must, s.Key, s.Env, s.Default)
			}
		}
	}
}

// TestREADMEFlagTableParser: the parser reads combined rows and refuses
// tables it cannot check, so a malformed README fails instead of passing
// vacuously.
func TestREADMEFlagTableParser(t *testing.T) {
	good := "x\n| flag | default | meaning |\n| --- | --- | --- |\n| `--a` / `--b` | `1` / 2s | both |\n| `--c` | | see | this |\n\nafter\n"
	rows, err := readmeFlagTable(good)
	if err != nil {
		t.Fatal(err)
	}
	want := []readmeRow{{"a", "1", "both", 4}, {"b", "2s", "both", 4}, {"c", "", "see | this", 5}}
	if fmt.Sprint(rows) != fmt.Sprint(want) {
		t.Fatalf("rows %+v, want %+v", rows, want)
	}
	for name, bad := range map[string]string{
		"no table":       "| flag | value |\n| --- | --- |\n| `--a` | 1 |\n",
		"two tables":     "| flag | default | meaning |\n| --- | --- | --- |\n\n| flag | default | meaning |\n",
		"count mismatch": "| flag | default | meaning |\n| --- | --- | --- |\n| `--a` / `--b` | 1 | x |\n",
		"not a flag":     "| flag | default | meaning |\n| --- | --- | --- |\n| a | 1 | x |\n",
		"too few cells":  "| flag | default | meaning |\n| --- | --- | --- |\n| `--a` |\n",
	} {
		if rows, err := readmeFlagTable(bad); err == nil {
			t.Errorf("%s: accepted, rows %+v", name, rows)
		}
	}
}
