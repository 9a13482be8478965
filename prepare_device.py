"""Wheels for the lent GPU machine, which has no network: what bench_device.sh needs there beyond torch.

    python prepare_device.py            # download them into .device-wheels (carry that folder with the call)
    python prepare_device.py --dry-run  # only print them, name==version per line

The machine runs Python 3.12 on x86-64 Linux with its own torch (2.11), torchvision, numpy, scipy and
pillow. What must travel is diffusers and clean-fid at the versions of requirements.txt with everything they
need: the dependency closure is read from the packages installed here (their metadata, markers evaluated for
Python 3.12 on Linux), each wheel at the version installed here (or, where that version has no wheel for the
machine, the newest that fits). The check installs from these only what the machine lacks.
"""
import argparse
import importlib.metadata as metadata
import subprocess
import sys
from pathlib import Path

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name
except ImportError:  # not installed here: pip carries its own copy
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet
    from pip._vendor.packaging.utils import canonicalize_name

ROOTS = ["diffusers==0.42.1", "clean-fid==0.1.35"]  # as pinned in requirements.txt
# On the machine already, and far too big to carry (a torch wheel alone is over 500 MiB)
EXCLUDED = {"torch", "torchvision", "triton", "numpy", "scipy", "pillow"}
EXCLUDED_PREFIXES = ("nvidia-", "cuda-")  # torch's CUDA libraries
# The machine's interpreter, for the dependencies' markers
TARGET = dict(default_environment(), python_version="3.12", python_full_version="3.12.3", sys_platform="linux",
              platform_system="Linux", platform_machine="x86_64", os_name="posix", implementation_name="cpython",
              platform_python_implementation="CPython")
# pip matches a wheel's platform tag exactly: every manylinux tag that glibc 2.39 (Ubuntu 24.04) runs
PLATFORMS = ["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"] + [
    f"manylinux_2_{n}_x86_64" for n in range(5, 40)]


def excluded(name: str) -> bool:
    return name in EXCLUDED or name.startswith(EXCLUDED_PREFIXES)


def closure(roots=ROOTS) -> dict[str, tuple[str, SpecifierSet]]:
    """name: (the version installed here, what the packages that need it ask of it), for each root and each
    package it needs on the machine, sorted by name."""
    pins, wanted, seen, todo = {}, {}, set(), [(Requirement(r), "requirements.txt") for r in roots]
    while todo:
        req, wanted_by = todo.pop()
        name = canonicalize_name(req.name)
        if excluded(name):
            continue
        try:
            version = pins.get(name) or metadata.version(name)
        except metadata.PackageNotFoundError:
            sys.exit(f"prepare_device.py: {req} (needed by {wanted_by} on Python 3.12) is not installed here; "
                     f"install it in this environment first")
        if not req.specifier.contains(version, prereleases=True):
            sys.exit(f"prepare_device.py: {name} {version} is installed here, but {wanted_by} needs {req}")
        pins[name], wanted[name] = version, wanted.get(name, SpecifierSet()) & req.specifier
        for extra in sorted(req.extras) or [""]:  # an extra asked (safetensors[numpy]) adds its "extra == ..." lines
            if (name, extra) not in seen:
                seen.add((name, extra))
                todo += [(dep, name) for dep in map(Requirement, metadata.requires(name) or [])
                         if dep.marker is None or dep.marker.evaluate(dict(TARGET, extra=extra))]
    return {name: (version, wanted[name]) for name, version in sorted(pins.items())}


def download(packages: dict[str, tuple[str, SpecifierSet]], dest: Path) -> None:
    """A binary wheel for CPython 3.12 on manylinux x86-64 of each (pure-Python wheels match too): the version
    installed here, or where that has no such wheel, the newest that fits what the packages ask of it."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):  # one version of each package: two would stop the install there
        old.unlink()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "--abi", "cp312", "-d", str(dest), "--quiet"]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    for name, (version, wanted) in packages.items():
        if subprocess.run(cmd + [f"{name}=={version}"]).returncode != 0:
            print(f"prepare_device.py: {name} {version} has no wheel for Python 3.12 on manylinux x86-64; taking the "
                  f"newest of {name}{wanted or ''} that has one")
            if subprocess.run(cmd + [f"{name}{wanted}"]).returncode != 0:
                sys.exit(f"prepare_device.py: pip could not download a wheel of {name}{wanted or ''} (see above)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="print the wheels (name==version per line), download nothing")
    p.add_argument("--dest", type=Path, default=Path(__file__).resolve().parent / ".device-wheels",
                   help="where the wheels go (default: .device-wheels beside this script, git-ignored)")
    args = p.parse_args(argv)
    packages = closure()
    if args.dry_run:
        print("\n".join(f"{name}=={version}" for name, (version, _) in packages.items()))
        return
    download(packages, args.dest)
    wheels = sorted(args.dest.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels)
    print(f"{len(wheels)} wheels, {size / 2**20:.1f} MiB in {args.dest} (a call carries 64 MiB with the repo): "
          f'run(command="bash bench_device.sh", carry=[".device-wheels"], timeout_s=480)')


if __name__ == "__main__":
    main()
