"""Everything is in pyproject.toml but this: bpf/ and offsets/ sit beside the package in the
checkout (where their authors edit them) and go inside it when built, as keytap/bpf and
keytap/offsets (keytap.resources finds either)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

DATA_DIRS = {"bpf": ("*.c", "*.h"), "offsets": ("*.json", "*.md")}


class BuildWithData(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the checkout's own
            return
        for name, patterns in DATA_DIRS.items():
            target = Path(self.build_lib, "keytap", name)
            target.mkdir(parents=True, exist_ok=True)
            for pattern in patterns:
                for source in sorted(Path(name).glob(pattern)):
                    shutil.copy2(source, target / source.name)


setup(cmdclass={"build_py": BuildWithData})
