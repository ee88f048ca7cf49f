# Shell helpers shared by tools/ scripts. Source it; do not run it.

# A free TCP port on 127.0.0.1.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
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
