# ioregtrace: `make demo` and `make test` are all a fresh machine needs.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test unit bench kernel qemu vmtest e2e clean

setup:
	@scripts/setup.sh

# The main job on the built-in demo VM: trace it and print the table.
demo: setup
	$(BIN)/ioregtrace stat -- $(BIN)/ioregtrace demo

# Unit and integration tests.  Integration tests fail (never skip) here
# when the machine lacks what they need.
test: setup
	IOREGTRACE_REQUIRE_INTEGRATION=1 $(BIN)/python -m pytest -v tests

unit: setup
	$(BIN)/python -m pytest -v -m "not integration" tests

# What tracing costs, side by side with its peers (bench/RESULTS.md).
# BENCH_ARGS=--quick for a short run, --soak MINUTES for the soak.
bench: setup
	$(BIN)/python bench/run.py $(BENCH_ARGS)
	$(BIN)/python bench/exit_cost.py

# Linux 6.12 with the ioregionfd series (kernel/patches), and its selftest;
# built once per machine, cached in /var/cache/ioregtrace/kernel/.
kernel: setup
	kernel/build.sh

# Debian's QEMU 7.2 with qemu/patches (NVMe in an IOThread over
# ioregionfd), x86_64 with KVM only; cached in /var/cache/ioregtrace/qemu/.
qemu: setup
	qemu/build.sh

# Boot it under QEMU TCG (nested KVM) and run the selftests and ioregtrace
# there (also part of `make test`).
vmtest: setup
	IOREGTRACE_REQUIRE_INTEGRATION=1 $(BIN)/python -m pytest -v tests/test_vm.py tests/test_vm_exits.py

# A Linux guest under QEMU/KVM inside the test VM, on NVMe, virtio-blk,
# virtio-net, e1000 and VGA, each workload traced by ioregtrace and checked
# against QEMU's own trace (e2e/; boot and NVMe are also in `make test`).
e2e: setup
	$(BIN)/python e2e/host.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
