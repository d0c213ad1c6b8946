from ioregtrace.keys import AccessKey, Op, Path, Space, bpf_defines


def test_bpf_defines_cover_every_member_once():
    flags = bpf_defines()
    assert len(flags) == len(Space) + len(Op) + len(Path)
    assert "-DPATH_USERSPACE=4" in flags and "-DSPACE_PIO=1" in flags
    assert "-DOP_WRITE=1" in flags and "-DPATH_UNATTRIBUTED=0" in flags


def test_names_and_labels():
    k = AccessKey(1, Space.MMIO, 0xFEBF0000, 4, Op.WRITE, Path.USERSPACE)
    assert k.short() == "0xfebf0000:4:W"
    assert AccessKey(1, Space.PIO, 0x60, 1, Op.READ, Path.KERNEL).short() == "0x60:1:R"
    assert str(Path.IOEVENTFD) == "ioeventfd" and Path.parse("Coalesced") is Path.COALESCED
