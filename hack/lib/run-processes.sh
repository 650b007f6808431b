# shellcheck shell=bash disable=SC2154 # kubeconfig, k, state, namespace come from hack/run
# `hack/run processes`: the quick experiment without the chart. The operator and one agent process
# hosting CAPACITY_RUN_NODES simulated nodes (default 4, synthetic readings) run as local
# processes in the background (logs and pids in $state), the CRDs are applied with kubectl.

stop_one() {
  local file="$state/$1.pid"
  if [[ -f $file ]] && kill -0 "$(cat "$file")" 2>/dev/null; then
    kill -TERM -- "-$(cat "$file")" 2>/dev/null || kill -TERM "$(cat "$file")" 2>/dev/null || true
    echo "run: stopped $1"
  fi
  rm -f "$file"
}

stop_processes() {
  stop_one operator
  stop_one agents
}

start_bg() {
  local name=$1
  shift
  if [[ -f $state/$name.pid ]] && kill -0 "$(cat "$state/$name.pid")" 2>/dev/null; then
    echo "run: $name already running (pid $(cat "$state/$name.pid"), log $state/$name.log)"
    return
  fi
  setsid "$@" </dev/null >>"$state/$name.log" 2>&1 &
  echo $! >"$state/$name.pid"
  echo "run: started $name (pid $!, log $state/$name.log)"
}

run_processes() {
  local nodes=${CAPACITY_RUN_NODES:-4} ready
  echo "run: installing CRDs"
  k apply --server-side --force-conflicts -f crds/ >/dev/null
  k wait --for condition=Established --timeout 60s -f crds/ >/dev/null
  k create namespace "$namespace" --dry-run=client -o yaml | k apply -f - >/dev/null
  start_bg agents capacity-agent --kubeconfig "$kubeconfig" --node-name sim --simulate "$nodes" \
    --source synthetic:steady --interval 0.25 --publish-interval 2 --lease-namespace "$namespace"
  start_bg operator capacity-operator --kubeconfig "$kubeconfig" --namespace "$namespace"
  echo "run: waiting for $nodes nodes to publish Ready readings"
  for _ in $(seq 1 120); do
    ready=$(k get cn -o jsonpath='{range .items[*]}{.metadata.name}={.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' |
      grep -c '^sim-[0-9]*=True$' || true)
    ((ready >= nodes)) && break
    sleep 1
  done
  k apply -f examples/claims.yaml
  for _ in $(seq 1 60); do
    claims_settled && break
    sleep 1
  done
  k get cc,cn -A
  echo "Stop them with: hack/run processes-stop"
}
