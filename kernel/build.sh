#!/bin/sh
# make kernel: Debian's linux-source-6.12 (version pinned in source.env) with
# the ioregionfd series in patches/, a small config (tinyconfig +
# config.fragment), bzImage and the KVM selftests the test VM runs.
#
# The build lives outside the checkout, keyed by everything it is made of,
# so a second run (or a second clone on this machine) finds it done:
#   $IOREGTRACE_CACHE/kernel/<key>/{bzImage,ioregionfd_test,selftests/,src/}
# Prints that directory on the last line of stdout; progress, with the time
# since the start, goes to stderr.
#
#   kernel/build.sh [--rebuild]      --rebuild: rebuild the cached tree in place
#                                    (after editing src/ by hand)
#   kernel/build.sh --selftests-into DIR
#                                    build only the selftests, from the cached
#                                    tree, into DIR (the cached ones untouched)
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${IOREGTRACE_CACHE:-/var/cache/ioregtrace}
. "$HERE/source.env"

# The selftests built next to bzImage (paths under tools/testing/selftests/kvm):
# ours, and the upstream ones that exercise userspace MMIO/PIO exits, the
# emulator's MMIO, vCPU state saved around exits and the io bus, run in the
# test VM to show the series changes nothing they check (tests/test_vm.py
# reads this list).  Left out: debug_regs (fails in the test VM: a guest #BP
# goes unhandled), smaller_maxphyaddr_emulation_test (skips there) and
# state_test (a guest #UD in 1 run of 23 there, under TCG's nested SVM).
SELFTESTS="x86_64/ioregionfd_test x86_64/userspace_io_test x86_64/sync_regs_test
x86_64/userspace_msr_exit_test set_memory_region_test coalesced_io_test
x86_64/exit_on_emulation_failure_test x86_64/smm_test
x86_64/set_sregs_test x86_64/platform_info_test x86_64/xapic_state_test
x86_64/fix_hypercall_test x86_64/svm_nested_shutdown_test
x86_64/triple_fault_event_test kvm_binary_stats_test guest_print_test"

started=$(date +%s)
log() {
	t=$(($(date +%s) - started))
	printf 'kernel: [%d:%02d] %s\n' $((t / 60)) $((t % 60)) "$*" >&2
}

# Every make runs in an environment of this script's own, so the build does
# not depend on how it was started.  A parent make exports MAKELEVEL,
# MAKEFLAGS and MFLAGS: tools/testing/selftests/lib.mk sets OUTPUT only at
# MAKELEVEL 0, and without OUTPUT the selftest targets below match none of
# its rules (make then links them with its builtin rule, and fails).  O,
# ARCH, CC, CFLAGS, OUTPUT, LLVM and the like change what kbuild and the
# selftests build.
CCACHE_DIR=$CACHE/ccache
kmake() {
	env -i PATH="$PATH" LC_ALL=C HOME="${HOME:-/root}" \
		CCACHE_DIR="$CCACHE_DIR" CCACHE_NOHASHDIR=1 CCACHE_BASEDIR="$out" \
		make "$@"
}

# Runs a long make ("$1" names it for the log) and logs, every minute, that
# it still runs and how many objects it has built: the first bzImage takes
# ~15 minutes on 2 cores.
with_heartbeat() {
	what=$1
	shift
	touch "$out/.stage"
	(
		trap 'kill $nap 2>/dev/null; exit 0' TERM
		while :; do
			sleep 60 &
			nap=$!
			wait $nap
			log "$what: $(find "$out" -name '*.o' -newer "$out/.stage" | wc -l) objects built so far"
		done
	) >&2 &
	beat=$!
	if "$@"; then rc=0; else rc=$?; fi
	kill $beat 2>/dev/null || true
	wait $beat 2>/dev/null || true
	return $rc
}

# The selftests of the tree in the current directory, into $1 (their
# OUTPUT: object files and binaries).
build_selftests() {
	dest=$1
	targets=
	for t in $SELFTESTS; do
		targets="$targets $dest/$t"
	done
	log "building the selftests into $dest"
	# shellcheck disable=SC2086  # one word per target
	kmake -s -C tools/testing/selftests/kvm -j"$jobs" CC="$cc" OUTPUT="$dest" $targets >&2
}

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

# The patches that are applied (not the cover letter, 0000-*) and everything
# else the build is made of.
patches=$(ls "$HERE"/patches/*.patch | grep -v '/0000-')
# shellcheck disable=SC2086  # one word per patch
key=$( (echo "$version"; cat "$HERE/config.fragment" "$HERE/build.sh" $patches) |
	sha256sum | cut -c1-16)
out=$CACHE/kernel/$key

jobs=$(nproc)
cc=gcc
command -v ccache >/dev/null && cc="ccache gcc"

if [ "${1:-}" = --selftests-into ]; then
	[ $# = 2 ] || { echo "usage: kernel/build.sh --selftests-into DIR" >&2; exit 2; }
	[ -d "$out/src" ] || { echo "kernel: no cached tree at $out (run kernel/build.sh)" >&2; exit 1; }
	mkdir -p "$2"
	dest=$(cd "$2" && pwd)
	cd "$out/src"
	build_selftests "$dest"
	exit 0
fi

if [ -f "$out/bzImage" ] && [ -f "$out/.complete" ] && [ "${1:-}" != --rebuild ]; then
	log "cached: $out"
	echo "$out"
	exit 0
fi
log "building $out (Linux $version with kernel/patches; 8-15 minutes on 2 cores the first time)"

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
	for p in $patches; do
		log "applying $(basename "$p")"
		patch -d "$out.tmp/src" -p1 -s --no-backup-if-mismatch <"$p"
	done
	log "configuring (tinyconfig + kernel/config.fragment)"
	(
		cd "$out.tmp/src"
		out=$out.tmp
		kmake -s tinyconfig >&2
		env -i PATH="$PATH" scripts/kconfig/merge_config.sh -m .config "$HERE/config.fragment" >/dev/null
		kmake -s olddefconfig >&2
		# every option asked for must have survived the dependency checks
		grep '^CONFIG_' "$HERE/config.fragment" | while read -r opt; do
			grep -qx "$opt" .config || { echo "kernel: config lost $opt" >&2; exit 1; }
		done
	)
	mv "$out.tmp" "$out"
fi

cd "$out/src"
rm -f "$out/.complete"
log "building bzImage with $jobs jobs (CC=$cc)"
with_heartbeat bzImage kmake -s -j"$jobs" CC="$cc" bzImage >&2
cp arch/x86/boot/bzImage "$out/bzImage"

log "installing the uapi headers the selftests use"
kmake -s headers >&2
mkdir -p "$out/selftests"
with_heartbeat selftests build_selftests "$out/selftests"
cp "$out/selftests/x86_64/ioregionfd_test" "$out/ioregionfd_test"
touch "$out/.complete"
log "done: $out"
echo "$out"
