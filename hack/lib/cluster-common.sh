# shellcheck shell=bash disable=SC2154 # the variables named come from hack/control-plane
# Helpers shared by hack/control-plane and its node and kwok parts (sourced, not run).
# Expects: $state, $pki, $timeout, log().

running() {  # pid: alive, and not a zombie waiting for whoever adopted it to reap it
  local pid=$1 stat
  kill -0 "$pid" 2>/dev/null || return 1
  stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ ${stat%% *} != Z ]]
}

pid_alive() {
  local file=$1
  [[ -f $file ]] && running "$(cat "$file")"
}

port_taken() {
  # true when something listens on ${2:-127.0.0.1}:$1 (bash's /dev/tcp, no extra tools needed)
  (exec 3<>"/dev/tcp/${2:-127.0.0.1}/$1") 2>/dev/null
}

port_free() {  # port, the variable that moves it
  if port_taken "$1"; then
    log "port $1 is in use by another process; set $2"
    exit 1
  fi
}

# spawn NAME ARGV...: start a server in its own session (it outlives this shell and its process
# group), output to $state/NAME.log, pid in $state/NAME.pid. Extra environment: SPAWN_ENV array.
spawn() {
  local name=$1
  shift
  # fd 8 is the control plane's lock: a server must not hold it after `up` ends
  env "${SPAWN_ENV[@]}" setsid "$@" </dev/null >>"$state/$name.log" 2>&1 8>&- &
  echo $! >"$state/$name.pid"
  SPAWN_ENV=()
}
SPAWN_ENV=()

wait_for() {  # name, readiness check (a command)
  local what=$1 check=$2 deadline=$((SECONDS + timeout))
  until $check; do
    if ! pid_alive "$state/$what.pid"; then
      log "$what exited while starting; last lines of $state/$what.log:"
      tail -n 25 "$state/$what.log" >&2 || true
      exit 1
    fi
    if ((SECONDS > deadline)); then
      log "$what not ready after ${timeout}s; last lines of $state/$what.log:"
      tail -n 25 "$state/$what.log" >&2 || true
      exit 1
    fi
    sleep 0.3
  done
}

# stop_pid NAME [SECONDS]: SIGTERM the process in $state/NAME.pid, SIGKILL after SECONDS (10).
stop_pid() {
  local name=$1 grace=${2:-10} file="$state/$1.pid"
  if pid_alive "$file"; then
    local pid
    pid=$(cat "$file")
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for ((i = 0; i < grace * 10; i++)); do
      running "$pid" || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    # and whatever it started that still runs (an iptables or mount call of the kubelet's): every
    # server leads its own process group (spawn's setsid), so the group holds only its children
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

# issue_cert NAME SUBJECT serverAuth|clientAuth [SAN]: a key pair signed by the cluster CA in
# $pki/NAME.{crt,key}, made once.
issue_cert() {
  local name=$1 subject=$2 usage=$3 san=${4:-}
  [[ -f $pki/$name.crt && -f $pki/$name.key ]] && return
  local ext
  ext=$(mktemp)
  {
    echo "extendedKeyUsage=$usage"
    echo "keyUsage=digitalSignature,keyEncipherment"
    [[ -z $san ]] || echo "subjectAltName=$san"
  } >"$ext"
  openssl req -newkey rsa:2048 -nodes -keyout "$pki/$name.key" -out "$pki/$name.csr" \
    -subj "$subject" 2>/dev/null
  openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
    -CAcreateserial -out "$pki/$name.crt" -extfile "$ext" -days 3650 -sha256 2>/dev/null
  rm -f "$pki/$name.csr" "$pki/ca.srl" "$ext"
  chmod 600 "$pki/$name.key"
}

# write_kubeconfig PATH USER CERT KEY: a kubeconfig for the local API server (atomic write).
write_kubeconfig() {
  local path=$1 user=$2 cert=$3 key=$4 b64="base64 -w0"
  cat >"$path.tmp" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: $context
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority-data: $($b64 <"$pki/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $($b64 <"$cert")
    client-key-data: $($b64 <"$key")
contexts:
- name: $context
  context:
    cluster: $context
    user: $user
    namespace: default
current-context: $context
KUBECONFIG
  chmod 600 "$path.tmp"
  mv -f "$path.tmp" "$path"
}

# first_ip CIDR / nth_ip CIDR N: the network's first host address, or its Nth (IPv4 only).
nth_ip() {
  local net=${1%/*} n=$2 a b c d
  IFS=. read -r a b c d <<<"$net"
  local v=$(((a << 24) + (b << 16) + (c << 8) + d + n))
  echo "$(((v >> 24) & 255)).$(((v >> 16) & 255)).$(((v >> 8) & 255)).$((v & 255))"
}
first_ip() { nth_ip "$1" 1; }
prefix_len() { echo "${1#*/}"; }
