# Two commands do all the set-up on a fresh machine:
#   make demo   boot the bundled demo guest
#   make test   run the test suite
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench guests clean

$(STAMP): pyproject.toml setup.py vmm_packaging.py vmm/cpu/native_build.py $(wildcard vmm/cpu/native/*)
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "unicorn==2.1.4" "cffi>=1.16" "setuptools>=68" wheel
	$(VENV)/bin/pip install -q --no-build-isolation -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vmm run

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -n 2

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/run_all.py

guests:
	$(PY) guests/build.py

clean:
	rm -rf $(VENV) build vmm/cpu/_native*.so *.egg-info
