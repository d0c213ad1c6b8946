#!/bin/sh
# make kernel: Debian's linux-source-6.12 (version pinned in source.env) with
# the ioregionfd series in patches/, a small config (tinyconfig +
# config.fragment), bzImage and the ioregionfd selftest.
#
# The build lives outside the checkout, keyed by everything it is made of,
# so a second run (or a second clone on this machine) finds it done:
#   $IOREGTRACE_CACHE/kernel/<key>/{bzImage,ioregionfd_test,src/}
# Prints that directory on the last line of stdout.
#
#   kernel/build.sh [--rebuild]    --rebuild: rebuild the cached tree in place
#                                  (after editing src/ by hand)
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${IOREGTRACE_CACHE:-/var/cache/ioregtrace}
. "$HERE/source.env"
log() { echo "kernel: $*" >&2; }

# The pinned version, unless the archive has dropped it (Debian's security
# archive keeps only recent ones): then the newest 6.12 it has.
version=$DEBIAN_VERSION
madison() { apt-cache madison linux-source-6.12 2>/dev/null | awk '{print $3}'; }
if [ ! -f "$CACHE/debs/linux-source-6.12_${version}_all.deb" ] && ! madison | grep -qx "$version"; then
	newest=$(madison | sort -V | tail -n 1)
	[ -n "$newest" ] || { apt-get update -q >&2; newest=$(madison | sort -V | tail -n 1); }
	[ -n "$newest" ] || { echo "kernel: apt has no linux-source-6.12" >&2; exit 1; }
	log "linux-source-6.12=$version is no longer in the archive; using $newest"
	version=$newest
fi

key=$( (echo "$version"; cat "$HERE/config.fragment" "$HERE/build.sh" "$HERE"/patches/*.patch) |
	sha256sum | cut -c1-16)
out=$CACHE/kernel/$key

if [ -f "$out/bzImage" ] && [ -x "$out/ioregionfd_test" ] && [ "${1:-}" != --rebuild ]; then
	log "cached: $out"
	echo "$out"
	exit 0
fi

jobs=$(nproc)
cc=gcc
if command -v ccache >/dev/null; then
	cc="ccache gcc"
	# builds of other keys live in other directories: share their objects
	export CCACHE_NOHASHDIR=1 CCACHE_BASEDIR="$out"
fi

if [ ! -d "$out/src" ]; then
	deb=$CACHE/debs/linux-source-6.12_${version}_all.deb
	if [ ! -f "$deb" ]; then
		log "downloading linux-source-6.12=$version"
		mkdir -p "$CACHE/debs"
		(cd "$CACHE/debs" && apt-get download -q "linux-source-6.12=$version") >&2 || {
			echo "kernel: linux-source-6.12=$version is not downloadable" \
				"(apt-get update? or pin a newer version in kernel/source.env)" >&2
			exit 1
		}
	fi
	rm -rf "$out.tmp"
	mkdir -p "$out.tmp"
	log "unpacking $(basename "$deb")"
	dpkg-deb --fsys-tarfile "$deb" |
		tar -xO ./usr/src/linux-source-6.12.tar.xz | tar -xJ -C "$out.tmp"
	mv "$out.tmp/linux-source-6.12" "$out.tmp/src"
	for p in "$HERE"/patches/*.patch; do
		log "applying $(basename "$p")"
		patch -d "$out.tmp/src" -p1 -s --no-backup-if-mismatch <"$p"
	done
	(
		cd "$out.tmp/src"
		make -s tinyconfig >&2
		scripts/kconfig/merge_config.sh -m .config "$HERE/config.fragment" >/dev/null
		make -s olddefconfig >&2
		# every option asked for must have survived the dependency checks
		grep '^CONFIG_' "$HERE/config.fragment" | while read -r opt; do
			grep -qx "$opt" .config || { echo "kernel: config lost $opt" >&2; exit 1; }
		done
	)
	mv "$out.tmp" "$out"
fi

cd "$out/src"
log "building bzImage with $jobs jobs (CC=$cc)"
make -s -j"$jobs" CC="$cc" bzImage >&2
cp arch/x86/boot/bzImage "$out/bzImage"

log "building the ioregionfd selftest"
make -s headers >&2
make -s -C tools/testing/selftests/kvm -j"$jobs" \
	"$out/src/tools/testing/selftests/kvm/x86_64/ioregionfd_test" >&2
cp tools/testing/selftests/kvm/x86_64/ioregionfd_test "$out/ioregionfd_test"
log "done: $out"
echo "$out"
