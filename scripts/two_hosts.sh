#!/usr/bin/env bash
# Two "hosts" on this machine, run as docs/multi-node.md says (not part of `make test`).
#
#     sudo scripts/two_hosts.sh [OUT] [-- megabatch train options]
#
# Brings up two network namespaces joined by a veth pair (node0 10.213.0.1,
# node1 10.213.0.2). Both share this machine's /etc/hosts, so each host's name
# resolves to 127.0.0.1 there: the case docs/multi-node.md is written for. Then
# runs the documented torchrun command on both (one gloo process per node) and
# checks that both end with exit status 0. Default training options:
#     --recipe fashion-mnist-demo --set train.max_steps=20
# OUT defaults to runs/two-hosts (it is replaced). Needs root and `ip` (iproute2).
set -euo pipefail

cd "$(dirname "$0")/.."
OUT=runs/two-hosts
if [[ $# -gt 0 && $1 != "--" ]]; then OUT=$1; shift; fi
[[ ${1:-} == "--" ]] && shift
TRAIN=("$@")
[[ ${#TRAIN[@]} -gt 0 ]] || TRAIN=(--recipe fashion-mnist-demo --set train.max_steps=20)

if [[ $(id -u) -ne 0 ]]; then echo "two_hosts.sh: needs root (ip netns); run it with sudo" >&2; exit 2; fi
command -v ip >/dev/null || { echo "two_hosts.sh: needs ip: apt-get install -y iproute2" >&2; exit 2; }
TORCHRUN=$(command -v .venv/bin/torchrun || command -v torchrun) \
    || { echo "two_hosts.sh: torchrun not found (make the .venv first)" >&2; exit 2; }

NS=(mb-node0 mb-node1) IF=(mb-veth0 mb-veth1) ADDR=(10.213.0.1 10.213.0.2) PORT=29517
cleanup() { for ns in "${NS[@]}"; do ip netns del "$ns" 2>/dev/null || true; done; }
trap cleanup EXIT
cleanup
for i in 0 1; do ip netns add "${NS[$i]}"; done
ip link add "${IF[0]}" type veth peer name "${IF[1]}"
for i in 0 1; do
    ip link set "${IF[$i]}" netns "${NS[$i]}"
    ip -n "${NS[$i]}" addr add "${ADDR[$i]}/24" dev "${IF[$i]}"
    ip -n "${NS[$i]}" link set "${IF[$i]}" up
    ip -n "${NS[$i]}" link set lo up
done
echo "hosts: node0 ${ADDR[0]} (${IF[0]}), node1 ${ADDR[1]} (${IF[1]}); this host's name $(hostname)" \
     "resolves to $(getent hosts "$(hostname)" | awk '{print $1; exit}')"
rm -rf "$OUT"

# The documented command (docs/multi-node.md, "torchrun"): every node names its own
# address and interface; only the first node adds --rdzv-conf=is_host=1.
node() {  # node INDEX EXTRA_TORCHRUN_OPTIONS...
    local i=$1; shift
    local cmd=(env GLOO_SOCKET_IFNAME="${IF[$i]}" NCCL_SOCKET_IFNAME="${IF[$i]}"
        "$TORCHRUN" --nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint="${ADDR[0]}:$PORT"
        --rdzv-id=two-hosts --local-addr="${ADDR[$i]}" "$@" -m megabatch train "${TRAIN[@]}" --out "$OUT")
    echo "[node$i] \$ ${cmd[*]}"
    ip netns exec "${NS[$i]}" "${cmd[@]}" 2>&1 | sed -u "s/^/[node$i] /"
    return "${PIPESTATUS[0]}"
}
node 0 --rdzv-conf=is_host=1 & first=$!
node 1 & second=$!
status=0
wait "$first" || status=$?
wait "$second" || status=$((status ? status : $?))
if [[ $status -eq 0 ]]; then
    echo "two_hosts.sh: both nodes finished; $OUT/metrics.jsonl: $(tail -n 1 "$OUT/metrics.jsonl")"
else
    echo "two_hosts.sh: failed (exit status $status)" >&2
fi
exit "$status"
