//go:build tools

// Package tools pins helm, which installs the chart in the e2e tests and `make run`.
// It is built with `go build` from this module; nothing here is shipped.
package tools

import (
	_ "helm.sh/helm/v3/cmd/helm"
)
