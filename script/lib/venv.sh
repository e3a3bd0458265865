# Sourced by script/test and script/predict: makes sure the virtual environment $VENV (default
# .venv, relative to the repository root, where the caller stands) exists and holds
# requirements.txt with the CPU torch of requirements-test.txt. Installs only when either file
# changed since the last install. Sets VENV_PYTHON to its interpreter.

VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if ! cmp -s requirements.txt "$VENV/.installed-requirements" 2>/dev/null \
   || ! cmp -s requirements-test.txt "$VENV/.installed-requirements-test" 2>/dev/null; then
  echo "Installing requirements.txt and requirements-test.txt into $VENV (first run or changed requirements; a few minutes)..." >&2
  # The image's CUDA torch is replaced by the CPU torch pinned in requirements-test.txt.
  image_requirements=$(mktemp)
  grep -v '^torch==' requirements.txt >"$image_requirements"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements-test.txt -r "$image_requirements"
  rm -f "$image_requirements"
  cp requirements.txt "$VENV/.installed-requirements"
  cp requirements-test.txt "$VENV/.installed-requirements-test"
fi
VENV_PYTHON="$VENV/bin/python"
