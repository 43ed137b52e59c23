# natgrad: `make test` and `make demo` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned so pip takes the local CPU build instead of a multi-GB CUDA one.
TORCH := torch==2.13.0

.PHONY: test lint demo bench-fisher bench-step bench-prong bench-distributed bench-autoencoder \
	bench-lm bench-defaults clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH) -e '.[dev]'
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks

# Benchmarks run in their own environment with the peers (NNGeometry without its deps: it
# would pull torchvision and a CUDA torch). Results: benchmarks/RESULTS.md.
BENCH := .venv-bench
$(BENCH)/.installed: pyproject.toml
	test -x $(BENCH)/bin/python || $(PYTHON) -m venv $(BENCH)
	$(BENCH)/bin/pip install --quiet $(TORCH) numpy curvlinops-for-pytorch asdfghjkl -e '.[cli]'
	$(BENCH)/bin/pip install --quiet --no-deps nngeometry
	touch $@

bench-fisher: $(BENCH)/.installed
	$(BENCH)/bin/python benchmarks/fisher_peers.py --write benchmarks/RESULTS.md
	$(BENCH)/bin/python benchmarks/fisher_batches.py --write benchmarks/RESULTS.md

bench-step: $(BENCH)/.installed
	$(BENCH)/bin/python benchmarks/step_cost.py --write benchmarks/RESULTS.md
	$(BENCH)/bin/python benchmarks/step_small.py --write benchmarks/RESULTS.md
	$(BENCH)/bin/python benchmarks/kfac_memory.py --write benchmarks/RESULTS.md

bench-prong: $(BENCH)/.installed
	$(BENCH)/bin/python benchmarks/prong_autoencoder.py --write benchmarks/RESULTS.md
	$(BENCH)/bin/python benchmarks/prong_autoencoder.py --rank 0.0625 --no-profile \
		--write benchmarks/RESULTS.md

bench-distributed: $(BENCH)/.installed
	$(BENCH)/bin/python benchmarks/distributed.py --write benchmarks/RESULTS.md

# The flagship experiment: Fashion-MNIST deep autoencoder, K-FAC against SGD with momentum and
# Adam (each tuned on a small grid). Needs the IDX files: apt-get install dataset-fashion-mnist
# (or FASHION_DIR=folder). About 16 min on 2 cores; runs land in runs/bench-autoencoder/.
FASHION_DIR ?= /usr/share/datasets/fashion-mnist
bench-autoencoder: $(BENCH)/.installed
	rm -rf runs/bench-autoencoder
	$(BENCH)/bin/python benchmarks/autoencoder.py --data-dir $(FASHION_DIR) \
		--write benchmarks/RESULTS.md

# GPT-style byte-level language model on the standard library's top-level .py files (issue 13):
# AdamW at 3 learning rates against K-FAC and EK-FAC (as optimizers, and as preconditioners
# under AdamW), 20 min of training per method (about 2.5 h on 2 cores with evaluations);
# BENCH_LM_ARGS="--minutes 1" for a smoke run. Section and plot (lm.png) in benchmarks/.
BENCH_LM_ARGS ?=
bench-lm: $(BENCH)/.installed
	$(BENCH)/bin/python benchmarks/lm.py $(BENCH_LM_ARGS) --write benchmarks/RESULTS.md

# KFAC(model) and EKFAC(model) with no hyperparameter against AdamW (default and tuned lr) on
# six tasks (digits MLP and CNN, Fashion-MNIST autoencoder at batch 1000, CNN and ResNet-8, the
# issue-13 language model shortened), same initialisation and batches, methods in lockstep
# (issue 14); about 45 min on 2 cores. Section and plot (defaults.png) in benchmarks/.
BENCH_DEFAULTS_ARGS ?=
bench-defaults: $(BENCH)/.installed
	$(BENCH)/bin/python benchmarks/defaults.py $(BENCH_DEFAULTS_ARGS) --write benchmarks/RESULTS.md
	$(BENCH)/bin/python benchmarks/small_batches.py --write benchmarks/RESULTS.md

# The demo: 5 optimizers on the digits autoencoder (same init and data order, one thread: the
# model is tiny), then the exact Fisher of the K-FAC-trained model against its approximations.
DEMO := runs/demo
DEMO_SETTINGS := --task digits-autoencoder --optimizers sgd,adam,kfac,ekfac,prong \
	--steps 1000 --eval-every 25 --batch-size 100 --seed 0 --threads 1 \
	--lr sgd=0.05,adam=0.03,kfac=0.3,ekfac=0.3,prong=0.1 --momentum 0.9 \
	--damping 0.3 --kl-clip 0.003 --epsilon 1 --prong-period 100

demo: $(VENV)/.installed
	$(VENV)/bin/natgrad compare $(DEMO_SETTINGS) --out $(DEMO) --overwrite
	$(VENV)/bin/natgrad fisher --checkpoint $(DEMO)/kfac --examples 100 --threads 1 \
		--out $(DEMO)/fisher --overwrite
	mkdir -p docs/demo  # README's demo figures come from these copies (tests/test_docs.py)
	cp $(DEMO)/summary.md $(DEMO)/fisher/fisher.json docs/demo/
	cp $(DEMO)/comparison.png docs/demo_comparison.png
	@echo "demo results in $(DEMO)/:"
	@echo "  summary:         $(DEMO)/summary.md"
	@echo "  loss curves:     $(DEMO)/comparison.png"
	@echo "  Fisher report:   $(DEMO)/fisher/fisher.md"
	@echo "  Fisher blocks:   $(DEMO)/fisher/fisher_blocks.png"

clean:
	rm -rf $(VENV) $(BENCH) build src/*.egg-info
