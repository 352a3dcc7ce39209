"""What would fit instead: other profiles, shipped recipes, and the fewest nodes for this layout.

Only runs when pre-flight fails, so it may afford to re-check a few dozen variants.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from launcher import cluster, recipe_loader
from launcher.cluster import ClusterProfile
from launcher.errors import UserError
from launcher.preflight import run_preflight
from launcher.recipe import Recipe

_NODE_COUNTS = [1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 384, 512, 768, 1024]


def min_nodes(recipe: Recipe, profile: ClusterProfile) -> int | None:
    """Fewest nodes of this profile's kind on which the layout is valid and fits (batch size aside; "at
    risk" is not a fit, as in launcher.search.fewest_nodes)."""
    for n in _NODE_COUNTS:
        pre = run_preflight(recipe, dataclasses.replace(profile, nodes=n))
        fits = pre.memory is None or pre.memory.verdict == "fits"
        if fits and not [p for p in pre.errors if not p.field.startswith("train.")]:
            return n
    return None


def suggestions(recipe: Recipe, recipe_path: Path, profile: ClusterProfile) -> list[str]:
    out, lora, smaller = [], [], []
    n = min_nodes(recipe, profile)
    if n and n != profile.nodes:
        out.append(f"this recipe needs at least {n} nodes x {profile.gpus_per_node} {profile.gpu.type} ({n * profile.gpus_per_node} GPUs)")
    from launcher.search import fewest_nodes

    found = fewest_nodes(recipe, profile)
    if found and (n is None or found[0] < n) and found[0] > profile.nodes:
        lay = found[1].layout
        out.append(f"with another layout it fits on {found[0]} nodes: parallel.tp={lay.tp} parallel.pp={lay.pp} parallel.ep={lay.ep} "
                   f"parallel.etp={lay.etp}{f' parallel.cp={lay.cp}' if lay.cp > 1 else ''} parallel.recompute={found[1].recompute} "
                   "(launch plan --search lists them all)")
    for name in cluster.available():
        if name == profile.name:
            continue
        try:
            other, _ = cluster.load_profile(name)
        except UserError:
            continue
        if other.device == profile.device and run_preflight(recipe, other).ok:
            out.append(f"--cluster {name} ({other.shape()}) passes all checks")
    for name in recipe_loader.shipped_names():
        try:
            other, path = recipe_loader.load_recipe(name)
        except UserError:
            continue
        if path.resolve() == recipe_path.resolve() or not run_preflight(other, profile).ok:
            continue
        if other.model.name == recipe.model.name and other.peft.method == "lora" and recipe.peft.method != "lora":
            lora.append(f"LoRA: recipes/{name}.py trains adapters of the same model and passes on {profile.name}")
        elif other.model.num_params() < recipe.model.num_params() and other.data.kind == recipe.data.kind:
            smaller.append(f"a smaller model: recipes/{name}.py ({other.model.name}, {other.model.num_params() / 1e9:.1f}B) passes on {profile.name}")
    return out + lora + smaller
