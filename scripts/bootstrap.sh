#!/usr/bin/env bash
# Create (or refresh) .venv in this checkout with twicing-lm and everything it needs.
#
# torch: a machine whose python3 already has torch (a CUDA build, say) keeps it: the venv sees the
# system packages. Otherwise TORCH_SPEC is installed (default torch==2.13.0, which on our CPU
# machines is a local CPU wheel; an unpinned torch would pull a multi-GB CUDA build).
# --mpi also provides an MPI library (Open MPI from apt when run as root, if mpirun is missing) and
# mpi4py, for the mpirun launch route and its tests. Idempotent and quick when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
  if "$python" -c "import torch" 2>/dev/null; then
    echo "bootstrap: reusing this machine's torch ($("$python" -c 'import torch; print(torch.__version__)'))"
    "$python" -m venv --system-site-packages .venv
  else
    "$python" -m venv .venv
  fi
fi

if [ "${1:-}" = "--mpi" ] && ! command -v mpirun >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "bootstrap: installing Open MPI"
    { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null; } ||
      echo "bootstrap: could not install Open MPI; mpirun tests will be skipped" >&2
  else
    echo "bootstrap: no mpirun here and no root to install Open MPI; mpirun tests will be skipped" >&2
  fi
fi

stamp=.venv/.twicing-lm-installed
wanted=$(cat setup.py scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "bootstrap: installing $torch_spec"
    .venv/bin/python -m pip install -q "$torch_spec" 2>&1 | grep -v "^WARNING: Location" || true
  fi
  echo "bootstrap: installing twicing-lm and its dependencies into .venv"
  # eval: lm-evaluation-harness for `lm harness`, whose tests need it too
  .venv/bin/python -m pip install -q -e ".[test,eval]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import deepspeed, sentencepiece, lm" >/dev/null 2>&1 || { echo "bootstrap: installation failed" >&2; exit 1; }
  # A CPU torch brings no Triton; the kernel's tests then run in Triton's interpreter, which works
  # with numpy 2 from Triton 3.9 on. A CUDA torch keeps the Triton it was built against.
  if .venv/bin/python -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then
    .venv/bin/python -m pip install -q "triton==3.9.0" 2>&1 | grep -v "^WARNING: Location" || true
  fi
  echo "$wanted" > "$stamp"
fi
if [ "${1:-}" = "--mpi" ] && command -v mpirun >/dev/null && ! .venv/bin/python -c "import mpi4py" 2>/dev/null; then
  .venv/bin/python -m pip install -q "mpi4py>=3.1" 2>&1 | grep -v "^WARNING: Location" || true
fi
