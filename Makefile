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

bench: setup
	.venv/bin/python bench/latency.py
	.venv/bin/python bench/native_speed.py

clean:
	rm -rf build .venv hlpool/*.so hlpool/_mapping.c hlpool/_vcpu_run.c *.egg-info
