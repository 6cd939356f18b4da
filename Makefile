# The two set-up commands of the README. Each installs everything first.
.PHONY: install serve chat test bench

install:
	bash scripts/install.sh

chat: install
	HF_HUB_OFFLINE=1 servelm chat

test: install
	HF_HUB_OFFLINE=1 python3 -m pytest -q
