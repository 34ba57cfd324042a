# Everything a newcomer needs, on a fresh Debian machine as root: `make demo`, `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
SYSTEM_PACKAGES := e2fsprogs dosfstools exfatprogs exfat-fuse fusefat ntfs-3g fuse3 zstd util-linux xfsprogs fdisk gdisk mtools strace \
	postgresql mariadb-server mariadb-client lvm2 qemu-utils libnbd-bin openssh-server openssh-client passwd
BENCH_PACKAGES := borgbackup restic partclone fio

.PHONY: test check demo bench system-deps clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev]'
	touch $@

# Debian packages the tests drive for real (loop filesystems, FUSE drivers for exFAT, FAT32, NTFS).
system-deps:
	@bash scripts/apt-install.sh $(SYSTEM_PACKAGES)

test: system-deps $(VENV)/.installed
	$(VENV)/bin/pytest -q -ra

check: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy src/imagechain
	$(VENV)/bin/mypy bench

demo: system-deps $(VENV)/.installed
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/demo.sh

bench: system-deps $(VENV)/.installed
	@bash scripts/apt-install.sh $(BENCH_PACKAGES)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache .hypothesis
