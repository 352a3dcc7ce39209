"""Model package. The submodules config and presets are torch-free; the rest runs inside the job."""
