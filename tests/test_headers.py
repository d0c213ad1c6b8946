import os

from ioregtrace import headers


def make_tree(root, files, links=()):
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    for rel, target in links:
        os.symlink(target, os.path.join(root, rel))


def test_pairs_newest_first(tmp_path):
    for name in ("linux-headers-6.12.9+deb12-amd64", "linux-headers-6.12.9+deb12-common",
                 "linux-headers-6.12.41+deb12-amd64", "linux-headers-6.12.41+deb12-common",
                 "linux-headers-6.12.50+deb12-amd64"):          # no -common: unusable
        (tmp_path / name).mkdir()
    pairs = headers.installed_debian_pairs(str(tmp_path))
    assert [os.path.basename(f) for f, _ in pairs] == [
        "linux-headers-6.12.41+deb12-amd64", "linux-headers-6.12.9+deb12-amd64"]
    assert pairs[0][1].endswith("linux-headers-6.12.41+deb12-common")


def test_merge_flavour_over_common(tmp_path):
    common, flavour = tmp_path / "common", tmp_path / "amd64"
    elsewhere = tmp_path / "kbuild"
    make_tree(str(elsewhere), {"scripts/x.sh": "kbuild"})
    make_tree(str(common), {"include/linux/a.h": "common a", "include/linux/b.h": "common b",
                            "arch/x86/include/asm/c.h": "common c"},
              links=[("scripts", str(tmp_path / "nowhere"))])
    make_tree(str(flavour), {"include/linux/b.h": "flavour b",
                             "include/generated/autoconf.h": "generated"},
              links=[("scripts", str(elsewhere / "scripts"))])
    dest = headers.merged_tree(str(flavour), str(common), cache_dir=str(tmp_path / "cache"))
    read = lambda rel: open(os.path.join(dest, rel)).read()   # noqa: E731
    assert read("include/linux/a.h") == "common a"
    assert read("include/linux/b.h") == "flavour b"
    assert read("include/generated/autoconf.h") == "generated"
    assert read("arch/x86/include/asm/c.h") == "common c"
    assert read("scripts/x.sh") == "kbuild"
    assert os.path.exists(os.path.join(dest, headers.STAMP))
    # Built once: a second call reuses it.
    mtime = os.stat(os.path.join(dest, headers.STAMP)).st_mtime_ns
    assert headers.merged_tree(str(flavour), str(common),
                               cache_dir=str(tmp_path / "cache")) == dest
    assert os.stat(os.path.join(dest, headers.STAMP)).st_mtime_ns == mtime


def test_explicit_source_must_have_includes(tmp_path, monkeypatch):
    monkeypatch.setenv("BCC_KERNEL_SOURCE", str(tmp_path))
    path, why = headers.find()
    assert path is None and "has no include/" in why
    (tmp_path / "include").mkdir()
    assert headers.find()[0] == str(tmp_path)
