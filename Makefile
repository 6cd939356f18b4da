# The two set-up commands of the README (`make serve`, `make test`). Each installs what it needs
# first: the Python packages (skipped when pyproject.toml and scripts/install.sh are unchanged since
# the last install) and, for the tests, the system packages they start (redis-server, chromium).
.PHONY: install deps system-packages serve chat test

install:
	bash scripts/ensure-installed.sh --force

deps:
	@bash scripts/ensure-installed.sh

system-packages:
	@bash scripts/system-packages.sh

serve: deps
	HF_HUB_OFFLINE=1 servelm serve

chat: deps
	HF_HUB_OFFLINE=1 servelm chat

test: deps system-packages
	HF_HUB_OFFLINE=1 python3 -m pytest -q
