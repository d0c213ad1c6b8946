# ioregtrace: `make demo` and `make test` are all a fresh machine needs.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test unit bench clean

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

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
