# The two commands a fresh machine needs (see README):
#   make serve   installs everything, then runs the main job
#   make test    installs everything, then runs the test suite
.PHONY: setup serve demo test bench clean

setup:
	./scripts/setup.sh

serve: setup
	.venv/bin/hlpool serve --workers 2

demo: setup
	.venv/bin/hlpool demo

test: setup
	.venv/bin/python -m pytest -q

# make bench: every benchmark in full mode (several minutes), then the plots;
# make bench QUICK=1: every benchmark in --quick mode (each under a minute).
# Results: bench/results/*.json and *.png (see bench/README.md).
# Quick runs write to bench/results/quick (ignored by git) so they never replace the full
# results the README quotes.
BENCH_FLAGS = $(if $(QUICK),--quick,)
BENCH_ENV = $(if $(QUICK),HLPOOL_BENCH_RESULTS=bench/results/quick,)
bench: setup
	.venv/bin/python -c 'import wasmtime, matplotlib' 2>/dev/null || .venv/bin/python -m pip install -q 'wasmtime>=20' 'matplotlib>=3.7'
	$(BENCH_ENV) .venv/bin/python bench/floor.py $(BENCH_FLAGS)
	$(BENCH_ENV) .venv/bin/python bench/latency.py $(BENCH_FLAGS)
	$(BENCH_ENV) .venv/bin/python bench/creation.py $(BENCH_FLAGS)
	$(BENCH_ENV) .venv/bin/python bench/restore.py $(BENCH_FLAGS)
	$(BENCH_ENV) .venv/bin/python bench/throughput.py $(BENCH_FLAGS)
	$(BENCH_ENV) .venv/bin/python bench/routing.py $(BENCH_FLAGS)
	$(BENCH_ENV) .venv/bin/python bench/density.py $(BENCH_FLAGS)
	$(BENCH_ENV) .venv/bin/python bench/native_speed.py $(BENCH_FLAGS)
	$(BENCH_ENV) .venv/bin/python bench/switch.py $(BENCH_FLAGS)
	$(BENCH_ENV) .venv/bin/python bench/tenants.py $(BENCH_FLAGS)
	$(BENCH_ENV) .venv/bin/python bench/http_throughput.py $(BENCH_FLAGS)
	$(BENCH_ENV) .venv/bin/python bench/ray.py $(BENCH_FLAGS)
	$(BENCH_ENV) .venv/bin/python bench/plot.py

clean:
	rm -rf build .venv hlpool/*.so hlpool/*/*.so hlpool/_mapping.c hlpool/kvm/_vcpu_run.c hlpool/guest/_msgcheck.c hlpool/memory/_dirty.c hlpool/pool/_slots.c hlpool/snapshot/_capture.c *.egg-info
