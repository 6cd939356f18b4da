# The two set-up commands of the README (`make serve`, `make test`). Each installs everything first.
.PHONY: install serve chat test

install:
	bash scripts/install.sh

serve: install
	HF_HUB_OFFLINE=1 servelm serve

chat: install
	HF_HUB_OFFLINE=1 servelm chat

test: install
	HF_HUB_OFFLINE=1 python3 -m pytest -q
