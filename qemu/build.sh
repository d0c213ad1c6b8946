#!/bin/sh
# make qemu: Debian's qemu 7.2 source package (pinned in source.env, checked
# by sha256) with Debian's patches and then ours in patches/, built for
# x86_64-softmmu with KVM only: the QEMU the test VM runs for issue 18 (NVMe
# in an IOThread, its BAR served over ioregionfd).
#
# Kept outside the checkout, keyed by everything it is made of:
#   $IOREGTRACE_CACHE/qemu/<key>/{qemu-system-x86_64,src/,build/}
# Prints that directory on the last line of stdout; progress, with the time
# since the start, goes to stderr.
#
#   qemu/build.sh [--rebuild]    --rebuild: rebuild the cached tree in place
#                                (after editing src/ by hand)
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${IOREGTRACE_CACHE:-/var/cache/ioregtrace}
. "$HERE/source.env"

started=$(date +%s)
log() {
	t=$(($(date +%s) - started))
	printf 'qemu: [%d:%02d] %s\n' $((t / 60)) $((t % 60)) "$*" >&2
}

# The same flags whoever starts the build (a parent make's MAKEFLAGS would
# reach ninja's children otherwise).
qenv() {
	env -i PATH="$PATH" LC_ALL=C HOME="${HOME:-/root}" \
		CCACHE_DIR="$CACHE/ccache" CCACHE_NOHASHDIR=1 CCACHE_BASEDIR="$out" "$@"
}

# What the tests need and nothing else: the PC machine's default devices,
# KVM (the test VM has SVM), the log trace backend (the NVMe counters are
# trace events), no TCG, no UI, no optional libraries.  Firmware comes from
# Debian's packages, where Debian's own QEMU looks for it.
CONFIGURE="--target-list=x86_64-softmmu --without-default-features --enable-kvm
--disable-tcg --disable-docs --disable-werror --disable-install-blobs
--enable-trace-backends=log --enable-fdt=system --meson=meson
--firmwarepath=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu"

patches=$(ls "$HERE"/patches/*.patch 2>/dev/null | grep -v '/0000-' || true)
# shellcheck disable=SC2086  # one word per patch
key=$( (echo "$DEBIAN_VERSION $CONFIGURE"; cat "$HERE/build.sh" $patches) |
	sha256sum | cut -c1-16)
out=$CACHE/qemu/$key

if [ -x "$out/qemu-system-x86_64" ] && [ -f "$out/.complete" ] && [ "${1:-}" != --rebuild ]; then
	log "cached: $out"
	echo "$out"
	exit 0
fi
log "building $out (QEMU $DEBIAN_VERSION with qemu/patches; ~20 minutes on 2 cores the first time)"

for tool in meson ninja pkg-config; do
	command -v $tool >/dev/null || { echo "qemu: $tool is missing (make setup)" >&2; exit 1; }
done

# Fetches one file of the source package into the download cache and checks
# it against the pinned sha256.
fetch() {
	file=$1
	sum=$2
	mkdir -p "$CACHE/src"
	if [ ! -f "$CACHE/src/$file" ]; then
		log "downloading $file"
		for base in http://deb.debian.org/debian/pool/main/q/qemu \
			"https://snapshot.debian.org/archive/debian/20250520T000000Z/pool/main/q/qemu"; do
			curl -sfL -o "$CACHE/src/$file.part" "$base/$file" && break
		done
		[ -f "$CACHE/src/$file.part" ] || { echo "qemu: cannot download $file" >&2; exit 1; }
		mv "$CACHE/src/$file.part" "$CACHE/src/$file"
	fi
	echo "$sum  $CACHE/src/$file" | sha256sum -c --quiet - >&2 ||
		{ echo "qemu: $file does not match its pinned sha256" >&2; exit 1; }
}

if [ ! -d "$out/src" ]; then
	upstream=${DEBIAN_VERSION%-*}
	fetch "qemu_$upstream.orig.tar.xz" "$ORIG_SHA256"
	fetch "qemu_$DEBIAN_VERSION.debian.tar.xz" "$DEBIAN_SHA256"
	rm -rf "$out.tmp"
	mkdir -p "$out.tmp"
	log "unpacking"
	tar -xJf "$CACHE/src/qemu_$upstream.orig.tar.xz" -C "$out.tmp"
	mv "$out.tmp"/qemu-* "$out.tmp/src"
	tar -xJf "$CACHE/src/qemu_$DEBIAN_VERSION.debian.tar.xz" -C "$out.tmp/src"
	log "applying Debian's patches"
	grep -v '^#' "$out.tmp/src/debian/patches/series" | while read -r p _; do
		[ -n "$p" ] || continue
		patch -d "$out.tmp/src" -p1 -s --no-backup-if-mismatch <"$out.tmp/src/debian/patches/$p"
	done
	for p in $patches; do
		log "applying $(basename "$p")"
		patch -d "$out.tmp/src" -p1 -s --no-backup-if-mismatch <"$p"
	done
	mv "$out.tmp" "$out"
fi

rm -f "$out/.complete"
if [ ! -f "$out/build/build.ninja" ]; then
	log "configuring"
	mkdir -p "$out/build"
	# shellcheck disable=SC2086  # one word per option
	(cd "$out/build" && qenv ../src/configure $CONFIGURE >configure.log 2>&1) ||
		{ tail -n 20 "$out/build/configure.log" >&2; echo "qemu: configure failed" >&2; exit 1; }
fi
log "building with $(nproc) jobs"
qenv ninja -C "$out/build" -j"$(nproc)" qemu-system-x86_64 >"$out/build/ninja.log" 2>&1 ||
	{ grep -B2 -A12 'error' "$out/build/ninja.log" | head -n 40 >&2; echo "qemu: build failed" >&2; exit 1; }
cp "$out/build/qemu-system-x86_64" "$out/qemu-system-x86_64"
touch "$out/.complete"
log "done: $out"
echo "$out"
