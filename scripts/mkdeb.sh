#!/bin/bash
# Builds the Debian package from a built binary: mkdeb.sh BINARY OUTDIR.
# The man pages and the shell completions come from the binary itself (its
# cobra commands), the unit from dist/mhbpf.service (with the package's
# /usr/bin path), the conffile from dist/mhbpf.toml. Prints the .deb's path.
set -euo pipefail
bin=$(realpath "$1")
out=$(realpath -m "$2")
top=$(cd "$(dirname "$0")/.." && pwd)

arch=$(dpkg --print-architecture)
# A version that sorts by commit time: 0~gitYYYYMMDDHHMMSS.SHA (~: before any release).
version="0~git$(git -C "$top" log -1 --format=%cd --date=format:%Y%m%d%H%M%S).$(git -C "$top" log -1 --format=%h)"
if ! git -C "$top" diff --quiet HEAD -- 2>/dev/null; then version="$version.dirty"; fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
chmod 0755 "$root"
install -D -m 0755 "$bin" "$root/usr/bin/mhbpf"
install -d "$root/lib/systemd/system"
sed 's|/usr/local/bin/mhbpf|/usr/bin/mhbpf|g' "$top/dist/mhbpf.service" >"$root/lib/systemd/system/mhbpf.service"
chmod 0644 "$root/lib/systemd/system/mhbpf.service"
install -D -m 0644 "$top/dist/mhbpf.toml" "$root/etc/mhbpf/mhbpf.toml"
install -d "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" "$root/usr/share/man/man1"
"$bin" completion bash >"$root/usr/share/bash-completion/completions/mhbpf"
"$bin" completion zsh >"$root/usr/share/zsh/vendor-completions/_mhbpf"
"$bin" man "$root/usr/share/man/man1"
gzip -9n "$root"/usr/share/man/man1/*.1
install -d "$root/usr/share/doc/mhbpf"
cp "$top/README.md" "$top"/docs/*.md "$root/usr/share/doc/mhbpf/"
chmod 0644 "$root"/usr/share/doc/mhbpf/* "$root"/usr/share/bash-completion/completions/mhbpf "$root"/usr/share/zsh/vendor-completions/_mhbpf

install -d "$root/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat >"$root/DEBIAN/control" <<CONTROL
Package: mhbpf
Version: $version
Architecture: $arch
Maintainer: mhbpf developers <mhbpf@example.invalid>
Installed-Size: $size
Section: net
Priority: optional
Homepage: https://github.com/mhbpf/mhbpf
Description: multi-uplink router with eBPF
 Balances new connections between internet uplinks by weight, keeps each
 connection and destination on its uplink, sends chosen traffic by chosen
 uplinks, answers incoming connections from the interface they came in on,
 and moves traffic off a dead uplink at once: tc and cgroup eBPF programs
 feeding the kernel's fwmark rules.
CONTROL
echo /etc/mhbpf/mhbpf.toml >"$root/DEBIAN/conffiles"
install -m 0755 "$top/dist/deb/postinst" "$top/dist/deb/prerm" "$top/dist/deb/postrm" "$root/DEBIAN/"
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) >"$root/DEBIAN/md5sums"

mkdir -p "$out"
deb="$out/mhbpf_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
