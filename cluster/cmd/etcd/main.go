// Command etcd is etcd's server, built from its Go module at the version go.mod pins
// (the one Kubernetes' own go.mod names).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
