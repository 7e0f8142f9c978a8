#!/usr/bin/env bash
# Writes a throwaway CA (ca.pem) and a certificate for localhost / 127.0.0.1 signed by it
# (leaf.pem, leaf.key) into DIR, with openssl: the HTTPS fake upstreams of the tests and of
# the benchmark. Valid for 2 days; never use these anywhere else.
set -euo pipefail
cd "$1"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key \
  -out ca.pem -days 2 -subj "/CN=tokenrelay test CA" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout leaf.key \
  -out leaf.csr -subj "/CN=localhost" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > ext.cnf
openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out leaf.pem \
  -days 2 -extfile ext.cnf 2>/dev/null
