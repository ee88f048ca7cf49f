# Shell helpers shared by tools/ scripts. Source it; do not run it.

# A free TCP port on 127.0.0.1 (bash only: a fresh machine may have no python).
free_port() {
  local port
  while true; do
    port=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
}

# start_registry DIR PORT: runs Debian's docker-registry with storage under DIR on 127.0.0.1:PORT
# in the background, waits until it answers, and prints its PID.
start_registry() {
  local dir=$1 port=$2
  mkdir -p "$dir/data"
  cat > "$dir/config.yml" <<YAML
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $dir/data}, delete: {enabled: true}}
http: {addr: 127.0.0.1:$port}
YAML
  docker-registry serve "$dir/config.yml" > "$dir/registry.log" 2>&1 &
  local pid=$!
  for _ in $(seq 100); do
    if curl -fs "http://127.0.0.1:$port/v2/" >/dev/null; then
      echo "$pid"
      return 0
    fi
    sleep 0.1
  done
  echo "registry on port $port did not start; log:" >&2
  cat "$dir/registry.log" >&2
  return 1
}

# start_containerd DIR [SNAPSHOTTER_SOCKET]: runs containerd with root, state and socket under DIR
# in the background, waits until it answers, and prints its PID. The socket is
# DIR/containerd.sock. With a second argument, the lazylayer snapshotter listening there is a
# proxy plugin named `lazylayer`.
start_containerd() {
  local dir=$1 snapshotter=${2:-}
  mkdir -p "$dir"
  cat > "$dir/config.toml" <<TOML
version = 2
root = "$dir/root"
state = "$dir/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$dir/containerd.sock"
[ttrpc]
  address = "$dir/containerd.sock.ttrpc"
TOML
  if [ -n "$snapshotter" ]; then
    cat >> "$dir/config.toml" <<TOML
[proxy_plugins]
  [proxy_plugins.lazylayer]
    type = "snapshot"
    address = "$snapshotter"
TOML
  fi
  containerd --config "$dir/config.toml" > "$dir/containerd.log" 2>&1 &
  local pid=$!
  for _ in $(seq 100); do
    if ctr -a "$dir/containerd.sock" version >/dev/null 2>&1; then
      echo "$pid"
      return 0
    fi
    sleep 0.1
  done
  echo "containerd did not start; log:" >&2
  cat "$dir/containerd.log" >&2
  return 1
}

# convert_image SOCK SRC DST FLAG: pulls SRC (plain HTTP), converts it with ctr-remote
# (FLAG: --estargz or --zstdchunked) and pushes DST.
convert_image() {
  local sock=$1 src=$2 dst=$3 flag=$4
  ctr -a "$sock" images pull --plain-http "$src" >/dev/null
  ctr-remote -a "$sock" image convert "$flag" --oci "$src" "$dst" >/dev/null
  ctr-remote -a "$sock" image push --plain-http "$dst" >/dev/null
}
