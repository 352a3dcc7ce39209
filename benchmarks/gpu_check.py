"""One prepared check of the model and the native trainer on a real GPU, start to finish in a few minutes,
leaving a record (``OUT/gpu_check.json`` and ``OUT/gpu_check.txt``). Every part runs the project's real
entry points: parity in-process against transformers; training through ``launch`` on a one-GPU local
profile (torchrun, NCCL, FSDP2 with bf16 mixed precision), exactly as a user's job.

  1. parity    logits and loss vs transformers' DeepseekV3ForCausalLM on the same weights, fp32 (tight) and
               bf16; which attention kernel ran (flash / efficient / cudnn / math, from the profiler) and
               whether the routed experts ran grouped_mm or the per-expert loop
  2. speed     a proxy config (16 experts top-4, seq 4096; its depth chosen by the planner to fill ~70% of
               the GPU) in bf16: tokens/s and MFU of our trainer, of HF transformers (same config, batch and
               AdamW), and of TorchTitan's deepseek_v3 where it is installed (said so where not)
  3. memory    torch.cuda.max_memory_allocated (the trainer's memory.json) vs the planner's per-rank estimate
               for recompute none / selective / full, as ratios, activations alone too; the planner's margins
               (CUDA context, communication buffers) measured instead of assumed
  4. multi-GPU with 2 or more GPUs: EP2 and DP2 over NCCL equal to one process in bf16, and the all-to-all's
               bandwidth (skipped, and said so, with one GPU)

``--mode cpu`` runs the same script at tiny sizes on gloo in seconds (CI runs it so that it never rots;
``tests/test_gpu_check.py``); there, memory ratios compare process RSS with the plan and are not judged.

    python benchmarks/gpu_check.py --out /tmp/gpu-check            # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --mode cpu --out /tmp/gpu-check  # anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0}
MODEL = {  # the proxy: DeepSeek-V3's shape at a size one GPU trains (depth set by the planner in GPU mode)
    "gpu": ["model.hidden_size=2048", "model.intermediate_size=8192", "model.moe_intermediate_size=1408",
            "model.num_attention_heads=16", "model.q_lora_rank=1536", "model.kv_lora_rank=512", "model.qk_nope_head_dim=128",
            "model.qk_rope_head_dim=64", "model.v_head_dim=128", "model.n_routed_experts=16", "model.num_experts_per_tok=4",
            "model.n_group=4", "model.topk_group=2", "model.n_shared_experts=1", "model.first_k_dense_replace=1",
            "model.vocab_size=32768", "model.num_nextn_predict_layers=0", "model.max_position_embeddings=8192"],
    "cpu": ["model.n_routed_experts=16", "model.num_experts_per_tok=4", "model.n_group=4", "model.topk_group=2",
            "model.num_nextn_predict_layers=0"],
}
SEQ = {"gpu": 4096, "cpu": 128}
BATCH = {"gpu": ["train.global_batch_size=8", "train.micro_batch_size=1"], "cpu": ["train.global_batch_size=4", "train.micro_batch_size=2"]}
COMMON = ["train.precision=bf16", "train.lr=1e-4", "train.min_lr=0", "train.warmup_steps=1", "checkpoint.interval=100000", "train.log_interval=1",
          "train.eval_interval=0", "parallel.pp=1", "parallel.tp=1"]


def log(text: str) -> None:
    print(f"[gpu_check] {text}", flush=True)


# ----------------------------------------------------------------------------- the machine
def environment(mode: str) -> dict:
    import torch

    env = {"mode": mode, "torch": torch.__version__, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count()}
    if mode == "gpu":
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, capability=f"sm{p.major}{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                   peak_tflops=next((v for k, v in PEAK_TFLOPS.items() if k in p.name), 989.0))
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    return env


def profiles(mode: str, env: dict, folder: Path) -> dict[int, str]:
    """Cluster profiles for 1 (and 2) local processes: {processes: profile name}."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for n in (1, 2):
        if mode == "gpu" and n > env["gpus"]:
            continue
        name = f"check{n}"
        if mode == "gpu":
            gpu = f"{{type: {env['gpu'].replace(' ', '-')}, memory_gb: {env['memory_gib']}, peak_tflops: {env['peak_tflops']}, assumed_mfu: 0.35}}"
            body = f"name: {name}\nexecutor: local\ndevice: cuda\nnodes: 1\ngpus_per_node: {n}\ngpu: {gpu}\n"
        else:
            body = (f"name: {name}\nexecutor: local\ndevice: cpu\nnodes: 1\ngpus_per_node: {n}\n"
                    "gpu: {type: cpu, memory_gb: 8, peak_tflops: 1.0, assumed_mfu: 0.1}\nenv: {OMP_NUM_THREADS: '1'}\n")
        (folder / f"{name}.yaml").write_text(body)
        out[n] = name
    return out


# ----------------------------------------------------------------------------- 1. parity
def parity(mode: str, work: Path) -> dict:
    """Ours vs transformers on the same weights: fp32 and bf16 logits and loss; the kernels that ran."""
    import torch
    from transformers import AutoModelForCausalLM

    from model.hf_io import load_hf_model, save_hf
    from model.moe import _grouped_mm_ok
    from model.presets import tiny
    from model.transformer import IGNORE_INDEX, build_model

    device = "cuda" if mode == "gpu" else "cpu"
    import dataclasses

    cfg = dataclasses.replace(tiny(), n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, num_nextn_predict_layers=0,
                              hidden_size=256 if mode == "gpu" else 64, moe_intermediate_size=128 if mode == "gpu" else 32,
                              vocab_size=4096 if mode == "gpu" else 512)
    save_hf(build_model(cfg, seed=0), work / "parity-hf")
    seq = 1024 if mode == "gpu" else 64
    ids = torch.randint(0, cfg.vocab_size, (2, seq), generator=torch.Generator().manual_seed(0)).to(device)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = IGNORE_INDEX
    out = {"config": f"hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}, "
                     f"batch 2 x {seq}"}
    for name, dtype, tol in (("fp32", torch.float32, 1e-3), ("bf16", torch.bfloat16, 2e-2)):  # bf16: relative loss
        ours = load_hf_model(work / "parity-hf", device=device, dtype=dtype).eval()
        hf = AutoModelForCausalLM.from_pretrained(work / "parity-hf", dtype=dtype, attn_implementation="sdpa").to(device).eval()
        with torch.no_grad(), torch.profiler.profile(activities=_activities(mode)) as prof:
            mine = ours(ids, labels=labels)
        with torch.no_grad():
            theirs = hf(input_ids=ids, labels=ids)
        diff = (mine.logits.float() - theirs.logits.float()).abs().max().item()
        loss_diff = abs(float(mine.loss) - float(theirs.loss))
        events = {e.key for e in prof.key_averages()}
        attn = sorted({k for k in ("flash", "efficient", "cudnn", "math") if any(k in e and "scaled_dot_product" in e for e in events)})
        w = ours.layers[str(cfg.first_k_dense_replace)].mlp.experts
        x = torch.zeros(8, cfg.hidden_size, device=device, dtype=dtype)
        ok = diff <= tol and loss_diff <= tol / 10 if name == "fp32" else loss_diff <= tol * abs(float(theirs.loss))
        out[name] = {"max_logit_diff": diff, "loss_diff": loss_diff, "loss_ours": float(mine.loss), "loss_hf": float(theirs.loss),
                     "ok": ok, "attention_kernels": attn or ["(none seen)"],
                     "experts": "grouped_mm" if any("grouped_mm" in e for e in events) else "per-expert loop",
                     "grouped_mm_eligible": _grouped_mm_ok(x, w.gate_proj, w.down_proj)}
        del ours, hf
    return out


def _activities(mode: str):
    import torch

    acts = [torch.profiler.ProfilerActivity.CPU]
    if mode == "gpu":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return acts


# ----------------------------------------------------------------------------- 2./3. the trainer through `launch`
def launch(profile: str, overrides: list[str], runs: Path, env: dict) -> Path:
    runs.mkdir(parents=True, exist_ok=True)
    before = set(runs.iterdir())
    cmd = [sys.executable, "-m", "launcher.cli", "smoke", "--cluster", profile, "--runs-dir", str(runs), *overrides]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    made = sorted(set(runs.iterdir()) - before)
    log(f"launch on {profile} {' '.join(overrides[-2:])}: exit {res.returncode} in {time.perf_counter() - t0:.0f} s")
    if res.returncode != 0 or len(made) != 1:
        raise RuntimeError(f"launch failed ({made}): {res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return made[0]


def trainer_numbers(run: Path, skip: int = 2) -> dict:
    import yaml

    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    timed = rows[skip:] or rows
    mem = json.loads((run / "memory.json").read_text())
    plan = yaml.safe_load((run / "plan.yaml").read_text())
    static = mem["ranks"][0]
    static_gib = (static["weights"] + static["grads"] + static["optimizer"]) / 2**30
    items = plan["memory"]["items_gib"]
    return {"run": str(run), "losses": [r["loss"] for r in rows], "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "mfu": statistics.median(r["mfu"] for r in timed), "peak_gib": mem["peak_gib"][0],
            "plan_gib": plan["memory"]["total_per_pp_rank_gib"][0], "static_gib": static_gib,
            "activations_measured_gib": mem["peak_gib"][0] - static_gib,
            "activations_plan_gib": items.get("activations", 0) + items.get("routing imbalance margin", 0) + items.get("logits", 0)}


def size_proxy(mode: str, profile_name: str, overrides: list[str], target: float = 0.7) -> int:
    """The deepest proxy whose planned memory stays under ``target`` of the GPU (the planner decides, torch-free)."""
    if mode == "cpu":
        return 2
    from launcher import cluster
    from launcher.preflight import run_preflight
    from launcher.recipe_loader import apply_overrides, load_recipe

    prof, _ = cluster.load_profile(profile_name)
    best = 2
    for layers in range(2, 49):
        r = apply_overrides(load_recipe("smoke")[0], [*overrides, f"model.num_hidden_layers={layers}"])
        pre = run_preflight(r, prof)
        if pre.memory is None or pre.memory.total > target * pre.memory.capacity:
            break
        best = layers
    return best


def hf_speed(mode: str, overrides: list[str], layers: int, steps: int, micro: int, per_step: int, seq: int) -> dict:
    """transformers' DeepseekV3ForCausalLM on the proxy config: bf16 autocast over fp32 weights (as our
    trainer's mixed precision), AdamW, the same micro-batches per step."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher.recipe_loader import apply_overrides, load_recipe
    from model.hf_config import config_to_hf

    device = "cuda" if mode == "gpu" else "cpu"
    cfg = apply_overrides(load_recipe("smoke")[0], [*overrides, f"model.num_hidden_layers={layers}"]).model
    hf_cfg = config_to_hf(cfg, dtype="float32")
    conf = AutoConfig.for_model(hf_cfg.pop("model_type"), **hf_cfg)
    with torch.device(device):  # its own random weights: the speed does not depend on them
        hf = AutoModelForCausalLM.from_config(conf, dtype=torch.float32, attn_implementation="sdpa")
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (micro, seq), device=device)
    times = []
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            for _ in range(per_step):
                with torch.autocast(device, dtype=torch.bfloat16):
                    loss = hf(input_ids=ids, labels=ids).loss
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if mode == "gpu":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        return {"tokens_per_s": None, "note": "out of memory at the proxy's size"}
    finally:
        del hf, opt
        if mode == "gpu":
            torch.cuda.empty_cache()
    step = statistics.median(times[2:] or times)
    return {"tokens_per_s": micro * seq * per_step / step}


def torchtitan_speed() -> dict:
    import importlib.util

    if importlib.util.find_spec("torchtitan") is None:
        return {"tokens_per_s": None, "note": "torchtitan is not installed in this environment (the GPU machine has no network)"}
    return {"tokens_per_s": None, "note": "torchtitan is installed; running its deepseek_v3 trainer on the proxy is not wired yet"}


def margins(mode: str) -> dict:
    """The planner's fixed margins, measured: CUDA context (device memory used beyond PyTorch's allocator after
    initialising CUDA and cuBLAS) and the communication buffers NCCL takes for a one-rank group."""
    from launcher.memory import COMM_BUFFERS_GIB, CUDA_OVERHEAD_GIB

    out = {"assumed_cuda_context_gib": CUDA_OVERHEAD_GIB, "assumed_comm_buffers_gib": COMM_BUFFERS_GIB}
    if mode != "gpu":
        out["note"] = "measured on GPUs only"
        return out
    code = ("import torch, torch.distributed as dist, json, os\n"
            "free0, total = torch.cuda.mem_get_info()\n"
            "a = torch.randn(1024, 1024, device='cuda'); (a @ a).sum().item()\n"
            "free1, _ = torch.cuda.mem_get_info(); ctx = (total - free1) - torch.cuda.memory_reserved()\n"
            "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT='29533')\n"
            "dist.init_process_group('nccl', rank=0, world_size=1)\n"
            "t = torch.ones(1 << 20, device='cuda'); dist.all_reduce(t); torch.cuda.synchronize()\n"
            "free2, _ = torch.cuda.mem_get_info()\n"
            "print(json.dumps({'cuda_context_gib': ctx / 2**30, 'nccl_one_rank_gib': (free1 - free2) / 2**30 - 4 / 1024}))\n"
            "dist.destroy_process_group()\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if res.returncode == 0:
        out.update(json.loads(res.stdout.strip().splitlines()[-1]))
    else:
        out["error"] = res.stderr[-500:]
    return out


# ----------------------------------------------------------------------------- 4. multi-GPU
ALL_TO_ALL = """
import json, os, time, torch, torch.distributed as dist
backend = "nccl" if torch.cuda.is_available() else "gloo"
dist.init_process_group(backend)
rank, world = dist.get_rank(), dist.get_world_size()
dev = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if backend == "nccl" else torch.device("cpu")
if backend == "nccl":
    torch.cuda.set_device(dev)
n = int(os.environ["A2A_BYTES"]) // 2
x, y = torch.ones(n, dtype=torch.bfloat16, device=dev), torch.empty(n, dtype=torch.bfloat16, device=dev)
for _ in range(3):
    dist.all_to_all_single(y, x)
if backend == "nccl":
    torch.cuda.synchronize()
t0, reps = time.perf_counter(), 10
for _ in range(reps):
    dist.all_to_all_single(y, x)
if backend == "nccl":
    torch.cuda.synchronize()
dt = (time.perf_counter() - t0) / reps
if rank == 0:
    print("A2A " + json.dumps({"bytes": 2 * n, "seconds": dt, "bus_gbps": 2 * n * (world - 1) / world / dt / 1e9}))
dist.destroy_process_group()
"""


def multi(mode: str, env: dict, profs: dict, overrides: list[str], reference: dict, runs: Path, launch_env: dict) -> dict:
    if 2 not in profs:
        return {"skipped": f"{env['gpus']} GPU on this machine: EP2/DP2 over NCCL and the all-to-all need 2 or more"}
    out = {}
    for name, extra in (("ep2", ["parallel.ep=2"]), ("dp2", ["parallel.ep=1"])):
        run = launch(profs[2], [*overrides, *extra], runs, launch_env)
        losses = trainer_numbers(run)["losses"]
        rel = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(losses, reference["losses"]))
        out[name] = {"losses": losses, "max_rel_loss_diff": rel, "ok": rel <= 2e-2}  # bf16: one rounding per reduction order
    script = runs / "a2a.py"
    script.write_text(ALL_TO_ALL)
    size = 256 * 2**20 if mode == "gpu" else 4 * 2**20
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
                         capture_output=True, text=True, timeout=300, env={**launch_env, "A2A_BYTES": str(size)})
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("A2A ")), None)
    out["all_to_all"] = json.loads(line[4:]) if line else {"error": res.stderr[-500:]}
    return out


# ----------------------------------------------------------------------------- the record
def table(result: dict) -> list[str]:
    e = result["env"]
    lines = [f"gpu_check ({e['mode']}): {e.get('gpu', 'CPU')} {e.get('capability', '')}, torch {e['torch']}, CUDA {e['cuda']}, "
             f"transformers {e['transformers']}"]
    p = result.get("parity", {})
    if "error" in p:
        lines.append(f"1 parity: ERROR {p['error']}")
    else:
        lines.append(f"1 parity ({p['config']})")
        for dt in ("fp32", "bf16"):
            r = p[dt]
            lines.append(f"  {dt}: max |logit diff| {r['max_logit_diff']:.2e}, loss diff {r['loss_diff']:.2e} "
                         f"({'ok' if r['ok'] else 'NOT ok'}); attention {'/'.join(r['attention_kernels'])}; experts {r['experts']}")
    if "error" in result:
        return lines + [f"2-4 training: ERROR {result['error']}"]
    s, m = result["speed"], result["memory"]
    ours, hf, tt = s["ours"], s["hf"], s["torchtitan"]
    lines.append(f"2 speed (proxy: {s['config']})")
    lines.append(f"  ours {ours['tokens_per_s']:,.0f} tokens/s, MFU {ours['mfu']:.1%}")
    if hf.get("tokens_per_s"):
        lines.append(f"  HF   {hf['tokens_per_s']:,.0f} tokens/s, MFU {hf['mfu']:.1%}; ours/HF {ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x "
                     + ("(target >= 1.5x)" if e["mode"] == "gpu" else "(CPU, tiny: torchrun + FSDP2 overhead against an in-process loop; not judged)"))
    else:
        lines.append(f"  HF   {hf.get('note') or hf.get('error')}")
    lines.append(f"  TorchTitan: {tt['note'] if not tt.get('tokens_per_s') else format(tt['tokens_per_s'], ',.0f') + ' tokens/s'}")
    lines.append("3 memory (measured peak / plan; activations measured / planned; target within 15%)")
    for rc, r in m["runs"].items():
        if "error" in r:
            lines.append(f"  recompute {rc:<9} ERROR {r['error']}")
            continue
        lines.append(f"  recompute {rc:<9} peak {r['peak_gib']:.2f} GiB / plan {r['plan_gib']:.2f} GiB = {r['peak_gib'] / r['plan_gib']:.2f}; "
                     f"activations {r['activations_measured_gib']:.2f} / {r['activations_plan_gib']:.2f} GiB"
                     + ("" if e["mode"] == "gpu" else " (CPU: process RSS, not judged)"))
    mg = m["margins"]
    if "error" in mg:
        lines.append(f"  margins: ERROR {mg['error']}")
    else:
        lines.append(f"  margins: CUDA context {mg.get('cuda_context_gib', float('nan')):.2f} GiB (assumed {mg['assumed_cuda_context_gib']}), "
                     f"NCCL one-rank buffers {mg.get('nccl_one_rank_gib', float('nan')):.2f} GiB (assumed comm {mg['assumed_comm_buffers_gib']})"
                     + (f" -- {mg['note']}" if "note" in mg else ""))
    mu = result["multi"]
    if "error" in mu:
        lines.append(f"4 multi: ERROR {mu['error']}")
    elif "skipped" in mu:
        lines.append(f"4 multi-GPU: skipped: {mu['skipped']}")
    else:
        a2a = mu["all_to_all"]
        lines.append(f"4 multi: EP2 max rel loss diff {mu['ep2']['max_rel_loss_diff']:.1e} ({'ok' if mu['ep2']['ok'] else 'NOT ok'}), "
                     f"DP2 {mu['dp2']['max_rel_loss_diff']:.1e} ({'ok' if mu['dp2']['ok'] else 'NOT ok'}); all-to-all "
                     + (f"{a2a['bus_gbps']:.1f} GB/s bus bandwidth ({a2a['bytes'] / 2**20:.0f} MiB)" if "bus_gbps" in a2a else a2a.get("error", "")))
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["auto", "gpu", "cpu"], default="auto")
    ap.add_argument("--out", default="gpu-check")
    ap.add_argument("--steps", type=int, default=0, help="training steps per run (default: gpu 8, cpu 4)")
    args = ap.parse_args()
    import torch

    mode = args.mode if args.mode != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    steps = args.steps or (8 if mode == "gpu" else 4)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=out))
    env = environment(mode)
    log(f"mode {mode}: {env}")
    profs = profiles(mode, env, work / "profiles")
    launch_env = {**os.environ, "MOE_LAUNCH_CLUSTERS": str(work / "profiles"), "MOE_LAUNCH_DATA_CACHE": str(work / "data"),
                  "XDG_CACHE_HOME": str(work / "cache"), "PYTHONPATH": str(ROOT)}
    os.environ.update(MOE_LAUNCH_CLUSTERS=launch_env["MOE_LAUNCH_CLUSTERS"])
    result = {"env": env}
    t0 = time.perf_counter()
    result["parity"] = guarded("parity", lambda: parity(mode, work))
    log(f"parity done ({time.perf_counter() - t0:.0f} s)")
    result.update(guarded("training", lambda: training(mode, env, profs, steps, work, launch_env)))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    lines = table(result)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / "gpu_check.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    log(f"wrote {out / 'gpu_check.json'} and gpu_check.txt in {result['seconds']} s")
    return 0 if not any("error" in v for v in result.values() if isinstance(v, dict)) else 1


def guarded(what: str, fn):
    """A section's result, or {"error": ...}: one failing part must not cost the others' record (one GPU try)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        import traceback

        log(f"{what} failed: {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}


def training(mode: str, env: dict, profs: dict, steps: int, work: Path, launch_env: dict) -> dict:
    """Sections 2-4: the trainer through `launch` (speed, memory per recompute, multi-GPU) and the HF peer."""
    t0 = time.perf_counter()
    result = {}
    seq = SEQ[mode]
    base = [*MODEL[mode], f"data.seq_length={seq}", *BATCH[mode], *COMMON, "parallel.ep=1", f"train.max_steps={steps}"]
    layers = size_proxy(mode, profs[1], base)
    base.append(f"model.num_hidden_layers={layers}")
    runs = work / "runs"
    per_recompute = {}
    for rc in ("none", "selective", "full"):
        per_recompute[rc] = guarded(f"recompute {rc}", lambda: trainer_numbers(
            launch(profs[1], [*base, f"parallel.recompute={rc}"] + ([] if rc == "none" else ["train.max_steps=3"]), runs, launch_env),
            skip=2 if rc == "none" else 1))
    ours = per_recompute["none"]
    if "error" in ours:
        raise RuntimeError(f"the proxy run failed: {ours['error']}")
    gbs, micro = (int(o.split("=")[1]) for o in BATCH[mode])
    flops = ours["mfu"] * env.get("peak_tflops", 1.0) * 1e12 / ours["tokens_per_s"] if ours["tokens_per_s"] else 0
    hf = hf_speed(mode, base, layers, steps, micro, gbs // micro, seq)
    if hf.get("tokens_per_s"):
        hf["mfu"] = hf["tokens_per_s"] * flops / (env.get("peak_tflops", 1.0) * 1e12)
    result["speed"] = {"config": f"{layers} layers, hidden {2048 if mode == 'gpu' else 'tiny'}, 16 experts top-4, seq {seq}, "
                                 f"{gbs} x {seq} tokens per step, bf16", "ours": ours, "hf": hf, "torchtitan": torchtitan_speed()}
    log(f"speed and memory done ({time.perf_counter() - t0:.0f} s)")
    result["memory"] = {"runs": per_recompute, "margins": guarded("margins", lambda: margins(mode))}
    result["multi"] = guarded("multi", lambda: multi(mode, env, profs, base, ours, runs, launch_env))
    return result


if __name__ == "__main__":
    sys.exit(main())
