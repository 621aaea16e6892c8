#!/usr/bin/env bash
# Runs a command inside a VM on another kernel: Debian 12's 6.1 by default
# (no tcx, so the clsact path is the real one; PPP modules, so pppd is
# real), Debian 11's 5.10 (no bpf_loop, the oldest kernel supported) or
# Debian 12's 6.12 (tcx) with MHBPF_VM_KERNEL. The
# guest's root is the host's, read-only under a tmpfs overlay: the command
# (typically a Go test binary built on the host) runs unchanged, and the
# host is never written to. Usable as `go test -exec test/vm/vm.sh PKG`.
#
# Settings: MHBPF_VM_KERNEL (default 6.1.0-56-amd64; a 5.10.0-*-amd64 is
# fetched from Debian 11's archive, see fetch_kernel), MHBPF_VM_ACCEL
# (default tcg; kvm hangs on these machines), MHBPF_VM_MEM (MiB, 1536),
# MHBPF_VM_TIMEOUT (seconds, 600).
set -euo pipefail

KVER=${MHBPF_VM_KERNEL:-6.1.0-56-amd64}
ACCEL=${MHBPF_VM_ACCEL:-tcg}
MEM=${MHBPF_VM_MEM:-1536}
TIMEOUT=${MHBPF_VM_TIMEOUT:-600}
CACHE=${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/mhbpf-vm/$KVER
# Loaded in the guest before the command runs, each or the run fails:
# tun (openvpn), PPP (real pppd), veth, the tc ingress/clsact path, tbf
# shaping, nftables NAT and fib, conntrack over netlink. (nft_counter is
# part of nf_tables on 6.1.)
GUEST_MODS="tun ppp_generic ppp_async slhc veth sch_ingress cls_bpf act_bpf sch_tbf nf_tables nft_masq nft_nat nft_chain_nat nft_ct nft_fib_inet nft_fib_ipv4 nft_fib_ipv6 nf_conntrack_netlink"
MODS="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci netfs fscache 9pnet 9pnet_virtio 9p overlay"

die() { echo "vm.sh: $*" >&2; exit 2; }

# fetch_kernel DIR downloads the kernel's .deb into DIR. Debian 12's own
# archives (bookworm, bookworm-security: where its 6.12 is) come through
# the host's apt configuration. Debian 11's 5.10 comes from a bullseye
# source list of its own, with its own package lists, used for this
# download only: the host's apt never sees bullseye, so nothing of it is
# ever installed.
fetch_kernel() {
	local dir=$1 pkg="linux-image-$KVER"
	case "$KVER" in
	5.10.*)
		local a="${CACHE%/*}/apt-bullseye"
		mkdir -p "$a/lists/partial" "$a/archives/partial" "$a/parts"
		cat > "$a/sources.list" <<-EOF
		deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main
		deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bullseye-security main
		EOF
		local opts=(-o "Dir::Etc::SourceList=$a/sources.list" -o "Dir::Etc::SourceParts=$a/parts"
			-o "Dir::State::Lists=$a/lists" -o "Dir::Cache=$a" -o "Dir::Cache::archives=$a/archives"
			-o "Dir::State::status=/dev/null" -o "Dir::Etc::Preferences=/dev/null" -o "Dir::Etc::PreferencesParts=$a/parts")
		apt-get "${opts[@]}" update -qq >/dev/null || die "apt-get update of the bullseye list failed"
		(cd "$dir" && apt-get "${opts[@]}" download -q "$pkg" >/dev/null) || die "apt-get download $pkg (bullseye) failed"
		;;
	*)
		if ! (cd "$dir" && apt-get download -q "$pkg" >/dev/null 2>&1); then
			apt-get update -qq >/dev/null 2>&1 || true
			(cd "$dir" && apt-get download -q "$pkg" >/dev/null) || die "apt-get download $pkg failed"
		fi
		;;
	esac
}

prepare() {
	[ -f "$CACHE/ready" ] && return 0
	for t in qemu-system-x86_64 busybox dpkg-deb apt-get cpio gzip; do
		command -v "$t" >/dev/null || die "needs $t (make deps installs it)"
	done
	local tmp; tmp=$(mktemp -d)
	trap 'rm -rf "$tmp"' RETURN
	mkdir -p "$CACHE"
	fetch_kernel "$tmp"
	rm -rf "$CACHE/root"
	dpkg-deb -x "$tmp"/linux-image-"$KVER"_*.deb "$CACHE/root"
	# Debian's 6.12 compresses its modules; busybox's insmod and modprobe
	# take them plain.
	find "$CACHE/root/lib/modules/$KVER" -name '*.ko.xz' -exec xz -d {} +
	busybox depmod -b "$CACHE/root" "$KVER"
	cp "$CACHE/root/boot/vmlinuz-$KVER" "$CACHE/vmlinuz"

	# The initramfs: busybox, the modules to reach the 9p root, an init
	# that mounts it under an overlay and hands over to the run's stage 2.
	local ird="$tmp/initramfs"
	mkdir -p "$ird"/{bin,dev,proc,sys,mnt/lower,mnt/rw,mnt/root,mnt/results,mods}
	cp "$(command -v busybox)" "$ird/bin/busybox"
	for m in $MODS; do
		f=$(find "$CACHE/root/lib/modules/$KVER" -name "$m.ko" | head -1)
		[ -n "$f" ] && cp "$f" "$ird/mods/"
	done
	cat > "$ird/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
for m in MODS_LIST; do [ -f /mods/$m.ko ] && insmod /mods/$m.ko; done
o="trans=virtio,version=9p2000.L,msize=262144"
mount -t 9p -o "$o,ro,cache=loose" root /mnt/lower || { echo "vm: no 9p root"; cat /proc/modules; dmesg | tail -20; poweroff -f; }
mount -t tmpfs -o size=2g tmpfs /mnt/rw
mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay -o lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work overlay /mnt/root
mkdir -p /mnt/root/mnt/vm-results
mount -t 9p -o "$o" results /mnt/root/mnt/vm-results
exec switch_root /mnt/root /bin/sh /mnt/vm-results/stage2
INIT
	sed -i "s/MODS_LIST/$MODS/" "$ird/init"
	chmod +x "$ird/init"
	mknod "$ird/dev/console" c 5 1 2>/dev/null || true
	(cd "$ird" && find . | cpio -o -H newc 2>/dev/null | gzip -1) > "$CACHE/initramfs.cpio.gz"
	touch "$CACHE/ready"
}

[ $# -gt 0 ] || die "usage: vm.sh COMMAND [ARGS...]"
( flock 9; prepare ) 9>"${CACHE%/*}.lock" 2>/dev/null || { mkdir -p "${CACHE%/*}"; ( flock 9; prepare ) 9>"${CACHE%/*}.lock"; }

R=$(mktemp -d /tmp/mhbpf-vm-run-XXXXXX)
trap 'rm -rf "$R"' EXIT
# The command, with the caller's directory and environment.
{
	printf 'cd %q\n' "$PWD"
	export -p | grep -v -E ' (PWD|OLDPWD|SHLVL|_)=' || true
	# Emulation is slow: tests stretch their time limits by this much.
	printf 'export MHBPF_TIME_SCALE=%q\n' "${MHBPF_TIME_SCALE:-5}"
	printf 'exec'
	printf ' %q' "$@"
	printf '\n'
} > "$R/cmd"

cat > "$R/stage2" <<STAGE2
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm /dev/net
mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts
ln -sf /dev/pts/ptmx /dev/ptmx 2>/dev/null
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /dev/shm
mount -t bpf bpf /sys/fs/bpf
mount -t tmpfs tmpfs /sys/fs/cgroup
mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mkdir -p /lib/modules/$KVER && mount --bind $CACHE/root/lib/modules/$KVER /lib/modules/$KVER
printf '#!/bin/sh\nexec busybox modprobe "\$@"\n' > /run/modprobe && chmod +x /run/modprobe
echo /run/modprobe > /proc/sys/kernel/modprobe
# What the tests need of the kernel. A module that does not load is a
# failure of the run, not a test that skips: the command does not run.
failed=
for m in $GUEST_MODS; do
	grep -q "/\$m.ko" /lib/modules/$KVER/modules.builtin 2>/dev/null && continue
	busybox modprobe \$m 2>>/mnt/vm-results/modprobe.err || failed="\$failed \$m"
done
[ -c /dev/ppp ] || failed="\$failed /dev/ppp"
if [ -n "\$failed" ]; then
	{ echo "vm: kernel $KVER: modules missing:\$failed"; cat /mnt/vm-results/modprobe.err; } > /mnt/vm-results/stderr
	echo 2 > /mnt/vm-results/rc
	sync
	poweroff -f
fi
ip link set lo up
hostname mhbpf-vm
: > /mnt/vm-results/started
bash /mnt/vm-results/cmd > /mnt/vm-results/stdout 2> /mnt/vm-results/stderr
echo \$? > /mnt/vm-results/rc
sync
poweroff -f
STAGE2

boot() {
	timeout "$TIMEOUT" qemu-system-x86_64 -accel "$ACCEL" -cpu max -smp 2 -m "$MEM" -nodefaults -no-reboot \
		-display none -monitor none -serial "file:$R/console.log" \
		-bios /usr/share/qemu/qboot.rom -kernel "$CACHE/vmlinuz" -initrd "$CACHE/initramfs.cpio.gz" \
		-append "console=ttyS0 quiet loglevel=3 panic=-1" \
		-fsdev local,id=root,path=/,security_model=none,readonly=on,multidevs=remap \
		-device virtio-9p-pci,fsdev=root,mount_tag=root \
		-fsdev "local,id=res,path=$R,security_model=none" -device virtio-9p-pci,fsdev=res,mount_tag=results \
		|| true
}
# A kernel that dies while booting, before the command starts, is booted
# again (at most three boots): under TCG, Debian's 6.12 now and then takes
# an int3 Oops while patching its own code at boot. A command that started
# is never run twice.
for attempt in 1 2 3; do
	boot
	[ -f "$R/started" ] || [ -f "$R/rc" ] && break
	echo "vm.sh: kernel $KVER died before the command started (boot $attempt of 3); console:" >&2
	grep -E 'Oops|panic|RIP' "$R/console.log" | head -5 >&2 || true
done

cat "$R/stdout" 2>/dev/null || true
cat "$R/stderr" >&2 2>/dev/null || true
if [ ! -f "$R/rc" ]; then
	echo "vm.sh: the VM did not finish the command; console:" >&2
	tail -40 "$R/console.log" >&2
	exit 3
fi
exit "$(cat "$R/rc")"
