"""benchmarks/gpu_check.py in its CPU mode (tiny sizes, gloo): every section of the prepared GPU check runs and
records, so that the script a GPU gets for a few minutes has run end to end before."""

import json
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_cpu_mode_runs_every_section(tmp_path):
    res = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--mode", "cpu", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    assert r["parity"]["fp32"]["ok"] and r["parity"]["fp32"]["max_logit_diff"] < 1e-4, r["parity"]
    assert r["parity"]["bf16"]["ok"], r["parity"]["bf16"]
    assert r["parity"]["fp32"]["attention_kernels"] != ["(none seen)"]
    assert r["speed"]["ours"]["tokens_per_s"] > 0 and r["speed"]["hf"]["tokens_per_s"] > 0
    assert "not installed" in r["speed"]["torchtitan"]["note"] or "installed" in r["speed"]["torchtitan"]["note"]
    assert set(r["memory"]["runs"]) == {"none", "selective", "full"}
    assert all("error" not in x and x["peak_gib"] > 0 and x["plan_gib"] > 0 for x in r["memory"]["runs"].values())
    assert r["multi"]["ep2"]["ok"] and r["multi"]["dp2"]["ok"], r["multi"]  # on gloo here, NCCL on GPUs
    assert r["multi"]["all_to_all"]["bus_gbps"] > 0
    table = (tmp_path / "gpu_check.txt").read_text()
    for head in ("1 parity", "2 speed", "3 memory", "4 multi"):
        assert head in table
