#!/usr/bin/env bash
# A real Kubernetes v1.34.4 control plane (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler) for Zebu's e2e tests, without Docker.
#
#   cluster.sh up      start it (idempotent; needs root)
#   cluster.sh node-up also run a node: containerd + runc (Debian) and a kubelet
#                      v1.34.4 named node1 in the same netns (implies up)
#   cluster.sh import TAR...  load OCI image archives into the node's containerd
#   cluster.sh down    stop it and remove all its state (idempotent; needs root)
#   cluster.sh status  exit 0 if it is up and healthy
#   cluster.sh env     print `export` lines for tests: eval "$(cluster.sh env)"
#
# Everything runs in the network namespace `zebu-k8s`, reachable from the host
# through a veth pair (host zk8s0h 10.250.0.1/24 <-> netns zk8s0 10.250.0.10/24).
# The netns has no default route, so nothing in it can reach beyond that /24.
# The apiserver is https://10.250.0.10:6443 from the host and from the netns.
#
# Environment: ZEBU_K8S_STATE (default /var/tmp/zebu-k8s): pki/, run/, logs/, etcd/
#              ZEBU_K8S_CACHE (default /var/cache/zebu-k8s): binaries, see build-k8s.sh
set -euo pipefail
set +m   # no job control: background children stay in our process group (see start())

K8S_VERSION=1.34.4
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${ZEBU_K8S_CACHE:-/var/cache/zebu-k8s}
BIN=$CACHE/v$K8S_VERSION/bin
STATE=${ZEBU_K8S_STATE:-/var/tmp/zebu-k8s}
PKI=$STATE/pki
RUN=$STATE/run
LOGS=$STATE/logs
ETCD_DATA=$STATE/etcd
MARKER=$STATE/.zebu-k8s-state

NETNS=zebu-k8s
NETNS_PATH=/var/run/netns/$NETNS
IF_NS=zk8s0
IF_HOST=zk8s0h
IP_NS=10.250.0.10
IP_HOST=10.250.0.1
PREFIX=24
SERVICE_CIDR=10.96.0.0/16
SERVER=https://$IP_NS:6443
NFT_TABLE="inet zebu_k8s"   # not created today; removed by `down` if a later part adds it
LOCK=/run/lock/zebu-k8s-cluster.lock
NODE_NAME=node1
KUBELET_DIR=/var/lib/kubelet          # where CSI drivers and the kubelet expect it
KUBELET_MARKER=$KUBELET_DIR/.zebu-k8s-node
CONTAINERD=$STATE/containerd           # root, state and socket of our containerd
# The node plugin's data (the DaemonSet's hostPath) and the cgroup it moves
# volumes' processes to: removed by `down` only when the e2e test marked
# the directory as its own.
E2E_DATA=/var/lib/zebu
E2E_MARKER=$E2E_DATA/.zebu-e2e
E2E_ASIDE=/var/lib/zebu.before-e2e    # what was there before, set aside by the e2e
DATA_CGROUP=zebu
PAUSE_IMAGE=localhost/pause:3.10.1     # built here from pause.c (no registry to pull from)
BUSYBOX_IMAGE=localhost/busybox:1.35   # from Debian's busybox-static, for test Pods

READY_TIMEOUT=${ZEBU_K8S_READY_TIMEOUT:-180}   # seconds, each wait
STOP_TIMEOUT=10                                 # SIGTERM -> SIGKILL

die() { echo "cluster.sh: error: $*" >&2; exit 1; }
log() { echo "cluster.sh: $*" >&2; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

usage() {
  cat >&2 <<EOF
usage: $(basename "$0") up|node-up|import|down|status|env

  up      start etcd, kube-apiserver, kube-controller-manager and kube-scheduler
          v$K8S_VERSION in netns $NETNS (apiserver $SERVER); idempotent
  node-up up, plus containerd, runc and a kubelet (node $NODE_NAME, root
          $KUBELET_DIR) in the same netns; idempotent
  import TAR...  load OCI image archives into the node's containerd (node-up
          first); Pods use them with imagePullPolicy IfNotPresent or Never
  down    stop everything 'up' and 'node-up' started (and every Pod's
          containers), remove $STATE and $KUBELET_DIR; idempotent
  status  exit 0 if the cluster is up and healthy, 1 otherwise
  env     print shell export lines; use: eval "\$($0 env)"

state dir: $STATE (ZEBU_K8S_STATE)   binaries: $BIN (ZEBU_K8S_CACHE)
EOF
}

need_root() { [ "$(id -u)" = 0 ] || die "'$1' must run as root (it creates a network namespace and starts daemons)"; }

check_state_path() {
  case "$STATE" in
    /*/*) ;;
    *) die "ZEBU_K8S_STATE must be an absolute path at least two levels deep, got '$STATE'" ;;
  esac
  case "${STATE%/}" in
    /|/tmp|/var|/var/tmp|/root|/home|/usr|/etc|/run|/var/lib|/var/cache) die "refusing state dir '$STATE'" ;;
  esac
}

kctl() { "$BIN/kubectl" --kubeconfig "$PKI/admin.kubeconfig" --request-timeout=5s "$@"; }
in_netns() { nsenter --net="$NETNS_PATH" "$@"; }

# ---------------------------------------------------------------- processes
# Each daemon: $RUN/NAME.pid holds its pid, $RUN/NAME.cmd its argv[0]; $RUN/order
# lists names in start order. A pid is only ever signalled while its
# /proc/PID/cmdline still starts with the recorded argv[0] (guards against reuse).

proc_alive() { # NAME -> 0 if the recorded process runs
  local n=$1 pid exe argv0 state
  [ -f "$RUN/$n.pid" ] && [ -f "$RUN/$n.cmd" ] || return 1
  pid=$(cat "$RUN/$n.pid"); exe=$(cat "$RUN/$n.cmd")
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  { IFS= read -r -d '' argv0 < "/proc/$pid/cmdline"; } 2>/dev/null || return 1
  [ "$argv0" = "$exe" ] || return 1
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
  [ "$state" != Z ]
}

start() { # NAME CMD ARGS...: run CMD inside the netns, detached, logging to $LOGS/NAME.log
  local n=$1; shift
  printf '%s\n' "$1" > "$RUN/$n.cmd"
  # nsenter and setsid both exec (no fork: we run without job control, so this
  # child is not a process-group leader), hence $! is the pid of the daemon itself.
  # setsid keeps it alive when the caller's terminal or process group goes away.
  # 8>&- : the daemon must not inherit (and so hold forever) our lock on $LOCK.
  setsid nsenter --net="$NETNS_PATH" "$@" < /dev/null > "$LOGS/$n.log" 2>&1 8>&- &
  local pid=$! i argv0
  echo "$pid" > "$RUN/$n.pid"
  echo "$n" >> "$RUN/order"
  # Until setsid and nsenter have exec'd the daemon, its pid shows their
  # command line and proc_alive would call it dead: wait for the exec.
  for ((i = 0; i < 100; i++)); do
    argv0=
    { IFS= read -r -d '' argv0 < "/proc/$pid/cmdline"; } 2>/dev/null || true
    [ "$argv0" = "$1" ] && return 0
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.05
  done
}

stop() { # NAME: SIGTERM, then SIGKILL after $STOP_TIMEOUT s; only the recorded process
  local n=$1 pid i
  if proc_alive "$n"; then
    pid=$(cat "$RUN/$n.pid")
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do proc_alive "$n" || break; sleep 0.1; done
    if proc_alive "$n"; then
      log "$n (pid $pid) ignored SIGTERM for ${STOP_TIMEOUT}s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      for ((i = 0; i < 50; i++)); do proc_alive "$n" || break; sleep 0.1; done
      proc_alive "$n" && log "warning: $n (pid $pid) is still alive after SIGKILL"
    fi
  fi
  rm -f "$RUN/$n.pid" "$RUN/$n.cmd"
}

recorded_names() { # start order reversed, then any pidfile not in the order list
  local n seen=" "
  if [ -f "$RUN/order" ]; then
    while read -r n; do
      [ -n "$n" ] || continue
      case "$seen" in *" $n "*) continue ;; esac
      seen="$seen$n "; echo "$n"
    done < <(tac "$RUN/order")
  fi
  for f in "$RUN"/*.pid; do
    [ -e "$f" ] || continue
    n=$(basename "$f" .pid)
    case "$seen" in *" $n "*) continue ;; esac
    seen="$seen$n "; echo "$n"
  done
}

# ---------------------------------------------------------------- health
healthy() { # the whole cluster from this state dir is up
  [ -e "$NETNS_PATH" ] && [ -f "$RUN/order" ] || return 1
  local n
  for n in etcd kube-apiserver kube-controller-manager kube-scheduler; do proc_alive "$n" || return 1; done
  [ "$(kctl get --raw /readyz 2>/dev/null)" = ok ]
}

anything_present() {
  [ -e "$NETNS_PATH" ] || [ -e "$STATE" ] || [ -f "$E2E_MARKER" ] || [ -d "$E2E_ASIDE" ] || ip link show "$IF_HOST" > /dev/null 2>&1
}

# ---------------------------------------------------------------- teardown
ctr_() { ctr --address "$CONTAINERD/containerd.sock" --namespace k8s.io "$@"; }

stop_pods() { # with the kubelet stopped: kill every container, drop the Pods' netns
  local ids id netns
  proc_alive containerd || return 0
  ids=$(ctr_ tasks ls -q 2>/dev/null || true)
  for id in $ids; do
    # A sandbox's network namespace (CNI made it; nothing else removes it now).
    netns=$(ctr_ containers info "$id" 2>/dev/null | python3 -c '
import json, sys
for ns in json.load(sys.stdin).get("Spec", {}).get("linux", {}).get("namespaces", []):
    if ns.get("type") == "network" and ns.get("path", "").startswith("/var/run/netns/cni-"):
        print(ns["path"])' 2>/dev/null || true)
    ctr_ tasks kill --all --signal SIGKILL "$id" > /dev/null 2>&1 || true
    if [ -n "$netns" ]; then
      umount "$netns" 2>/dev/null || umount -l "$netns" 2>/dev/null || true
      rm -f "$netns"
    fi
  done
  for id in $ids; do
    for ((i = 0; i < 50; i++)); do ctr_ tasks delete "$id" > /dev/null 2>&1 && break; sleep 0.1; done
  done
}

stop_data_path() { # the e2e's volumes' processes, which the node plugin moved out of its Pod
  if [ -f "$E2E_MARKER" ]; then stop_e2e_data; fi
  if [ -d "$E2E_ASIDE" ] && [ ! -e "$E2E_DATA" ]; then mv -T "$E2E_ASIDE" "$E2E_DATA"; fi
}

stop_e2e_data() {
  local f pid i left m
  for ((i = 0; i < 50; i++)); do
    left=
    for f in /sys/fs/cgroup/*/"$DATA_CGROUP"/cgroup.procs /sys/fs/cgroup/"$DATA_CGROUP"/cgroup.procs; do
      [ -f "$f" ] || continue
      for pid in $(cat "$f" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; left=1; done
    done
    [ -z "$left" ] && break
    sleep 0.1
  done
  rmdir /sys/fs/cgroup/*/"$DATA_CGROUP" /sys/fs/cgroup/"$DATA_CGROUP" 2>/dev/null || true
  while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" || log "warning: cannot unmount $m"
  done < <(awk -v s="$E2E_DATA" '$5 == s || index($5, s "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r)
  rm -rf --one-file-system "$E2E_DATA"
}

teardown() {
  local n pids m dev file
  if [ -d "$RUN" ]; then
    stop kubelet
    stop_pods
    for n in $(recorded_names); do stop "$n"; done
  fi
  stop_data_path
  if [ -e "$NETNS_PATH" ]; then
    pids=$(ip netns pids "$NETNS" 2>/dev/null | tr '\n' ' ' || true)
    [ -z "${pids// /}" ] || log "warning: processes not started by cluster.sh remain in netns $NETNS (left alone): $pids"
    ip netns delete "$NETNS" || die "cannot delete netns $NETNS"
  fi
  # The veth dies with the netns; remove our host end explicitly if something keeps it.
  if ip link show "$IF_HOST" > /dev/null 2>&1; then ip link delete "$IF_HOST" || true; fi
  if command -v nft > /dev/null 2>&1 && nft list table $NFT_TABLE > /dev/null 2>&1; then
    nft delete table $NFT_TABLE
  fi
  if [ -f "$KUBELET_MARKER" ]; then
    # Loop devices of Zebu's attachments (each recorded in an attach.json
    # under the plugin's state): made in the plugin's container, they name
    # their backing file relative to a mount the host cannot see, so they
    # are found by these records, not by path.
    # (find fails on a FUSE mount whose server is gone; what it found counts.)
    { find "$KUBELET_DIR/plugins" -name attach.json 2>/dev/null || true; } | while read -r f; do
      dev=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("device") or "")' "$f" 2>/dev/null || true)
      case $dev in /dev/loop[0-9]*) losetup -d "$dev" 2>/dev/null || log "warning: cannot detach $dev" ;; esac
    done
    # And the kubelet's own, which hold raw block volumes' devices.
    losetup -nO NAME,BACK-FILE 2>/dev/null | while read -r dev file; do
      case $file in "$KUBELET_DIR"/*) losetup -d "$dev" 2>/dev/null || log "warning: cannot detach $dev" ;; esac
    done
    # The kubelet bind-mounts its directory onto itself; pods' volumes live below.
    while read -r m; do
      umount "$m" 2>/dev/null || umount -l "$m" || log "warning: cannot unmount $m"
    done < <(awk -v s="$KUBELET_DIR" '$5 == s || index($5, s "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r)
    rm -rf --one-file-system "$KUBELET_DIR"
  fi
  if [ -e "$STATE" ]; then
    # Unmount anything below the state dir, deepest first (lazy if busy).
    while read -r m; do
      umount "$m" 2>/dev/null || umount -l "$m" || log "warning: cannot unmount $m"
    done < <(awk -v s="${STATE%/}" '$5 == s || index($5, s "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r)
    if [ -f "$MARKER" ] || [ -z "$(ls -A "$STATE" 2>/dev/null)" ]; then
      rm -rf --one-file-system "$STATE"
    else
      die "$STATE has no $(basename "$MARKER") marker; not removing a directory cluster.sh did not create"
    fi
  fi
}

# ---------------------------------------------------------------- setup pieces
apt_install() { # PKGS...: install the Debian packages named, if any
  [ $# -gt 0 ] || return 0
  log "installing Debian packages: $*"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "$@" > /dev/null || die "apt-get install $* failed"
}

ensure_packages() {
  local pkgs=()
  command -v etcd > /dev/null || pkgs+=(etcd-server)
  command -v etcdctl > /dev/null || pkgs+=(etcd-client)
  command -v openssl > /dev/null || pkgs+=(openssl)
  command -v ip > /dev/null || pkgs+=(iproute2)
  { command -v nsenter && command -v setsid && command -v flock; } > /dev/null || pkgs+=(util-linux)
  apt_install "${pkgs[@]}"
  command -v etcd > /dev/null && command -v etcdctl > /dev/null || die "etcd/etcdctl missing after install"
}

ensure_binaries() {
  local b
  for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl; do
    if [ ! -x "$BIN/$b" ]; then
      log "Kubernetes binaries missing in $BIN; building them (cold: 10-25 min)"
      bash "$HERE/build-k8s.sh" || die "build-k8s.sh failed"
      return
    fi
  done
  [ "$("$BIN/kube-apiserver" --version 2>/dev/null || true)" = "Kubernetes v$K8S_VERSION" ] || {
    log "binaries in $BIN are not v$K8S_VERSION; rebuilding"
    bash "$HERE/build-k8s.sh" || die "build-k8s.sh failed"
  }
}

gen_pki() {
  local d=$PKI
  mkdir -p "$d"; chmod 700 "$d"
  ossl() { openssl "$@" > /dev/null 2>> "$d/openssl.log" || die "openssl $1 failed; see $d/openssl.log"; }
  printf '[req]\ndistinguished_name=dn\nx509_extensions=v3_ca\n[dn]\n[v3_ca]\n%s\n%s\n%s\n' \
    'basicConstraints=critical,CA:TRUE' 'keyUsage=critical,keyCertSign,cRLSign,digitalSignature' \
    'subjectKeyIdentifier=hash' > "$d/ca.cnf"
  ossl req -x509 -newkey rsa:2048 -nodes -config "$d/ca.cnf" -keyout "$d/ca.key" -out "$d/ca.crt" \
    -days 365 -subj "/CN=zebu-k8s-ca"
  sign() { # NAME CN O SAN: key + certificate signed by the CA, client and server usage
    local n=$1 cn=$2 o=$3 san=${4:-}
    ossl req -newkey rsa:2048 -nodes -keyout "$d/$n.key" -out "$d/$n.csr" -subj "/CN=$cn${o:+/O=$o}"
    {
      echo basicConstraints=CA:FALSE
      echo keyUsage=critical,digitalSignature,keyEncipherment
      echo extendedKeyUsage=serverAuth,clientAuth
      echo authorityKeyIdentifier=keyid
      [ -z "$san" ] || echo "subjectAltName=$san"
    } > "$d/$n.ext"
    ossl x509 -req -in "$d/$n.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAserial "$d/ca.srl" \
      -CAcreateserial -days 365 -extfile "$d/$n.ext" -out "$d/$n.crt"
    rm -f "$d/$n.csr" "$d/$n.ext"
  }
  sign apiserver kube-apiserver "" \
    "DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:10.96.0.1,IP:$IP_NS"
  sign admin admin system:masters
  sign apiserver-kubelet-client kube-apiserver-kubelet-client system:masters
  sign controller-manager system:kube-controller-manager ""
  sign scheduler system:kube-scheduler ""
  sign kubelet system:node:node1 system:nodes "DNS:node1,DNS:localhost,IP:127.0.0.1,IP:$IP_NS"
  ossl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$d/sa.key"
  ossl pkey -in "$d/sa.key" -pubout -out "$d/sa.pub"
  rm -f "$d/ca.srl" "$d/ca.cnf" "$d/openssl.log"
  chmod 600 "$d"/*.key

  # One self-contained kubeconfig per identity (certificates embedded).
  local id user ca
  ca=$(base64 -w0 < "$d/ca.crt")
  for id in admin controller-manager scheduler kubelet; do
    case $id in
      admin) user=admin ;;
      controller-manager) user=system:kube-controller-manager ;;
      scheduler) user=system:kube-scheduler ;;
      kubelet) user=system:node:node1 ;;
    esac
    cat > "$d/$id.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: zebu-k8s
  cluster:
    server: $SERVER
    certificate-authority-data: $ca
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 < "$d/$id.crt")
    client-key-data: $(base64 -w0 < "$d/$id.key")
contexts:
- name: $user@zebu-k8s
  context:
    cluster: zebu-k8s
    user: $user
current-context: $user@zebu-k8s
EOF
    chmod 600 "$d/$id.kubeconfig"
  done
}

setup_netns() {
  # Our /24 must not clash with anything the host already routes.
  local r
  r=$(ip -4 route show to match "$IP_NS" | grep -v '^default ' || true)
  [ -z "$r" ] || die "host already has a route covering $IP_NS ($r); refusing to add $IP_HOST/$PREFIX"
  ip netns add "$NETNS"
  ip -n "$NETNS" link set lo up
  ip link add "$IF_HOST" type veth peer name "$IF_NS" netns "$NETNS"
  ip addr add "$IP_HOST/$PREFIX" dev "$IF_HOST"
  ip link set "$IF_HOST" up
  ip -n "$NETNS" addr add "$IP_NS/$PREFIX" dev "$IF_NS"
  ip -n "$NETNS" link set "$IF_NS" up
  # Deliberately no default route inside the netns: it can talk to 10.250.0.0/24 only.
}

WAIT_WHY=
wait_for() { # SECONDS DAEMON CMD...: poll CMD until it succeeds; give up early if DAEMON died
  local limit=$1 daemon=$2 t0; shift 2
  t0=$(now)
  until "$@" > /dev/null 2>&1; do
    if ! proc_alive "$daemon"; then WAIT_WHY="$daemon exited"; return 1; fi
    if awk -v a="$t0" -v b="$(now)" -v l="$limit" 'BEGIN { exit !(b - a > l) }'; then
      WAIT_WHY="timed out after ${limit}s"; return 1
    fi
    sleep 0.25
  done
}

fail_up() { # MESSAGE NAMES...: show the logs, tear down, exit non-zero
  local msg=$1 n; shift
  echo "cluster.sh: error: $msg" >&2
  for n in "$@"; do
    if [ -f "$LOGS/$n.log" ]; then
      proc_alive "$n" || echo "cluster.sh: $n is not running" >&2
      echo "----- last lines of $LOGS/$n.log -----" >&2
      tail -n 25 "$LOGS/$n.log" >&2
    fi
  done
  echo "cluster.sh: tearing down the partial cluster" >&2
  teardown || true
  exit 1
}

# ---------------------------------------------------------------- subcommands
take_lock() { # one up/down at a time on this machine (the netns name and IPs are global)
  mkdir -p "$(dirname "$LOCK")"
  exec 8> "$LOCK"
  flock -w 120 8 || die "another cluster.sh up/down has held $LOCK for 120s; is one stuck?"
}

cmd_up() {
  need_root up
  check_state_path
  local t0 etcd_extra=()
  t0=$(now)

  take_lock

  if healthy; then
    log "already up and healthy (state $STATE)"
    echo "KUBECONFIG=$PKI/admin.kubeconfig"
    return 0
  fi
  if anything_present; then
    log "found stale pieces (dead processes, netns or state); cleaning them first"
    teardown
  fi

  ensure_packages
  ensure_binaries
  t0=$(now)   # time to ready excludes package install and the binary build

  mkdir -p "$STATE" "$RUN" "$LOGS"
  : > "$MARKER"
  : > "$RUN/order"
  gen_pki
  setup_netns

  # Test data need no durability; skipping fsync keeps etcd fast next to heavy builds.
  [[ "$(etcd --help 2>&1 || true)" == *--unsafe-no-fsync* ]] && etcd_extra+=(--unsafe-no-fsync)
  start etcd "$(command -v etcd)" --name zebu-k8s --data-dir "$ETCD_DATA" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster zebu-k8s=http://127.0.0.1:2380 --listen-metrics-urls http://127.0.0.1:2381 \
    --logger zap --log-outputs stderr "${etcd_extra[@]}"
  wait_for "$READY_TIMEOUT" etcd in_netns etcdctl --endpoints http://127.0.0.1:2379 endpoint health ||
    fail_up "etcd not healthy ($WAIT_WHY)" etcd

  start kube-apiserver "$BIN/kube-apiserver" \
    --etcd-servers=http://127.0.0.1:2379 \
    --bind-address=0.0.0.0 --secure-port=6443 --advertise-address="$IP_NS" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
    --client-ca-file="$PKI/ca.crt" \
    --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority="$PKI/ca.crt" --kubelet-preferred-address-types=InternalIP \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --allow-privileged=true --profiling=false

  # Readiness is probed from the host, through the veth, as the tests will.
  wait_for "$READY_TIMEOUT" kube-apiserver apiserver_ready ||
    fail_up "kube-apiserver not ready at $SERVER/readyz ($WAIT_WHY)" kube-apiserver etcd
  log "apiserver ready after $(since "$t0")s"

  # Only now: started before the RBAC bootstrap roles exist, kube-controller-manager
  # exits at once ("cannot get configmaps ... extension-apiserver-authentication").
  start kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig="$PKI/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$PKI/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$PKI/controller-manager.kubeconfig" \
    --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
    --use-service-account-credentials=true \
    --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
    --leader-elect=false --bind-address=127.0.0.1 --profiling=false

  start kube-scheduler "$BIN/kube-scheduler" \
    --kubeconfig="$PKI/scheduler.kubeconfig" \
    --authentication-kubeconfig="$PKI/scheduler.kubeconfig" \
    --authorization-kubeconfig="$PKI/scheduler.kubeconfig" \
    --leader-elect=false --bind-address=127.0.0.1 --profiling=false

  wait_for "$READY_TIMEOUT" kube-controller-manager kctl -n default get serviceaccount default ||
    fail_up "ServiceAccount default/default not created ($WAIT_WHY)" kube-controller-manager kube-apiserver

  local n
  for n in etcd kube-apiserver kube-controller-manager kube-scheduler; do
    proc_alive "$n" || fail_up "$n exited during start-up" "$n"
  done
  log "cluster up in $(since "$t0")s: apiserver $SERVER, logs in $LOGS"
  echo "KUBECONFIG=$PKI/admin.kubeconfig"
}

apiserver_ready() { [ "$(kctl get --raw /readyz 2>/dev/null)" = ok ]; }

node_healthy() {
  healthy && proc_alive containerd && proc_alive kubelet &&
    [ "$(kctl get node "$NODE_NAME" -o 'jsonpath={.metadata.name}' 2>/dev/null)" = "$NODE_NAME" ]
}

ensure_node_packages() {
  local pkgs=()
  command -v containerd > /dev/null || pkgs+=(containerd)
  command -v runc > /dev/null || pkgs+=(runc)
  [ -x /usr/lib/cni/bridge ] || pkgs+=(containernetworking-plugins)
  apt_install "${pkgs[@]}"
}

write_node_config() {
  # containerd: everything under the state dir; restrict_oom_score_adj because this
  # machine lacks CAP_SYS_RESOURCE (runc cannot lower a pod's oom_score_adj).
  cat > "$RUN/containerd.toml" <<TOML
version = 2
root = "$CONTAINERD/root"
state = "$CONTAINERD/state"
[grpc]
  address = "$CONTAINERD/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  sandbox_image = "$PAUSE_IMAGE"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$RUN/cni"
TOML
  cat > "$RUN/cni/10-bridge.conflist" <<'JSON'
{ "cniVersion": "1.0.0", "name": "podnet", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "loopback"} ] }
JSON
  # cgroupfs + failCgroupV1 false: this machine has cgroup v1 and no systemd.
  cat > "$RUN/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://$CONTAINERD/containerd.sock
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $PKI/kubelet.crt
tlsPrivateKeyFile: $PKI/kubelet.key
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
protectKernelDefaults: false
YAML
}

cmd_node_up() {
  need_root node-up
  cmd_up > /dev/null
  take_lock
  if node_healthy; then
    log "node $NODE_NAME already up"
    echo "KUBECONFIG=$PKI/admin.kubeconfig"
    return 0
  fi
  local t0 n; t0=$(now)
  for n in kubelet containerd; do stop "$n"; done
  ensure_node_packages
  if [ -e "$KUBELET_DIR" ] && [ ! -f "$KUBELET_MARKER" ]; then
    die "$KUBELET_DIR exists and is not ours (no $(basename "$KUBELET_MARKER")); is a kubelet already running here?"
  fi
  mkdir -p "$KUBELET_DIR" "$CONTAINERD" "$RUN/cni"
  : > "$KUBELET_MARKER"
  write_node_config
  start containerd "$(command -v containerd)" --config "$RUN/containerd.toml"
  wait_for "$READY_TIMEOUT" containerd test -S "$CONTAINERD/containerd.sock" ||
    fail_up "containerd did not start ($WAIT_WHY)" containerd
  base_images
  start kubelet "$BIN/kubelet" --config="$RUN/kubelet.yaml" --kubeconfig="$PKI/kubelet.kubeconfig" \
    --hostname-override="$NODE_NAME" --node-ip="$IP_NS" --root-dir="$KUBELET_DIR"
  wait_for "$READY_TIMEOUT" kubelet kctl get node "$NODE_NAME" ||
    fail_up "node $NODE_NAME did not register ($WAIT_WHY)" kubelet containerd
  wait_for "$READY_TIMEOUT" kubelet test -d "$KUBELET_DIR/plugins_registry" ||
    fail_up "the kubelet made no plugin registry ($WAIT_WHY)" kubelet
  log "node $NODE_NAME up in $(since "$t0")s (kubelet dir $KUBELET_DIR)"
  echo "KUBECONFIG=$PKI/admin.kubeconfig"
}

base_images() { # the pause and busybox images, built once per content, imported
  local key dir w
  command -v gcc > /dev/null || apt_install gcc libc6-dev
  [ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx sh || apt_install busybox-static
  key=$(cat "$HERE/pause.c" "$HERE/../images/oci-image.sh" /bin/busybox | sha256sum | cut -c1-12)
  dir=$CACHE/e2e-images-$key
  if [ ! -f "$dir/busybox.tar" ]; then
    w=$(mktemp -d)
    mkdir -p "$w/pause" "$w/bb/bin" "$w/bb/etc" "$w/bb/tmp" "$dir.tmp"
    gcc -static -Os -s -o "$w/pause/pause" "$HERE/pause.c" || { rm -rf "$w"; die "cannot build pause"; }
    tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$w/pause" -cf "$w/pause.layer" .
    "$HERE/../images/oci-image.sh" "$PAUSE_IMAGE" "$dir.tmp/pause.tar" '["/pause"]' "$w/pause.layer" > /dev/null
    cp /bin/busybox "$w/bb/bin/busybox"
    for n in $(/bin/busybox --list); do [ "$n" = busybox ] || ln -s busybox "$w/bb/bin/$n"; done
    echo 'root:x:0:0:root:/root:/bin/sh' > "$w/bb/etc/passwd"
    echo 'root:x:0:' > "$w/bb/etc/group"
    chmod 1777 "$w/bb/tmp"
    tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$w/bb" -cf "$w/bb.layer" .
    "$HERE/../images/oci-image.sh" "$BUSYBOX_IMAGE" "$dir.tmp/busybox.tar" '["/bin/sh"]' "$w/bb.layer" > /dev/null
    rm -rf "$w" "$dir"
    mv "$dir.tmp" "$dir"
  fi
  import_images "$dir/pause.tar" "$dir/busybox.tar"
}

import_images() { # TAR...
  local t
  for t in "$@"; do
    ctr_ images import "$t" > /dev/null || die "cannot import $t into containerd"
  done
}

cmd_import() {
  need_root import
  [ $# -gt 0 ] || die "import needs OCI archives to load"
  proc_alive containerd || die "the node is not up (cluster.sh node-up first)"
  local t0; t0=$(now)
  import_images "$@"
  log "imported $# image(s) in $(since "$t0")s"
}

cmd_down() {
  need_root down
  check_state_path
  take_lock
  if ! anything_present; then
    log "nothing to tear down"
    return 0
  fi
  local t0; t0=$(now)
  teardown
  log "down in $(since "$t0")s"
}

cmd_status() {
  if healthy; then echo "up: $SERVER (state $STATE)"; else echo "down"; return 1; fi
}

cmd_env() {
  echo "export KUBECONFIG=$PKI/admin.kubeconfig"
  echo "export ZEBU_K8S_BIN=$BIN"
  echo "export ZEBU_K8S_NETNS=$NETNS"
  echo "export ZEBU_K8S_APISERVER=$SERVER"
}

case "${1:-}" in
  up) cmd_up ;;
  node-up) cmd_node_up ;;
  import) shift; cmd_import "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) cmd_env ;;
  -h|--help|help) usage ;;
  *) usage; exit 2 ;;
esac
