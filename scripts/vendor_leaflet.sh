#!/usr/bin/env bash
# Re-vendor Leaflet into cnsq/view/static/vendor/leaflet/ from the npm registry: the page loads it
# from the package, never from a CDN (cnsq view works offline and sends nothing elsewhere).
# The tarball is checked against the integrity npm publishes before anything is copied.
set -euo pipefail
VERSION="${1:-1.9.4}"
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
( cd "$work" && npm pack --silent "leaflet@$VERSION" >/dev/null )
expected="$(npm view "leaflet@$VERSION" dist.integrity)"
actual="sha512-$(openssl dgst -sha512 -binary "$work/leaflet-$VERSION.tgz" | base64 -w0)"
[ "$expected" = "$actual" ] || { echo "integrity mismatch: $actual != $expected" >&2; exit 1; }
tar -xzf "$work/leaflet-$VERSION.tgz" -C "$work"
target=cnsq/view/static/vendor/leaflet
cp "$work/package/dist/leaflet.js" "$work/package/dist/leaflet.css" "$work/package/LICENSE" "$target/"
sed -i "s/^Version: .*/Version: $VERSION/; s/^Integrity: .*/Integrity: $expected/" "$target/VENDORED.md"
echo "Vendored leaflet $VERSION ($expected)"
