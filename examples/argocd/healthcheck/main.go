// Command healthcheck runs an Argo CD health script on one Kubernetes object and prints the
// health Argo CD would show, as JSON: {"status": "...", "message": "..."}.
//
//	kubectl get ltj my-job -o json | go run . ../health.lua
//	go run . ../health.lua job.json
//
// It reproduces the Lua environment Argo CD gives a health script from resource.customizations
// (Argo CD v3.6, util/lua/lua.go): gopher-lua with the standard libraries skipped and only package, base and
// table opened (no string or math library unless an admin sets useOpenLibs, which this example does
// not need); the object as the global `obj`, decoded from JSON the same way; a one-second time
// limit; the chunk's returned table encoded with gopher-json and read as {status, message} (an
// empty table gives an empty health), and a status outside Argo CD's set replaced by Unknown. Argo CD also opens a reduced `os` library; the
// example script does not use it, so it is left out here and any use of it fails the tests.
//
// Exit status: 0 with the health on stdout; 1 when the script fails to run or returns something
// Argo CD would refuse (Argo CD then reports the resource's health as an error), with the reason on
// stderr; 2 for bad usage or input.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"time"

	lua "github.com/yuin/gopher-lua"
	luajson "layeh.com/gopher-json"
)

// The health codes Argo CD accepts from a script (gitops-engine's health package).
var validStatuses = map[string]bool{
	"Unknown": true, "Progressing": true, "Suspended": true, "Healthy": true, "Degraded": true, "Missing": true,
}

type health struct {
	Status  string `json:"status,omitempty"`
	Message string `json:"message,omitempty"`
}

func main() {
	if len(os.Args) < 2 || len(os.Args) > 3 {
		fmt.Fprintln(os.Stderr, "usage: healthcheck SCRIPT.lua [OBJECT.json]   (the object is read from stdin without OBJECT.json)")
		os.Exit(2)
	}
	script, err := os.ReadFile(os.Args[1])
	if err != nil {
		fail(2, "reading the script: %v", err)
	}
	var input io.Reader = os.Stdin
	if len(os.Args) == 3 {
		file, err := os.Open(os.Args[2])
		if err != nil {
			fail(2, "reading the object: %v", err)
		}
		defer file.Close()
		input = file
	}
	var object map[string]interface{}
	if err := json.NewDecoder(input).Decode(&object); err != nil {
		fail(2, "the object is not a JSON object: %v", err)
	}
	result, err := run(string(script), object)
	if err != nil {
		fail(1, "%v", err)
	}
	out, _ := json.Marshal(result)
	fmt.Println(string(out))
}

func fail(code int, format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "healthcheck: "+format+"\n", args...)
	os.Exit(code)
}

func run(script string, object map[string]interface{}) (*health, error) {
	state := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer state.Close()
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
	} {
		if err := state.CallByParam(lua.P{Fn: state.NewFunction(lib.open), NRet: 0, Protect: true},
			lua.LString(lib.name)); err != nil {
			return nil, fmt.Errorf("opening the %s library: %w", lib.name, err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	state.SetContext(ctx)
	state.SetGlobal("obj", toLua(state, object))
	if err := state.DoString(script); err != nil {
		return nil, fmt.Errorf("the script failed: %w", err)
	}
	returned := state.Get(-1)
	if returned.Type() == lua.LTNil {
		// Argo CD then shows no health at all for the object: never what a health script means.
		return nil, fmt.Errorf("the script returned nothing, so Argo CD would assess no health (does it end with `return hs`?)")
	}
	if returned.Type() != lua.LTTable {
		return nil, fmt.Errorf("expect table output from Lua script, not %s", returned.Type().String())
	}
	encoded, err := luajson.Encode(returned)
	if err != nil {
		return nil, fmt.Errorf("encoding the returned table: %w", err)
	}
	if string(encoded) == "[]" {
		return &health{}, nil // gopher-json encodes an empty table as a list; Argo CD reads it as no status
	}
	result := &health{}
	if err := json.Unmarshal(encoded, result); err != nil {
		return nil, fmt.Errorf("the returned table is not {status, message} with string values: %s: %w", encoded, err)
	}
	if !validStatuses[result.Status] {
		return &health{Status: "Unknown", Message: "Lua returned an invalid health status"}, nil
	}
	return result, nil
}

// toLua converts decoded JSON the way Argo CD hands an object to its scripts: numbers become Lua
// numbers, lists become array tables, objects become tables with string keys, null is nil.
func toLua(state *lua.LState, value interface{}) lua.LValue {
	switch v := value.(type) {
	case bool:
		return lua.LBool(v)
	case float64:
		return lua.LNumber(v)
	case string:
		return lua.LString(v)
	case []interface{}:
		table := state.CreateTable(len(v), 0)
		for _, item := range v {
			table.Append(toLua(state, item))
		}
		return table
	case map[string]interface{}:
		table := state.CreateTable(0, len(v))
		for key, item := range v {
			table.RawSetH(lua.LString(key), toLua(state, item))
		}
		return table
	}
	return lua.LNil
}
