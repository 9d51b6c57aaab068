// cni-runner drives a CNI network list through the reference libcni, as a
// container runtime would (tests/test_cni.py builds it in GOPATH mode, offline,
// against Debian's golang-github-appc-cni-dev).
//
//	cni-runner add|check|del|cached|validate CONFLIST
//
// The attachment comes from the environment: RUNNER_CONTAINERID, RUNNER_NETNS,
// RUNNER_IFNAME, RUNNER_CACHEDIR, RUNNER_PATH (plugin directories, ':'), and
// RUNNER_CAPS (a JSON object of capability args, e.g. CNIDeviceInfoFile).
// Success prints a JSON object on stdout and exits 0; a failure prints
// {"error": ..., "code": ...} (code 0 when libcni itself refused) and exits 1.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
)

func fail(err error) {
	code := uint(0)
	var cniErr *types.Error
	if errors.As(err, &cniErr) {
		code = cniErr.Code
	}
	out, _ := json.Marshal(map[string]interface{}{"error": err.Error(), "code": code})
	fmt.Println(string(out))
	os.Exit(1)
}

func emit(v interface{}) {
	out, err := json.Marshal(v)
	if err != nil {
		fail(err)
	}
	fmt.Println(string(out))
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: cni-runner add|check|del|cached|validate CONFLIST")
		os.Exit(2)
	}
	list, err := libcni.ConfListFromFile(os.Args[2])
	if err != nil {
		fail(err)
	}
	cninet := libcni.NewCNIConfigWithCacheDir(
		strings.Split(os.Getenv("RUNNER_PATH"), ":"), os.Getenv("RUNNER_CACHEDIR"), nil)
	rt := &libcni.RuntimeConf{
		ContainerID: os.Getenv("RUNNER_CONTAINERID"),
		NetNS:       os.Getenv("RUNNER_NETNS"),
		IfName:      os.Getenv("RUNNER_IFNAME"),
	}
	if caps := os.Getenv("RUNNER_CAPS"); caps != "" {
		if err := json.Unmarshal([]byte(caps), &rt.CapabilityArgs); err != nil {
			fail(err)
		}
	}
	ctx := context.Background()
	switch os.Args[1] {
	case "add":
		res, err := cninet.AddNetworkList(ctx, list, rt)
		if err != nil {
			fail(err)
		}
		emit(res)
	case "check":
		if err := cninet.CheckNetworkList(ctx, list, rt); err != nil {
			fail(err)
		}
		emit(map[string]bool{"ok": true})
	case "del":
		if err := cninet.DelNetworkList(ctx, list, rt); err != nil {
			fail(err)
		}
		emit(map[string]bool{"ok": true})
	case "cached":
		res, err := cninet.GetNetworkListCachedResult(list, rt)
		if err != nil {
			fail(err)
		}
		emit(res) // null when nothing is cached
	case "validate":
		caps, err := cninet.ValidateNetworkList(ctx, list)
		if err != nil {
			fail(err)
		}
		emit(map[string][]string{"capabilities": caps})
	default:
		fmt.Fprintln(os.Stderr, "unknown action", os.Args[1])
		os.Exit(2)
	}
}
