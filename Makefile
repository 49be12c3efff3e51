# fastload: `make demo` and `make test` set everything up on first use (scripts/setup.sh).
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.fastload-setup-done

.PHONY: setup demo test wheel bench bench-augment train-cifar clean

setup: $(STAMP)

$(STAMP): scripts/setup.sh pyproject.toml constraints.txt pipelines/_native.c pipelines/_jpeg.c pipelines/_samples.c pipelines/_resample.c
	bash scripts/setup.sh

demo: $(STAMP)
	$(VENV)/bin/fastload demo

# two parts: the suite on JOBS processes (a test file to a process: its module fixtures built
# once), then the tests that measure the machine's cores or time, alone; both always run
JOBS ?= 2
test: $(STAMP)
	@rc=0; $(PY) -m pytest -n $(JOBS) --dist loadfile -m "not serial" --durations=15 || rc=1; \
	$(PY) -m pytest -m serial --durations=5 || rc=1; exit $$rc

# the binary wheel, libjpeg-turbo inside (auditwheel), in wheelhouse/
wheel: $(STAMP)
	PY=$(PY) bash scripts/build_wheel.sh wheelhouse

bench: $(STAMP)
	$(PY) scripts/bench_peers.py

bench-augment: $(STAMP)
	$(PY) scripts/bench_augment.py

train-cifar: $(STAMP)
	$(PY) scripts/train_cifar.py

clean:
	rm -rf $(VENV) .cache demo-out .pytest_cache build wheelhouse
