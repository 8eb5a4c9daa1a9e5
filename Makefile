# Two commands on a fresh machine: `make demo` and `make test`. Both (re)create .venv when
# pyproject.toml or constraints.txt changed, and do nothing extra when it is current. The demo needs
# only the core install; `make test` adds the test, flower, browser, docs and tracking extras on top of it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CORE   := $(VENV)/.installed-core
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/python -m pip install -qq --disable-pip-version-check -c constraints.txt
export HF_HUB_OFFLINE := 1
export NO_MKDOCS_2_WARNING := 1

.PHONY: demo test venv bench clean report-check docs

venv: $(STAMP)

$(CORE): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $(CORE)

$(STAMP): $(CORE)
	$(PIP) -e '.[test,flower,browser,docs,tracking]'
	touch $(STAMP)

demo: $(CORE)
	rm -rf runs/demo
	$(BIN)/pfedpg-eval privacy --config configs/privacy_demo.yaml --out runs/demo --jobs 2
	@echo "report: runs/demo/report.md (also report.html; for a paper tradeoff.tex and accuracy_vs_epsilon.pdf)"

test: $(STAMP)
	$(BIN)/ruff check --quiet .
	$(BIN)/python -m mkdocs build --strict --site-dir site  # the documentation site: a broken link or anchor fails it
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup  # 2 workers; the Flower tests share one (tests/test_flower.py)

# The documentation site (mkdocs.yml, docs/) into site/; `mkdocs serve` previews it while editing.
docs: $(STAMP)
	$(BIN)/python -m mkdocs build --strict --site-dir site

# The demo's HTML report in a headless Chromium (apt-get install chromium): images load, nothing
# overflows sideways; screenshots land beside each report.html.
report-check: $(STAMP)
	$(BIN)/python -m evaluations.browser_check runs/demo

bench: $(STAMP)
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/dp_step.py
	cd bench && ../$(BIN)/python aggregation.py

clean:
	rm -rf $(VENV) runs site
