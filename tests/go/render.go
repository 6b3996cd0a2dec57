package main

import (
	"encoding/json"
	"fmt"
	"os"
	"text/template"
)

// Reads [{"template": ..., "data": ...}, ...] on stdin and prints the renderings as a JSON list.
func main() {
	var cases []struct {
		Template string         `json:"template"`
		Data     map[string]any `json:"data"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	out := []string{}
	for _, c := range cases {
		t, err := template.New("").Funcs(funcs).Parse(c.Template)
		if err != nil {
			out = append(out, "PARSE ERROR: "+err.Error())
			continue
		}
		var b stringsBuilder
		if err := t.Execute(&b, c.Data); err != nil {
			out = append(out, "EXEC ERROR: "+err.Error())
			continue
		}
		out = append(out, b.String())
	}
	enc, _ := json.Marshal(out)
	fmt.Println(string(enc))
}

type stringsBuilder struct{ s []byte }

func (b *stringsBuilder) Write(p []byte) (int, error) { b.s = append(b.s, p...); return len(p), nil }
func (b *stringsBuilder) String() string              { return string(b.s) }
