# Two commands do all the setup on a fresh machine:
#   make demo   install, then infer and print the symmetry spec of a bundled ResNet-20
#   make test   install, then run the test suite
PYTHON ?= python

.PHONY: install demo test bench

install:
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[test]" -e plugins/unf-torch-transformer

demo: install
	unf spec examples/models.py:resnet20 --input-shape 1,3,32,32

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) benchmarks/spec_inference.py
