# brainprobe — the two commands a newcomer needs: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO ?= demo
DEMO_DIR ?= outputs/$(DEMO)/$(shell date +%Y%m%d-%H%M%S)

export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: setup demo test test-all clean-data

setup: $(STAMP)

# Idempotent: re-installs only when pyproject.toml or the lock change.
$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c requirements.lock -e ".[test]"
	@touch $(STAMP)

# DEMO=demo (NSD layout), demo_nod or demo_video: the synthetic dataset in that layout.
demo: setup
ifeq ($(DEMO),demo)
	$(PY) -m datamodules.synthetic --out data/synthetic_nsd --if-missing
endif
	$(PY) train.py -m experiment=$(DEMO) backbone=tiny,alexnet head=linear,ridge hydra.sweep.dir=$(DEMO_DIR)
	$(PY) analyze.py analysis=summary sweep_dir=$(DEMO_DIR)

test: setup
	$(PY) -m pytest -q -m "not slow and not gpu"

test-all: setup
	$(PY) -m pytest -q

clean-data:
	rm -rf data/synthetic_nsd
