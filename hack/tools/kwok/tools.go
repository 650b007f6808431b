//go:build tools

// Package tools pins kwok, which runs the local cluster's fake nodes.
// It is built with `go build` from this module; nothing here is shipped.
package tools

import (
	_ "sigs.k8s.io/kwok/cmd/kwok"
)
