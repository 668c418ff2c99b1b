// Executes Ollama TEMPLATEs with Go's own text/template, for tests/test_modelfile.py: reads a JSON
// list of {Template, System, Messages: [{Role, Content}]} on stdin and writes the JSON list of
// outputs (or "ERROR: ..." for a template Go refuses). The data has the shape Ollama passes.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type message struct {
	Role    string
	Content string
}

type request struct {
	Template string
	System   string
	Messages []*message
}

func main() {
	var requests []request
	if err := json.NewDecoder(os.Stdin).Decode(&requests); err != nil {
		panic(err)
	}
	outputs := []string{}
	for _, r := range requests {
		var out strings.Builder
		t, err := template.New("").Parse(r.Template)
		if err == nil {
			err = t.Execute(&out, map[string]any{"System": r.System, "Messages": r.Messages, "Tools": nil,
				"Response": "", "Think": false, "IsThinkSet": false})
		}
		if err != nil {
			outputs = append(outputs, "ERROR: "+err.Error())
		} else {
			outputs = append(outputs, out.String())
		}
	}
	if err := json.NewEncoder(os.Stdout).Encode(outputs); err != nil {
		panic(err)
	}
}
