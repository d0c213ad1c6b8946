"""The VM test's answer to a guest that stalls whole (kernel/NOTES.md,
"The test VM's rare stall"): stop it, boot once more, warn.  vm.run is
replaced here; nothing boots."""

import types

import pytest

import test_vm
from test_vm import guest  # noqa: F401  (the fixture under test)

boots, warned = [], []


@pytest.fixture(autouse=True, scope="module")
def stalls_once():
    def run(script, **kw):
        boots.append(kw["timeout"])
        if len(boots) == 1:
            raise test_vm.vm.VmTimeout("VM did not finish; console tail:\n(quiet)")
        return 0, "console of the second boot"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(test_vm, "_problem", lambda: None)
        mp.setattr(test_vm.vm, "build_kernel", lambda: "/no/kernel")
        mp.setattr(test_vm, "_build_conformance",
                   lambda kdir, directory: {name: f"/no/{name}"
                                            for name in test_vm.CONFORMANCE_SOURCES})
        mp.setattr(test_vm.vm, "run", run)
        mp.setattr(test_vm, "warnings",
                   types.SimpleNamespace(warn=lambda message, **kw: warned.append(message)))
        yield


def test_a_stalled_guest_is_booted_once_more(guest):  # noqa: F811
    assert boots == [test_vm.VM_TIMEOUT_S] * 2
    assert (guest / "console.log").read_text() == "console of the second boot"
    assert len(warned) == 1 and "stalled and was booted again" in warned[0]
