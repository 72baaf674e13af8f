"""Rebuild zerospeech-libriabx's compiled DTW (``libri_light_dtw``) against this venv's numpy.

    .venv/bin/python scripts/build_libriabx_dtw.py

zerospeech-libriabx 1.0.5 (libri-light's ABX, the reference of tests/evaluation/test_abx_reference.py and
benchmarks/bench_abx.py) ships a wheel whose ``libri_light_dtw`` extension was compiled against numpy 1.x:
under numpy 2 it fails to import ("numpy.dtype size changed"). The wheel also ships the extension's
source, ``libriabx/libri_light/ABX_src/dtw.pyx``; this compiles that file unchanged (Cython, ``-O3`` as
the package's own setup.py) and puts the module where the wheel put its own. Idempotent; exits 0 with a
note when the package is not installed.
"""

import importlib.util
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path


def works() -> bool:
    return subprocess.run([sys.executable, "-c", "import libri_light_dtw"], capture_output=True).returncode == 0


def main() -> int:
    spec = importlib.util.find_spec("libriabx")
    if spec is None or not spec.submodule_search_locations:
        print("zerospeech-libriabx is not installed: nothing to build")
        return 0
    if works():
        print("libri_light_dtw imports: nothing to build")
        return 0
    pyx = Path(spec.submodule_search_locations[0]) / "libri_light" / "ABX_src" / "dtw.pyx"
    if not pyx.is_file():
        raise SystemExit(f"{pyx}: zerospeech-libriabx's DTW source is missing")
    site = Path(sysconfig.get_paths()["platlib"])
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(pyx, Path(tmp) / "dtw.pyx")
        (Path(tmp) / "setup.py").write_text(
            "import numpy, setuptools\n"
            "from Cython.Build import cythonize\n"
            "setuptools.setup(name='libri_light_dtw', ext_modules=cythonize([setuptools.Extension("
            "'libri_light_dtw', ['dtw.pyx'], extra_compile_args=['-O3'], include_dirs=[numpy.get_include()])],"
            " language_level=3, quiet=True))\n"
        )
        subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tmp, check=True)
        built = next(Path(tmp).glob("libri_light_dtw*.so"))
        for old in site.glob("libri_light_dtw*.so"):
            old.unlink()
        shutil.copy(built, site / built.name)
    if not works():
        raise SystemExit("libri_light_dtw still does not import after the rebuild")
    print(f"rebuilt {site / built.name} from {pyx}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
