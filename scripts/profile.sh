#!/usr/bin/env bash
# Instructions per proxied request, tokenrelay vs nginx, counted by valgrind's callgrind
# (user space; stable on a noisy machine, unlike timings), on the benchmark's fake upstream.
# Each proxy runs under callgrind, gets 500 warm-up requests, has its counters zeroed,
# serves N requests (8 connections), and is dumped; the script prints Ir per request and
# where tokenrelay's go.
#   scripts/profile.sh [N]          (default 5000)
#   scripts/profile.sh N --usage    accounting instead: tokenrelay not metered (no model
#                                   named), metered, and metered with clients and limits,
#                                   on answers that carry usage; then where the last one's
#                                   instructions go
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-5000}
MODE=${2:-}
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
for p in valgrind nginx; do
  command -v "$p" >/dev/null || { as_root apt-get update -qq; DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$p" >/dev/null; }
done
command -v oha >/dev/null || cargo install --locked oha
cargo build --release --locked --bin tokenrelay
cargo bench --locked --bench bench --no-run 2>/dev/null
bench=$(ls -t target/release/deps/bench-* | grep -v '\.d$' | head -1)
work=$(mktemp -d)
# The benchmark's --serve starts the fakes, a tokenrelay and an nginx of its own: it runs in
# a process group of its own (setsid), and the whole group is ended on exit, not only it.
trap 'kill -- -"$serve" $(jobs -p) 2>/dev/null; sleep 0.5; [ -n "${KEEP:-}" ] && cp "$work"/*.cg.* /tmp/ 2>/dev/null; rm -rf "$work"' EXIT
setsid "$bench" --serve > "$work/serve.txt" 2>/dev/null &
serve=$!
for _ in $(seq 100); do grep -q upstream "$work/serve.txt" 2>/dev/null && break; sleep 0.2; done
up=$(awk '{print $2}' "$work/serve.txt")
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
tr_port=$(free_port); tr_admin=$(free_port); ng_port=$(free_port)
cat > "$work/tokenrelay.toml" <<EOF
[server]
listen = "127.0.0.1:$tr_port"
admin_listen = "127.0.0.1:$tr_admin"
proxy_threads = 1
[providers.bench]
upstream = "$up"
api_keys = ["bench-key"]
EOF
mkdir -p "$work/nginx"
cat > "$work/nginx/nginx.conf" <<EOF
worker_processes 1;
master_process off;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 2000; }
http {
  access_log off;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  upstream fake { server ${up#http://}; keepalive 256; }
  server {
    listen 127.0.0.1:$ng_port;
    location / {
      proxy_pass http://fake;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer static-token";
      proxy_buffering off;
    }
  }
}
EOF
# count NAME URL CMD...: Ir per request for N requests through URL (BODY and KEY from the
# environment: the request body, and a client key to send).
count() {
  local name=$1 url=$2; shift 2
  local body=${BODY:-'{"model":"bench","messages":[]}'}
  local auth=()
  [ -n "${KEY:-}" ] && auth=(-H "authorization: Bearer $KEY")
  valgrind --tool=callgrind --callgrind-out-file="$work/$name.cg" "$@" > "$work/$name.log" 2>&1 &
  local pid=$!
  for _ in $(seq 300); do curl -s -o /dev/null "$url" && break; sleep 0.2; done
  oha -n 500 -c 8 --no-tui "${auth[@]}" -m POST -H "content-type: application/json" -d "$body" "$url" > /dev/null
  callgrind_control -z "$pid" > /dev/null
  oha -n "$N" -c 8 --no-tui -m POST -H 'content-type: application/json' "${auth[@]}" \
    -d "$body" "$url" | grep -E 'Success rate' | sed "s/^/$name: /"
  callgrind_control -d "$pid" > /dev/null
  kill "$pid"; wait "$pid" 2>/dev/null || true
  local total
  total=$(callgrind_annotate "$(ls -t "$work/$name.cg".* | head -1)" 2>/dev/null | awk '/PROGRAM TOTALS/{gsub(",","",$1); print $1}')
  echo "$name: $((total / N)) instructions per request (user space)"
}
if [ "$MODE" = --usage ]; then
  cp "$work/tokenrelay.toml" "$work/plain.toml"
  { echo '[usage]'; echo "path = \"$work/usage.db\""; } >> "$work/plain.toml"
  cat "$work/plain.toml" - > "$work/clients.toml" <<EOF
[[clients]]
name = "bot-a"
key = "ck-bench-a"
rpm = 100000000
tpm = 100000000000
tokens_per_day = 100000000000
tokens_per_month = 100000000000
EOF
  url="http://127.0.0.1:$tr_port/bench/v1/usage/chat/completions"
  BODY='{"messages":[]}' TOKENRELAY_LOG=warn count not-metered "$url" target/release/tokenrelay --config "$work/plain.toml"
  TOKENRELAY_LOG=warn count metered "$url" target/release/tokenrelay --config "$work/plain.toml"
  KEY=ck-bench-a TOKENRELAY_LOG=warn count clients "$url" target/release/tokenrelay --config "$work/clients.toml"
  echo
  echo "metered with clients, self, per request:"
  callgrind_annotate --threshold=100 "$(ls -t "$work/clients.cg".* | head -1)" 2>/dev/null |
    grep -E '^ *[0-9,]+ \( *[0-9.]+%\)  ' | awk -v n="$N" '{gsub(",","",$1); printf "%8d  %s\n", $1 / n, $0}' | cut -c1-220 | head -40
  exit 0
fi
TOKENRELAY_LOG=warn count tokenrelay "http://127.0.0.1:$tr_port/bench/v1/chat/completions" \
  target/release/tokenrelay --config "$work/tokenrelay.toml"
count nginx "http://127.0.0.1:$ng_port/v1/chat/completions" \
  nginx -c "$work/nginx/nginx.conf" -p "$work/nginx"
echo
echo "tokenrelay, inclusive, per request (its own functions and the hyper layers):"
callgrind_annotate --inclusive=yes --threshold=100 "$(ls -t "$work/tokenrelay.cg".* | head -1)" 2>/dev/null |
  grep -E 'tokenrelay::proxy::(serve|admit::forwarded_headers|answer::stream_back|admit::upstream_uri|admit::check_path|browser::BrowserGuard::check)|Connections::(send|exchange)|Driven as .*Body>::poll_frame|UpgradeableConnection<I,S> as core::future::future::Future>::poll \[|Credential::snapshot' |
  awk -v n="$N" '{gsub(",","",$1); printf "%8d  %s\n", $1 / n, $0}' | cut -c1-200 | sort -rn | head -14
echo
echo "nginx, self, per request:"
callgrind_annotate --threshold=100 "$(ls -t "$work/nginx.cg".* | head -1)" 2>/dev/null |
  grep -E '^ *[0-9,]+ \( *[0-9.]+%\)  ' | grep -v -E 'main|libc_start|below main|0x0000000000001ab70' |
  awk -v n="$N" '{gsub(",","",$1); printf "%8d  %s\n", $1 / n, $0}' | cut -c1-160 | head -12
