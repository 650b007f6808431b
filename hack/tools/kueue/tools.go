//go:build tools

// Package tools pins Kueue's manager, which `make bench-kueue` (hack/kueue) runs beside the
// local control plane to compare its admission with ours. Nothing here is shipped.
package tools

import (
	_ "sigs.k8s.io/kueue/cmd/kueue"
)
