# Two commands on a fresh machine: `make demo` (the embedded default run) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ddkit-installed
BENCH_STAMP := $(VENV)/.ddkit-bench-installed
# torch pinned to the build this machine carries (a CUDA build that also runs on the CPU).
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml integrations/ddkit-ultralytics/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	# the YOLO plugin (Ultralytics, AGPL-3.0) is a separate distribution; torch stays pinned
	$(PY) -m pip install -q --disable-pip-version-check -e integrations/ddkit-ultralytics $(TORCH)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ddkit run configs/mnist_dd.yaml

# the tests in TEST_WORKERS processes (pytest-xdist; a test file's tests stay in one process, in order), each with
# one thread: this machine's 2 cores. TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: $(STAMP)
	$(PYTEST)
	YOLO_OFFLINE=1 $(PYTEST) integrations/ddkit-ultralytics/tests

# the peers the benchmarks' tables compare with (ensemble_boxes, torchdistill), installed once; torch stays pinned
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[bench]" $(TORCH)
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) benchmarks/aggregators.py && $(PY) benchmarks/label_throughput.py && $(PY) benchmarks/kd_throughput.py \
		&& $(PY) benchmarks/optimizer_step.py

clean:
	rm -rf $(VENV) runs .pytest_cache
