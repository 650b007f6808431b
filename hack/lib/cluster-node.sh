# shellcheck shell=bash disable=SC2154 # the variables named come from hack/control-plane
# The local cluster's real node: containerd + runc + kubelet on a bridge this script creates,
# and the bookkeeping that lets `down` restore the host (sourced by hack/control-plane).
#
# Every address lives on the bridge: the node's address, its pods' addresses, the `kubernetes`
# Service address (forwarded to the API server on loopback) and the kwok pods' fake addresses.
# Pods get routes to the bridge's subnet and the Service range only: no default route, no
# masquerade, and IP forwarding stays as it was, so no packet of the cluster leaves the machine.
#
# What the kubelet and containerd change on the host beyond their own directories (sysctls,
# iptables chains and rules, a few fixed paths) is recorded before the first node on this
# machine starts and restored when the last one stops: several clusters (different
# CAPACITY_CP_DIR, ports, bridge and subnets) may run side by side.

node_name=${CAPACITY_CP_NODE_NAME:-capacity-node}
bridge=${CAPACITY_CP_BRIDGE:-cpbr0}
node_subnet=${CAPACITY_CP_NODE_SUBNET:-10.244.0.0/16}
[[ ${node_subnet#*/} == 16 ]] || { log "CAPACITY_CP_NODE_SUBNET must be a /16 (got $node_subnet)"; exit 2; }
real_node=${CAPACITY_CP_REAL_NODE:-auto}
node_dir="$state/node"
containerd_dir="$node_dir/containerd"
containerd_sock="$containerd_dir/containerd.sock"
kubelet_dir="$node_dir/kubelet"
cgroup_name="capacity-$bridge"
host_dir=${CAPACITY_HOST_STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/capacity-platform/host}
node_ip=$(first_ip "$node_subnet")
kubelet_port=10250
route_metric=4242
node_labels="capacity.platform.dev/node-kind=real"
# Workloads land on the real node only when they tolerate this taint (kwok nodes take the rest).
node_taint_key="capacity.platform.dev/real-node"

# Host settings the kubelet (or a CNI plugin) is known to change; recorded, then restored.
host_sysctls=(
  vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes
  net.ipv4.ip_forward net.ipv4.conf.all.forwarding net.ipv6.conf.all.forwarding
  net.ipv4.conf.all.route_localnet net.bridge.bridge-nf-call-iptables
  net.bridge.bridge-nf-call-ip6tables
)
# Paths the kubelet, containerd or the CNI library use whatever their configuration says.
host_paths=(
  /var/lib/kubelet /var/log/containers /var/log/pods /run/containerd /var/lib/containerd
  /var/lib/cni /etc/cni /opt/cni /run/netns /usr/libexec/kubernetes
)
iptables_tables=(filter nat mangle raw security)

kubectl_node() { "$("$here/kube-tools" path kubectl)" --kubeconfig "$kubeconfig" "$@"; }

# --- can this machine run a kubelet? -------------------------------------------------------------

node_unavailable_reason() {
  case $real_node in
    0 | false | no) echo "CAPACITY_CP_REAL_NODE=$real_node"; return ;;
  esac
  ((EUID == 0)) || { echo "not root (a kubelet needs root)"; return; }
  [[ $(uname -s) == Linux ]] || { echo "not Linux"; return; }
  if ! awk '$1 == "memory" && $4 == 1 {found=1} END {exit !found}' /proc/cgroups 2>/dev/null &&
    [[ ! -f /sys/fs/cgroup/cgroup.controllers ]]; then
    echo "no memory cgroup controller"
    return
  fi
  [[ -w /sys/fs/cgroup ]] || [[ -w /sys/fs/cgroup/memory ]] || { echo "cgroups are read-only"; return; }
  command -v ip >/dev/null || { echo "no 'ip' command (iproute2)"; return; }
  if ! "$here/ensure-debs" containerd runc containernetworking-plugins iptables conntrack \
    socat >>"$state/node-packages.log" 2>&1; then
    echo "could not install containerd, runc and the CNI plugins (see $state/node-packages.log)"
    return
  fi
}

# --- host state: record once, restore when the last node of this machine stops -----------------

instance_file() { echo "$host_dir/instances/$(echo -n "$state" | sha256sum | cut -c1-16)"; }

instance_alive() {  # state directory of an instance
  pid_alive "$1/containerd.pid" || pid_alive "$1/kubelet.pid"
}

# A second cluster on the same bridge would take over the first one's addresses, cgroups and
# pods: refuse, and name the settings that keep clusters apart.
bridge_owner() {  # the state directory of another running cluster on this bridge, if any
  local f other_state other_bridge
  for f in "$host_dir"/instances/*; do
    [[ -f $f && $f != "$(instance_file)" ]] || continue
    { read -r other_state; read -r other_bridge; } <"$f" || continue
    if [[ $other_bridge == "$bridge" ]] && instance_alive "$other_state"; then
      echo "$other_state"
      return 0
    fi
  done
  return 0
}

check_bridge_free() {
  local owner
  owner=$(bridge_owner)
  if [[ -n $owner ]]; then
    log "bridge $bridge belongs to the running cluster in $owner: give this one its own"
    log "CAPACITY_CP_BRIDGE, CAPACITY_CP_NODE_SUBNET and CAPACITY_CP_SERVICE_CIDR, or"
    log "CAPACITY_CP_REAL_NODE=0"
    exit 1
  fi
}

# true when `down` may touch the node's shared resources (cgroups, bridge, routes): this cluster
# ran a node, and no other running cluster owns the bridge
node_is_ours() {
  [[ -d $node_dir && ! -f $node_dir/unavailable ]] || return 1
  local owner
  owner=$(bridge_owner)
  if [[ -n $owner ]]; then
    log "bridge $bridge belongs to the running cluster in $owner: leaving its node alone"
    return 1
  fi
}

other_live_instance() {  # another cluster of this machine still runs a node
  local f
  for f in "$host_dir"/instances/*; do
    [[ -f $f && $f != "$(instance_file)" ]] || continue
    instance_alive "$(head -n 1 "$f")" && return 0
  done
  return 1
}

iptables_rules() {  # tool table: the rules and chains, without counters
  "$1" -w 5 -t "$2" -S 2>/dev/null || true
}

host_record() {
  mkdir -p "$host_dir/instances"
  printf '%s\n%s\n' "$state" "$bridge" >"$(instance_file)"
  [[ -d $host_dir/before ]] && return
  local tmp="$host_dir/before.tmp" key tool table path
  rm -rf "$tmp"
  mkdir -p "$tmp"
  for key in "${host_sysctls[@]}"; do
    [[ -e /proc/sys/${key//.//} ]] && echo "$key=$(cat "/proc/sys/${key//.//}")"
  done >"$tmp/sysctl"
  for tool in iptables ip6tables; do
    command -v "$tool" >/dev/null || continue
    for table in "${iptables_tables[@]}"; do
      iptables_rules "$tool" "$table" >"$tmp/$tool-$table"
    done
  done
  for path in "${host_paths[@]}"; do
    [[ -e $path || -L $path ]] && echo "$path"
  done >"$tmp/paths"
  mv "$tmp" "$host_dir/before"
  log "recorded host state in $host_dir/before"
}

# shellcheck disable=SC2120 # "$@" is set by eval, for the iptables rule being deleted
host_restore() {
  rm -f "$(instance_file)"
  [[ -d $host_dir/before ]] || return 0
  if other_live_instance; then
    log "another local node still runs: host settings stay until it stops"
    return 0
  fi
  local before="$host_dir/before" line key value tool table chain path
  while IFS= read -r line; do
    key=${line%%=*} value=${line#*=}
    if [[ $(cat "/proc/sys/${key//.//}" 2>/dev/null) != "$value" ]]; then
      log "restoring sysctl $key=$value"
      printf '%s\n' "$value" >"/proc/sys/${key//.//}" || log "could not restore $key"
    fi
  done <"$before/sysctl"
  for tool in iptables ip6tables; do
    for table in "${iptables_tables[@]}"; do
      [[ -f $before/$tool-$table ]] || continue
      local now
      now=$(iptables_rules "$tool" "$table")
      # rules added since: delete them (-A ... becomes -D ...); then the chains added since
      while IFS= read -r line; do
        [[ $line == -A* ]] || continue
        grep -qxF -- "$line" "$before/$tool-$table" && continue
        eval "set -- ${line/#-A/-D}"
        "$tool" -w 5 -t "$table" "$@" 2>/dev/null || log "$tool -t $table: could not delete: $line"
      done <<<"$now"
      while IFS= read -r line; do
        [[ $line == -N* ]] || continue
        grep -qxF -- "$line" "$before/$tool-$table" && continue
        chain=${line#-N }
        log "removing $tool chain $chain (table $table)"
        "$tool" -w 5 -t "$table" -F "$chain" 2>/dev/null || true
        "$tool" -w 5 -t "$table" -X "$chain" 2>/dev/null || log "could not remove $tool chain $chain"
      done <<<"$now"
    done
  done
  for path in "${host_paths[@]}"; do
    [[ -e $path || -L $path ]] || continue
    grep -qxF -- "$path" "$before/paths" && continue
    if grep -q " ${path}[/ ]" /proc/self/mountinfo; then
      log "not removing $path: something is mounted under it"
      continue
    fi
    log "removing $path (it did not exist before the node)"
    rm -rf "$path"
  done
  rm -rf "$before"
}

# --- cgroups, mounts, leftovers --------------------------------------------------------------------

cgroup_hierarchies() {  # mount points of every cgroup hierarchy (v1 controllers and v2)
  awk '$0 ~ / - cgroup2? / {print $5}' /proc/self/mountinfo
}

cgroup_setup() {
  local mnt dir
  while IFS= read -r mnt; do
    [[ -f $mnt/cgroup.controllers ]] && continue  # cgroup v2: the kubelet creates what it needs
    dir="$mnt/$cgroup_name"
    mkdir -p "$dir"
    if [[ -f $mnt/cpuset.cpus ]]; then  # a new cpuset cgroup starts empty: inherit the parent's
      [[ -n $(cat "$dir/cpuset.cpus") ]] || cat "$mnt/cpuset.cpus" >"$dir/cpuset.cpus"
      [[ -n $(cat "$dir/cpuset.mems") ]] || cat "$mnt/cpuset.mems" >"$dir/cpuset.mems"
    fi
  done < <(cgroup_hierarchies)
  # cgroup v2 (unified) hosts: the root has to hand the controllers down
  if [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then
    mkdir -p "/sys/fs/cgroup/$cgroup_name"
  fi
}

cgroup_pids() {  # every process in the node's cgroups
  local mnt
  while IFS= read -r mnt; do
    [[ -d $mnt/$cgroup_name ]] || continue
    find "$mnt/$cgroup_name" -name cgroup.procs -exec cat {} + 2>/dev/null
  done < <(cgroup_hierarchies) | sort -u
}

kill_cgroup_processes() {
  local pids i
  for ((i = 0; i < 50; i++)); do
    pids=$(cgroup_pids)
    [[ -n $pids ]] || return 0
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    sleep 0.1
  done
  log "processes still in the node's cgroups after 5 s: $(cgroup_pids | tr '\n' ' ')"
}

cgroup_remove() {
  local mnt
  while IFS= read -r mnt; do
    [[ -d $mnt/$cgroup_name ]] || continue
    find "$mnt/$cgroup_name" -depth -type d -exec rmdir {} + 2>/dev/null ||
      log "could not remove every cgroup under $mnt/$cgroup_name"
  done < <(cgroup_hierarchies)
}

node_mounts() {  # mount points under the node's state directory, deepest first
  awk -v prefix="$node_dir/" 'index($5, prefix) == 1 || $5 == substr(prefix, 1, length(prefix) - 1) {print $5}' \
    /proc/self/mountinfo | while IFS= read -r m; do printf '%b\n' "$m"; done | sort -r -u
}

unmount_node() {
  local m
  while IFS= read -r m; do
    [[ -n $m ]] || continue
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "could not unmount $m"
  done < <(node_mounts)
}

node_shims() {
  # the containerd shims of this node: started by its containerd, they name its socket (a path
  # unique to this cluster) on their command line; they outlive containerd on purpose
  local cmdline pid
  for cmdline in /proc/[0-9]*/cmdline; do
    pid=${cmdline#/proc/}
    pid=${pid%/cmdline}
    tr '\0' ' ' <"$cmdline" 2>/dev/null | grep -q -- "^/usr/bin/containerd-shim[^ ]* .*-address $containerd_sock " &&
      echo "$pid"
  done
  return 0
}

kill_shims() {
  local pids
  pids=$(node_shims)
  # shellcheck disable=SC2086
  [[ -z $pids ]] || kill -KILL $pids 2>/dev/null || true
}

# Stop whatever of the node runs and clear what a crash leaves behind (processes, shims, mounts,
# cgroups, IP reservations). The images in containerd's root stay.
node_clear() {
  stop_pid kubelet 10
  stop_pid api-forward 2
  kill_cgroup_processes
  stop_pid containerd 10
  kill_shims
  unmount_node
  cgroup_remove
  rm -rf "$node_dir/cni/ipam" "$containerd_dir/state"
}

node_leftovers() {  # true when a crashed node left processes, mounts or cgroups behind
  [[ -n $(cgroup_pids) || -n $(node_mounts) || -n $(node_shims) ]] && return 0
  local mnt
  while IFS= read -r mnt; do
    [[ -d $mnt/$cgroup_name ]] && return 0
  done < <(cgroup_hierarchies)
  [[ -f $state/kubelet.pid || -f $state/containerd.pid ]]
}

# --- network -------------------------------------------------------------------------------------

bridge_up() {
  local plen svc_plen
  plen=$(prefix_len "$node_subnet")
  svc_plen=$(prefix_len "$service_cidr")
  if ! ip link show "$bridge" >/dev/null 2>&1; then
    log "creating bridge $bridge ($node_ip/$plen, Service range $service_cidr)"
    ip link add "$bridge" type bridge
  fi
  ip addr replace "$node_ip/$plen" dev "$bridge"
  ip addr replace "$service_ip/$svc_plen" dev "$bridge"
  ip link set "$bridge" up
  # a safety net: should the bridge ever go (deleted by hand, or by another cluster), traffic to
  # the cluster's addresses fails here instead of following the default route off the machine
  ip route replace unreachable "$node_subnet" metric "$route_metric"
  ip route replace unreachable "$service_cidr" metric "$route_metric"
}

routes_down() {
  local net
  for net in "$node_subnet" "$service_cidr"; do
    if ip route show type unreachable "$net" | grep -q "metric $route_metric"; then
      ip route del unreachable "$net" metric "$route_metric" || log "could not remove route $net"
    fi
  done
}

bridge_down() {
  if ip link show "$bridge" >/dev/null 2>&1; then
    log "removing bridge $bridge"
    ip link del "$bridge" || log "could not remove bridge $bridge"
  fi
}

# --- configuration ---------------------------------------------------------------------------------

write_node_config() {
  mkdir -p "$containerd_dir" "$kubelet_dir" "$node_dir/cni/net.d" "$node_dir/pod-logs" \
    "$node_dir/kubelet-certs" "$node_dir/volume-plugins"
  local pause
  pause=$("$here/image" ref pause)
  cat >"$containerd_dir/config.toml" <<TOML
# Written by hack/control-plane; every path is under the node's state directory.
version = 2
root = "$containerd_dir/root"
state = "$containerd_dir/state"
oom_score = 0
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "$containerd_sock"

[ttrpc]
  address = ""

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "$containerd_dir/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$pause"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # the VM lacks CAP_SYS_RESOURCE: without this every sandbox fails to start
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  enable_cdi = false

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$node_dir/runc"

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$node_dir/cni/net.d"
    max_conf_num = 1
TOML
  local pod_first pod_last
  pod_first=$(nth_ip "$node_subnet" 258)  # x.y.1.2
  pod_last=$(nth_ip "$node_subnet" 510)   # x.y.1.254
  cat >"$node_dir/cni/net.d/10-capacity.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "capacity-local",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$bridge",
      "isGateway": false,
      "isDefaultGateway": false,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$node_dir/cni/ipam",
        "ranges": [[{"subnet": "$node_subnet", "rangeStart": "$pod_first",
                     "rangeEnd": "$pod_last", "gateway": "$node_ip"}]],
        "routes": [{"dst": "$service_cidr", "gw": "$node_ip"}]
      }
    }
  ]
}
JSON
  issue_cert "kubelet-$node_name" "/O=system:nodes/CN=system:node:$node_name" clientAuth
  issue_cert "kubelet-serving-$node_name" "/CN=$node_name" serverAuth "DNS:$node_name,IP:$node_ip"
  write_kubeconfig "$node_dir/kubelet.kubeconfig" "system:node:$node_name" \
    "$pki/kubelet-$node_name.crt" "$pki/kubelet-$node_name.key"
  cat >"$node_dir/kubelet.yaml" <<YAML
# Written by hack/control-plane.
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $node_ip
port: $kubelet_port
readOnlyPort: 0
healthzBindAddress: $node_ip
healthzPort: 10248
tlsCertFile: $pki/kubelet-serving-$node_name.crt
tlsPrivateKeyFile: $pki/kubelet-serving-$node_name.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization:
  mode: Webhook
containerRuntimeEndpoint: unix://$containerd_sock
cgroupDriver: cgroupfs
cgroupRoot: /$cgroup_name
cgroupsPerQOS: true
failCgroupV1: false
failSwapOn: false
podLogsDir: $node_dir/pod-logs
volumePluginDir: $node_dir/volume-plugins
resolvConf: /etc/resolv.conf
# images are built and imported here: one removed could never be pulled back
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: 100Mi
  nodefs.available: 2%
  imagefs.available: 2%
registerWithTaints:
- key: $node_taint_key
  value: "true"
  effect: NoSchedule
maxPods: 110
nodeStatusUpdateFrequency: 10s
serializeImagePulls: false
YAML
}

# --- processes -------------------------------------------------------------------------------------

containerd_ready() { ctr --address "$containerd_sock" version >/dev/null 2>&1; }

node_ready() {
  [[ $(kubectl_node get node "$node_name" \
    -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) == True ]]
}

kubelet_alive() { pid_alive "$state/kubelet.pid"; }

start_containerd() {
  log "starting containerd (socket $containerd_sock)"
  # Pulls go nowhere: every image is built here and imported; a pull fails at once on loopback
  # instead of reaching for a registry off this machine.
  # shellcheck disable=SC2034 # read by spawn
  SPAWN_ENV=(HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 NO_PROXY=)
  spawn containerd "$(command -v containerd)" --config "$containerd_dir/config.toml" --log-level warn
  wait_for containerd containerd_ready
}

start_kubelet() {
  local kubelet
  kubelet=$("$here/kube-tools" path kubelet)
  log "starting kubelet for node $node_name ($node_ip:$kubelet_port)"
  spawn kubelet "$kubelet" \
    --config "$node_dir/kubelet.yaml" \
    --kubeconfig "$node_dir/kubelet.kubeconfig" \
    --root-dir "$kubelet_dir" \
    --cert-dir "$node_dir/kubelet-certs" \
    --hostname-override "$node_name" \
    --node-ip "$node_ip" \
    --node-labels "$node_labels" \
    --v=1
  wait_for kubelet node_ready
}

start_api_forward() {
  # Pods reach the API server at the `kubernetes` Service address (kubelet sets
  # KUBERNETES_SERVICE_HOST); with no kube-proxy, socat forwards it to loopback.
  pid_alive "$state/api-forward.pid" && return
  log "forwarding $service_ip:443 (the kubernetes Service) to 127.0.0.1:$api_port"
  spawn api-forward "$(command -v socat)" \
    "TCP-LISTEN:443,bind=$service_ip,reuseaddr,fork" "TCP:127.0.0.1:$api_port"
  sleep 0.2
  pid_alive "$state/api-forward.pid" || { tail -n 5 "$state/api-forward.log" >&2; exit 1; }
}

node_up() {
  mkdir -p "$node_dir"
  local reason
  reason=$(node_unavailable_reason)
  if [[ -n $reason && $real_node == 1 ]]; then
    log "no real node: $reason (CAPACITY_CP_REAL_NODE=1 requires one)"
    exit 1
  fi
  if [[ -n $reason ]]; then
    echo "$reason" >"$node_dir/unavailable"
    log "no real node: $reason; carrying on with kwok nodes only"
    return 0
  fi
  rm -f "$node_dir/unavailable"
  if pid_alive "$state/containerd.pid" && containerd_ready && kubelet_alive && node_ready; then
    bridge_up  # idempotent: puts back addresses or routes that went missing
    start_api_forward
    return 0
  fi
  check_bridge_free
  if node_leftovers; then
    log "clearing what a previous node left behind (processes, shims, mounts, cgroups)"
    node_clear
  fi
  host_record
  bridge_up
  cgroup_setup
  write_node_config
  start_containerd
  "$here/image" import --address "$containerd_sock" pause testbox >&2
  start_kubelet
  start_api_forward
}

node_down() {
  node_is_ours || return 0
  node_clear
  bridge_down
  host_restore
}

node_routes_down() {  # last, once nothing of the cluster can dial its addresses any more
  node_is_ours 2>/dev/null || return 0
  routes_down
}

node_status() {
  if [[ -f $node_dir/unavailable ]]; then
    printf '%-24s none (%s)\n' "real node:" "$(cat "$node_dir/unavailable")"
    return 0
  fi
  local rc=0 name
  for name in containerd kubelet api-forward; do
    if pid_alive "$state/$name.pid"; then
      printf '%-24s running (pid %s)\n' "$name:" "$(cat "$state/$name.pid")"
    else
      printf '%-24s stopped\n' "$name:"
      rc=1
    fi
  done
  return $rc
}
