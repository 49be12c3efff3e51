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

test: $(STAMP)
	$(PY) -m pytest --durations=15

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
