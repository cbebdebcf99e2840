"""Print pip's ``--extra-index-url URL`` for the torch wheel index when it answers, else nothing.

``make`` installs torch from PyTorch's CPU wheel index by default (``TORCH_INDEX``): on public PyPI a plain
``torch==2.13.0`` is the CUDA build with gigabytes of NVIDIA wheels. A machine that reaches only the public package
registries (CI here) cannot reach that index, and pip would retry it for every requirement for minutes; so the
index is probed once, for a few seconds, and left out with one line on stderr when it does not answer.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

PROBE_SECONDS = 5.0


def reachable(index: str, timeout: float = PROBE_SECONDS) -> str:
    """'' when ``index``'s torch page answers, else why not (one phrase)."""
    try:
        with urllib.request.urlopen(f"{index.rstrip('/')}/torch/", timeout=timeout) as response:
            return "" if response.status == 200 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))


def main(argv: list[str]) -> int:
    index = argv[1].strip() if len(argv) > 1 else ""
    if not index:  # TORCH_INDEX= : the configured indexes' torch (on public PyPI, the CUDA build)
        return 0
    why = reachable(index)
    if why:
        print(f"make: TORCH_INDEX {index} does not answer ({why}); installing torch from the configured package "
              "indexes instead (on public PyPI that is the CUDA build)", file=sys.stderr)
        return 0
    print(f"--extra-index-url {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
