# The two commands of the README: `make demo` (install + the main job on the embedded default, CPU, offline)
# and `make test` (install + the test suite).
PYTHON ?= python
DEMO ?= demo
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test

install:
	$(PYTHON) -m pip install -c constraints.txt -e '.[test]'

demo: install
	$(PYTHON) -m drpruning_composer.demo --out $(DEMO)

test: install
	$(PYTHON) -m pytest tests -q -p no:cacheprovider
