"""Kernel headers for BCC's compile.

BCC looks for /lib/modules/$(uname -r)/build.  Kernels without a headers
package (custom builds, cloud images) have none; ioregtrace's program only
uses tracepoints and raw tracepoint arguments, so any recent x86 header tree
compiles it.  Debian splits a tree in two packages (-common and -amd64); BCC
needs them merged into one directory, which is built here from symlinks and
cached under /var/cache/ioregtrace, keyed by the package's version.
"""

import os
import platform
import re
import shutil
import tempfile

CACHE_DIR = os.environ.get("IOREGTRACE_CACHE", "/var/cache/ioregtrace")
SRC_DIR = "/usr/src"
STAMP = ".ioregtrace-merged"


def _version_key(name):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def installed_debian_pairs(src_dir=SRC_DIR):
    """(flavour_dir, common_dir) for each Debian header package pair, newest
    first.  linux-headers-6.12.117+deb12-amd64 pairs with ...-common."""
    try:
        names = os.listdir(src_dir)
    except OSError:
        return []
    pairs = []
    for name in names:
        m = re.fullmatch(r"linux-headers-(.+)-(amd64|cloud-amd64)", name)
        if not m:
            continue
        common = f"linux-headers-{m.group(1)}-common"
        if common in names:
            pairs.append((os.path.join(src_dir, name), os.path.join(src_dir, common)))
    pairs.sort(key=lambda p: _version_key(os.path.basename(p[0])), reverse=True)
    return pairs


def _link_tree(src, dst):
    """cp -rs src/. dst/, replacing what is there: every file (and every
    symlink, resolved) becomes an absolute symlink."""
    for root, dirs, files in os.walk(src):
        rel = os.path.relpath(root, src)
        out = os.path.join(dst, rel) if rel != "." else dst
        os.makedirs(out, exist_ok=True)
        linked_dirs = [d for d in dirs if os.path.islink(os.path.join(root, d))]
        for name in files + linked_dirs:
            target = os.path.realpath(os.path.join(root, name))
            link = os.path.join(out, name)
            if os.path.islink(link) or os.path.isfile(link):
                os.unlink(link)
            elif os.path.isdir(link):
                shutil.rmtree(link)
            os.symlink(target, link)
        dirs[:] = [d for d in dirs if d not in linked_dirs]


def _readable_by_all(dest):
    """Public headers, for every user BCC runs as: a tree merged 0700 (by an
    older version) is opened up by whoever owns it."""
    st = os.stat(dest)
    if st.st_mode & 0o055 != 0o055 and st.st_uid == os.getuid():
        os.chmod(dest, 0o755)


def merged_tree(flavour_dir, common_dir, cache_dir=CACHE_DIR):
    """The merged tree for one package pair, built once.  Built in a
    temporary directory and renamed, so a half-built tree is never used."""
    dest = os.path.join(cache_dir, "kernel-headers", os.path.basename(flavour_dir))
    if os.path.exists(os.path.join(dest, STAMP)):
        _readable_by_all(dest)
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".build-", dir=os.path.dirname(dest))
    try:
        _link_tree(common_dir, tmp)
        _link_tree(flavour_dir, tmp)
        with open(os.path.join(tmp, STAMP), "w") as f:
            f.write(f"{common_dir}\n{flavour_dir}\n")
        # mkdtemp makes it 0700: public headers, for every user BCC runs as
        os.chmod(tmp, 0o755)
        if os.path.exists(dest):
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def running_build_dir():
    path = f"/lib/modules/{platform.release()}/build"
    return path if os.path.isdir(os.path.join(path, "include")) else None


def find(build=True):
    """Where BCC should take headers from: (path, how) or (None, why not).

    Order: an explicit BCC_KERNEL_SOURCE, the running kernel's own build
    tree, then the newest Debian package pair (merged, when `build`)."""
    explicit = os.environ.get("BCC_KERNEL_SOURCE")
    if explicit:
        if os.path.isdir(os.path.join(explicit, "include")):
            return explicit, "BCC_KERNEL_SOURCE"
        return None, f"BCC_KERNEL_SOURCE={explicit} has no include/ directory"
    own = running_build_dir()
    if own:
        return own, "running kernel's build tree"
    pairs = installed_debian_pairs()
    if not pairs:
        return None, (f"no headers for {platform.release()} and no linux-headers-*-amd64 "
                      "package in /usr/src")
    flavour, common = pairs[0]
    dest = os.path.join(CACHE_DIR, "kernel-headers", os.path.basename(flavour))
    if os.path.exists(os.path.join(dest, STAMP)):
        _readable_by_all(dest)
        return dest, f"merged from {os.path.basename(flavour)}"
    if os.path.isdir(dest) and not os.access(dest, os.R_OK | os.X_OK):
        return None, (f"merged in {dest}, but uid {os.getuid()} cannot read it "
                      f"(chmod 0755 {dest}, or run as root)")
    if not build:
        return None, f"{os.path.basename(flavour)} is installed but not merged yet"
    return merged_tree(flavour, common), f"merged from {os.path.basename(flavour)}"


def newest_debian_package():
    """The newest linux-headers-6.12.*-amd64 apt knows, for `doctor --fix`."""
    import subprocess
    try:
        out = subprocess.run(["apt-cache", "search", "--names-only",
                              r"^linux-headers-6\.12\..*-amd64$"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    names = [line.split()[0] for line in out.splitlines()
             if line and "-cloud-" not in line and "-rt-" not in line]
    names.sort(key=_version_key)
    return names[-1] if names else None
