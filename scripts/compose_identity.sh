#!/usr/bin/env bash
# Give compose.yaml's bootstrap peer a fixed identity, once: create its key in the `bootstrap`
# volume (kept if it exists) and write its peer id to .env as BOOTSTRAP_PEER_ID, so every service
# knows the bootstrap multiaddr /dns4/bootstrap/tcp/31337/p2p/$BOOTSTRAP_PEER_ID in advance.
# Builds the image first if needed. COMPOSE="podman compose" (or docker-compose) to use another tool.
#
#   scripts/compose_identity.sh && docker compose up -d
set -euo pipefail
cd "$(dirname "$0")/.."
read -r -a COMPOSE <<< "${COMPOSE:-docker compose}"

# hivemind's own identity format (what --identity_path reads); the peer id derives from the key
CREATE='
import os, sys
from hivemind.p2p import P2P, PeerID
path = sys.argv[1]
if not os.path.exists(path):
    P2P.generate_identity(path)
with open(path, "rb") as f:
    print(PeerID.from_identity(f.read()).to_base58())
'
# BOOTSTRAP_PEER_ID is not known yet: a placeholder lets compose.yaml be read
output=$(BOOTSTRAP_PEER_ID=pending "${COMPOSE[@]}" run --rm --no-deps -T --entrypoint python \
    bootstrap -c "$CREATE" /cache/bootstrap.key)
peer_id=$(printf '%s\n' "$output" | tail -n 1 | tr -d '\r')
[[ $peer_id =~ ^(Qm|12D3Koo)[1-9A-HJ-NP-Za-km-z]+$ ]] || { echo "unexpected output: $output" >&2; exit 1; }

touch .env
grep -v '^BOOTSTRAP_PEER_ID=' .env > .env.tmp || true
echo "BOOTSTRAP_PEER_ID=$peer_id" >> .env.tmp
mv .env.tmp .env
echo "bootstrap peer: /dns4/bootstrap/tcp/31337/p2p/$peer_id (BOOTSTRAP_PEER_ID in .env)"
