#!/usr/bin/env bash
# Generates TLS material for a PyKMIP test/development server with the openssl CLI.
#
#   gen-certs.sh DIR [CLIENT_CN...]
#
# Writes into DIR (created if missing):
#   ca.pem ca.key                 ECDSA P-256 CA
#   server.pem server.key         server cert, SAN IP:127.0.0.1 + DNS:localhost, serverAuth
#   client-<CN>.pem/.key          one client cert per CLIENT_CN (default: "nvseal"),
#                                 extendedKeyUsage=clientAuth; PyKMIP uses the CN as key owner
#   client.pem client.key         copy of the first client cert
#   wrong-ca.pem wrong-ca.key     an unrelated CA
#   wrong-client.pem/.key         client cert (CN of the first client) signed by wrong-ca
#
# ECDSA P-256 is deliberate: PyKMIP's TLS1.2 suite list has no RSA+AES-GCM suite, so a modern
# client (rustls) shares no cipher with an RSA-certificate server.
set -euo pipefail

dir="${1:?usage: gen-certs.sh DIR [CLIENT_CN...]}"
shift
cns=("$@")
[[ ${#cns[@]} -gt 0 ]] || cns=("nvseal")
mkdir -p "$dir"
cd "$dir"
days=3650

newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; chmod 600 "$1"; }

make_ca() { # name subject
    newkey "$1.key"
    openssl req -new -x509 -key "$1.key" -out "$1.pem" -days "$days" -subj "$2" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
}

make_leaf() { # name subject ca ext...
    local name="$1" subj="$2" ca="$3"
    shift 3
    local ext="$name.ext"
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyAgreement" "$@" > "$ext"
    newkey "$name.key"
    openssl req -new -key "$name.key" -subj "$subj" -out "$name.csr" 2>/dev/null
    openssl x509 -req -in "$name.csr" -CA "$ca.pem" -CAkey "$ca.key" -CAcreateserial \
        -out "$name.pem" -days "$days" -extfile "$ext" 2>/dev/null
    rm -f "$name.csr" "$ext"
}

make_ca ca "/CN=nvseal test KMIP CA"
make_leaf server "/CN=localhost" ca "extendedKeyUsage=serverAuth" \
    "subjectAltName=IP:127.0.0.1,DNS:localhost"
for cn in "${cns[@]}"; do
    make_leaf "client-$cn" "/CN=$cn" ca "extendedKeyUsage=clientAuth"
done
cp "client-${cns[0]}.pem" client.pem
cp "client-${cns[0]}.key" client.key

make_ca wrong-ca "/CN=nvseal unrelated CA"
make_leaf wrong-client "/CN=${cns[0]}" wrong-ca "extendedKeyUsage=clientAuth"
rm -f ./*.srl
