"""The nemo backend's job side: our recipe as an NVIDIA NeMo 2 recipe, run inside NeMo's container.
Imports NeMo only inside the job (or the project's NeMo venv, scripts/nemo_venv.sh)."""
