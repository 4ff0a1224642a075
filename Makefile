# Two entry points, both self-contained on a fresh machine:
#   make demo   -- the main job (train a small GPT-2, convert to AgencyGPT2, prune, compare, reload, generate)
#   make test   -- lint, then the test suite on both supported stacks
#
# Two virtualenvs, each created or refreshed when pyproject.toml changes:
#   .venv      the newest transformers 5.x / huggingface_hub the ranges admit; ONNX through torch.onnx (the demo
#              runs here)
#   .venv-457  transformers 4.57.x with optimum-onnx 0.1.0 (its latest release, which needs transformers < 4.58):
#              ONNX through optimum, and the torch.onnx path tested against it
# torch is installed first in each, so the CPU wheel is used.
PYTHON   ?= python3
VENV     ?= .venv
VENV_457 ?= .venv-457
PY       := $(VENV)/bin/python
PY_457   := $(VENV_457)/bin/python
PYTEST   := -m pytest -n 2 --dist loadfile tests

.PHONY: demo test test-newest test-457 bench gpu-check venv clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(PY_457):
	$(PYTHON) -m venv $(VENV_457)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --upgrade -e ".[dev,bench,onnx]"
	touch $@

$(VENV_457)/.installed: pyproject.toml | $(PY_457)
	$(PY_457) -m pip install -q --upgrade pip
	$(PY_457) -m pip install -q torch==2.13.0
	$(PY_457) -m pip install -q --upgrade -e ".[dev,bench,optimum]" "transformers==4.57.*"
	touch $@

venv: $(VENV)/.installed $(VENV_457)/.installed

demo: $(VENV)/.installed
	$(PY) examples/demo.py

test: test-newest test-457

test-newest: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -c "import transformers, huggingface_hub; print('stack: transformers', transformers.__version__, \
	'huggingface_hub', huggingface_hub.__version__)"
	$(PY) $(PYTEST)

test-457: $(VENV_457)/.installed
	$(PY_457) -c "import transformers, huggingface_hub; print('stack: transformers', transformers.__version__, \
	'huggingface_hub', huggingface_hub.__version__)"
	$(PY_457) $(PYTEST)

bench: $(VENV)/.installed
	$(PY) benchmarks/agency_speed.py

# On a machine with a CUDA GPU (not part of `make test`): the device checks on CUDA (half precision, SDPA vs eager,
# cached vs recomputed decoding, samplers, a Trainer run) and the three speed benchmarks on the GPU, written to
# outputs/gpu-check/. Everything else of armada runs on whatever device the model or a --device flag names.
GPU_OUT ?= outputs/gpu-check
gpu-check: $(VENV)/.installed
	$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: no CUDA device here')"
	$(PY) -c "import torch; print('gpu:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
	$(PY) -m pytest -q tests/models/test_devices.py -k cuda
	$(PY) benchmarks/agency_speed.py --device cuda --out $(GPU_OUT)/agency_speed --overwrite
	$(PY) benchmarks/diffusion.py --device cuda --out $(GPU_OUT)/diffusion --overwrite
	$(PY) benchmarks/armt_scaling.py --device cuda --out $(GPU_OUT)/armt_scaling --overwrite

clean:
	rm -rf $(VENV) $(VENV_457) build *.egg-info
