"""Install llama-cpp-python with the patches in this folder (README.md here says what they change and why).

    python patches/install_llama_cpp.py          (the Makefile runs it with the venv's Python, before the project)

The patched source is the registry's sdist of VERSION with every `*.patch` here applied (`git apply`). The wheel it
builds is kept in ~/.cache/scriptorium/wheels/<key>/, where the key digests the patches, VERSION, the CPU's flags and
the Python tag: llama.cpp compiles for the CPU it is built on (-march=native), so a wheel is reused only on a CPU with
the same flags. A fresh machine compiles once (about 10 minutes on 2 cores). If fetching, patching or building fails,
the stock release is installed instead and the reason printed: the project runs on it (attention then takes
llama.cpp's reference path), and tests/test_llama_patch.py says the patch is missing.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"
HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "scriptorium" / "wheels"


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    import platform

    return platform.machine()


def cache_key(patches: list[Path]) -> str:
    digest = hashlib.sha256(VERSION.encode())
    for patch in patches:
        digest.update(patch.name.encode() + b"\0" + patch.read_bytes())
    digest.update(cpu_flags().encode())
    digest.update(sysconfig.get_platform().encode() + sys.implementation.cache_tag.encode())
    return digest.hexdigest()[:16]


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def build(patches: list[Path], target: Path) -> Path:
    """Download the sdist, apply the patches, build the wheel into `target` (moved there whole, so a killed build
    leaves no half wheel behind)."""
    with tempfile.TemporaryDirectory(prefix="llama-cpp-build-") as tmp:
        tmp = Path(tmp)
        pip("download", f"llama-cpp-python=={VERSION}", "--no-binary", ":all:", "--no-deps", "-d", str(tmp / "sdist"))
        sdist = next((tmp / "sdist").glob("*.tar.gz"))
        with tarfile.open(sdist) as archive:
            archive.extractall(tmp / "src", filter="data")
        source = next((tmp / "src").iterdir())
        for patch in patches:
            subprocess.run(["git", "apply", "-p1", str(patch)], cwd=source, check=True)
        pip("wheel", "--no-deps", "-w", str(tmp / "wheel"), str(source))
        wheel = next((tmp / "wheel").glob("*.whl"))
        staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
        shutil.move(str(wheel), staging / wheel.name)
        os.replace(staging, target)
        return target / wheel.name


def main() -> int:
    patches = sorted(HERE.glob("*.patch"))
    target = CACHE / cache_key(patches)
    wheels = sorted(target.glob("*.whl")) if target.is_dir() else []
    if wheels:
        print(f"llama-cpp-python {VERSION} with {len(patches)} patch(es): cached wheel {wheels[0]}", flush=True)
    else:
        print(f"llama-cpp-python {VERSION} with {len(patches)} patch(es): building (about 10 minutes on 2 cores)",
              flush=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            wheels = [build(patches, target)]
        except (subprocess.CalledProcessError, OSError, StopIteration) as err:
            print(f"WARNING: could not build the patched llama-cpp-python ({err}); installing the stock "
                  f"llama-cpp-python=={VERSION} instead (reference attention path)", file=sys.stderr, flush=True)
            pip("install", f"llama-cpp-python=={VERSION}")
            return 0
    pip("install", "--no-deps", "--force-reinstall", str(wheels[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
