# Two commands do all the setup on a fresh machine:
#   make demo   install, then the whole library on embedded digits data, stage by stage (spec, zoo, predict,
#               align, generate, optimize, edit), with a report in unf_demo/ (report.html, report.md, results.json)
#   make test   install, then run the test suite
PYTHON ?= python

.PHONY: install demo test bench

install:
	$(PYTHON) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PYTHON) -m pip install -q -e ".[test]" -e plugins/unf-torch-transformer -e plugins/unf-torchvision -e plugins/unf-transformers -e plugins/unf-timm

demo: install
	unf demo --out unf_demo

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) benchmarks/spec_inference.py
