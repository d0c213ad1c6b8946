#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine (run as root): system
# packages, debugfs/tracefs mounts, the venv, and the kernel header tree BCC
# compiles against.  Each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
# BCC and its interpreter; QEMU, tmux and Prometheus for the tests;
# bpftrace (and linux-perf, below) for the benchmark's peers; binutils, gcc
# and the uapi headers for the tests of our x86 encoder and KVM ABI copy;
# the kernel build (make kernel: flex, bison, bc, libelf, pahole, ccache)
# the test VM's initramfs (busybox-static), and QEMU with qemu/patches
# (make qemu: meson, glib, pixman, libfdt, curl for the source package).
PACKAGES=(python3-bpfcc python3-venv python3-pip qemu-system-x86 tmux prometheus bpftrace binutils gcc
	libc6-dev linux-libc-dev util-linux linux-perf make flex bison bc libelf-dev dwarves ccache
	busybox-static xz-utils patch meson ninja-build pkg-config libglib2.0-dev libpixman-1-dev
	libfdt-dev curl)

log() { echo "setup: $*"; }

if [ "$(id -u)" != 0 ]; then
	echo "setup: must run as root (apt, mounts, BPF)" >&2
	exit 1
fi

missing=()
for p in "${PACKAGES[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Kernel headers for BCC: the newest Debian 6.12 LTS package, unless the
# running kernel ships its own build tree.
if [ ! -d "/lib/modules/$(uname -r)/build/include" ] && ! ls -d /usr/src/linux-headers-*-amd64 >/dev/null 2>&1; then
	newest() { apt-cache search --names-only '^linux-headers-6\.12\.[0-9]+\+deb12-amd64$' | awk '{print $1}' | sort -V | tail -n 1; }
	hdr=$(newest)
	if [ -z "$hdr" ]; then
		apt-get update -q >/dev/null
		hdr=$(newest)
	fi
	[ -n "$hdr" ] || { echo "setup: apt knows no linux-headers-6.12.*-amd64" >&2; exit 1; }
	missing+=("$hdr")
fi
if [ ${#missing[@]} -gt 0 ]; then
	log "installing ${missing[*]}"
	apt-get update -q >/dev/null
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

grep -q " /sys/kernel/debug debugfs " /proc/mounts || mount -t debugfs none /sys/kernel/debug
grep -q " /sys/kernel/tracing tracefs " /proc/mounts || mount -t tracefs none /sys/kernel/tracing

# The venv must use Debian's interpreter: BCC's bindings are built for it.
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import bcc" 2>/dev/null; then
	log "creating $VENV from /usr/bin/python3"
	rm -rf "$VENV"
	/usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
stamp="$VENV/.installed-$(cat setup.cfg pyproject.toml | sha1sum | cut -c1-12)"
if [ ! -e "$stamp" ]; then
	log "installing ioregtrace into $VENV"
	"$VENV/bin/pip" install -q -e '.[test]'
	rm -f "$VENV"/.installed-*
	touch "$stamp"
fi

# Builds the merged header tree once (cached in /var/cache/ioregtrace).
"$VENV/bin/ioregtrace" doctor --fix >/dev/null || "$VENV/bin/ioregtrace" doctor
log "ready"
