# shellcheck shell=bash disable=SC2154 # the variables named come from hack/control-plane
# The local cluster's kwok nodes: fake Nodes whose pods go Running without containers, for
# tests and benchmarks at scale (sourced by hack/control-plane).
#
# kwok manages only the Nodes annotated kwok.x-k8s.io/node=fake, which this script creates:
# kwok-node-0 .. kwok-node-(N-1). Their stages (node initialisation, heartbeat with Leases, pod
# ready/complete/delete) are kwok's own defaults, read from the pinned kwok module.

kwok_nodes=${CAPACITY_CP_KWOK_NODES:-3}
kwok_dir="$state/kwok"

kwok_module_dir() {
  local version
  version=$(sed -n 's/^require sigs.k8s.io\/kwok \(v[0-9.]*\)$/\1/p' "$here/tools/kwok/go.mod")
  (cd "$here/tools/kwok" && GOFLAGS=-mod=readonly go mod download -json "sigs.k8s.io/kwok@$version") |
    sed -n 's/.*"Dir": "\(.*\)".*/\1/p'
}

write_kwok_config() {
  local stages
  stages=$(kwok_module_dir)
  [[ -d $stages/kustomize/stage ]] || { log "kwok module not found (go mod download failed)"; exit 1; }
  stages="$stages/kustomize/stage"
  mkdir -p "$kwok_dir"
  {
    cat <<YAML
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokConfiguration
options:
  # fake pod addresses: the upper half of the node subnet, on the bridge, never routed off
  cidr: $(nth_ip "$node_subnet" 32768)/17
  nodeIP: $(nth_ip "$node_subnet" 2)
  manageAllNodes: false
  manageNodesWithAnnotationSelector: kwok.x-k8s.io/node=fake
  nodeLeaseDurationSeconds: 40
  # defaults that a configuration file does not fill in by itself
  nodeLeaseParallelism: 4
  nodePlayStageParallelism: 4
  podPlayStageParallelism: 4
  podsOnNodeSyncParallelism: 1
YAML
    local f
    for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
      pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
      echo "---"
      cat "$stages/$f"
    done
  } >"$kwok_dir/kwok.yaml.tmp"
  mv -f "$kwok_dir/kwok.yaml.tmp" "$kwok_dir/kwok.yaml"
}

kwok_node_manifest() {  # index
  # no node.alpha.kubernetes.io/ttl here: kube-controller-manager's TTL controller owns it and
  # raises it once the cluster has more than 100 nodes, and a value of ours would then conflict
  # with it on the next `up`
  local name="kwok-node-$1"
  cat <<YAML
apiVersion: v1
kind: Node
metadata:
  name: $name
  annotations:
    kwok.x-k8s.io/node: fake
  labels:
    kubernetes.io/hostname: $name
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    type: kwok
    capacity.platform.dev/node-kind: kwok
status:
  capacity: {cpu: "16", memory: 64Gi, pods: "110", ephemeral-storage: 100Gi}
  allocatable: {cpu: "16", memory: 64Gi, pods: "110", ephemeral-storage: 100Gi}
YAML
}

kwok_nodes_ready() {
  local ready
  ready=$(kubectl_node get nodes -l type=kwok \
    -o 'jsonpath={range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' \
    2>/dev/null | grep -c True || true)
  ((ready >= kwok_nodes))
}

kwok_up() {
  if ((kwok_nodes == 0)); then
    stop_pid kwok 5
    return 0
  fi
  if ! pid_alive "$state/kwok.pid"; then
    write_kwok_config
    log "starting kwok for $kwok_nodes fake nodes"
    spawn kwok "$("$here/kube-tools" path kwok)" \
      --kubeconfig "$kubeconfig" --config "$kwok_dir/kwok.yaml" --v=1
  fi
  local i manifests=""
  for ((i = 0; i < kwok_nodes; i++)); do
    manifests+=$(kwok_node_manifest "$i")$'\n---\n'
  done
  kubectl_node apply --server-side --field-manager=capacity-control-plane -f - \
    <<<"$manifests" >/dev/null
  # nodes past the wanted count go (CAPACITY_CP_KWOK_NODES was lowered)
  local name
  for name in $(kubectl_node get nodes -l type=kwok -o name 2>/dev/null); do
    i=${name##*kwok-node-}
    if [[ $i =~ ^[0-9]+$ ]] && ((i >= kwok_nodes)); then
      kubectl_node delete "$name" --wait=false >/dev/null
    fi
  done
  wait_for kwok kwok_nodes_ready
}

kwok_down() { stop_pid kwok 5; }

kwok_status() {
  if ((kwok_nodes == 0)); then
    printf '%-24s none (CAPACITY_CP_KWOK_NODES=0)\n' "kwok:"
  elif pid_alive "$state/kwok.pid"; then
    printf '%-24s running (pid %s, %s nodes)\n' "kwok:" "$(cat "$state/kwok.pid")" "$kwok_nodes"
  else
    printf '%-24s stopped\n' "kwok:"
    return 1
  fi
}
