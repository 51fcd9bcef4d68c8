#!/usr/bin/env bash
# Builds the .deb (deploy/debian/build.sh, which FENCEGATE_DEB_PGO=1 makes package the
# profile-guided build) and installs it with dpkg into a scratch root, never into this machine:
# checks that every file lands where the unit and the docs say, that the installed binary runs
# and accepts the installed config, that the config is a conffile, and that removing the package
# leaves the operator's config until a purge. Run by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/debian/build.sh
deb=$(ls -t target/debian/fencegate_*.deb | head -1)
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
# An empty dpkg database of its own: the scratch root shares nothing with the host's.
mkdir -p "$root/var/lib/dpkg/info" "$root/var/lib/dpkg/updates"
touch "$root/var/lib/dpkg/status" "$root/var/lib/dpkg/available"
# --force-depends: the scratch root has no libc package to satisfy Depends (the host's is used).
dpkg_root() { dpkg --root="$root" --force-not-root --force-depends --log=/dev/null "$@"; }

fail() { echo "deb check: $*" >&2; exit 1; }
dpkg-deb --info "$deb"
dpkg-deb --contents "$deb"
dpkg_root --install "$deb"
for file in \
    usr/bin/fencegate \
    usr/lib/systemd/system/fencegate.service \
    etc/fencegate/fencegate.toml \
    usr/share/man/man1/fencegate.1.gz \
    usr/share/bash-completion/completions/fencegate \
    usr/share/zsh/vendor-completions/_fencegate \
    usr/share/fish/vendor_completions.d/fencegate.fish \
    usr/share/doc/fencegate/copyright; do
    [ -e "$root/$file" ] || fail "/$file is missing from the installed package"
done
"$root/usr/bin/fencegate" --version
"$root/usr/bin/fencegate" check-config "$root/etc/fencegate/fencegate.toml" >/dev/null ||
    fail "the installed binary refuses the installed config"
zcat "$root/usr/share/man/man1/fencegate.1.gz" | grep -q '^\.TH fencegate 1' ||
    fail "the installed man page is not fencegate(1)"
# The unit runs `fencegate` by name (systemd searches /usr/local/bin, then /usr/bin), so the same
# unit serves a hand install and the package.
grep -q '^ExecStart=fencegate serve --config /etc/fencegate/fencegate.toml' \
    "$root/usr/lib/systemd/system/fencegate.service" || fail "the unit does not run the packaged binary"
grep -qx '/etc/fencegate/fencegate.toml' "$root/var/lib/dpkg/info/fencegate.conffiles" ||
    fail "/etc/fencegate/fencegate.toml is not a conffile"

echo '# edited by the operator' >> "$root/etc/fencegate/fencegate.toml"
dpkg_root --remove fencegate
[ ! -e "$root/usr/bin/fencegate" ] || fail "remove left the binary"
grep -q 'edited by the operator' "$root/etc/fencegate/fencegate.toml" ||
    fail "remove lost the operator's config"
dpkg_root --purge fencegate
[ ! -e "$root/etc/fencegate/fencegate.toml" ] || fail "purge left the config"
echo "deb check: $deb installs, runs, keeps its conffile on remove and purges cleanly"
