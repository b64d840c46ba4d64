# Sourced by the GPU scripts: installs this tree (and any wheels carried in .whl/, with --no-deps,
# for packages the GPU machine lacks) into the machine's Python, which is $PY afterwards.
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/cosa_site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/cosa_site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
