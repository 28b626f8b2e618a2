"""How peft's ``add_weighted_adapter`` weighted the merged adapters, release by release.

Installs each peft release into a scratch folder (``pip install --no-deps --target``), runs a probe in a
scratch virtual environment that has torch, an older transformers (< 5, which old peft releases import)
and accelerate, and writes what it measured to ``book/data/peft_weighting_history.json``.

The probe: a one-layer model (``nn.Linear(8, 6)``) with two LoRA adapters of rank 4,
``a`` (lora_alpha 8, scaling s_a = 2) and ``b`` (lora_alpha 2, scaling s_b = 0.5). Their factors live on
disjoint blocks (A_a uses input columns 0–3, A_b columns 4–7; B_a output rows 0–2, B_b rows 3–5), so
in the merged ΔW' = s'·B'A' the block (rows of a, columns of a) holds exactly c_a·ΔW_a, the block of b
holds c_b·ΔW_b, and the two off-diagonal blocks hold the cross terms B_a A_b and B_b A_a. For each
combination type the probe records

* ``delta``: the multipliers (c_a, c_b) on each adapter's ΔW = s·B·A (the exact answer is the weights);
* ``A``, ``B``: the multipliers on each adapter's factors inside the merged A' and B' (factor types, cat);
* ``cross``: ‖cross-term blocks‖_F / ‖Σ wᵢ ΔWᵢ‖_F;
* the merged adapter's r, lora_alpha and scaling.

It merges with weights [2, 1] (and [1, −1] to see how negative weights are handled), ties with
density 1 (no trimming, so only the weighting shows).

Usage (not run by the tests; takes a few minutes, mostly pip):

    python tools/peft_weighting_history.py --workdir /tmp/oldpeft            # all default versions
    python tools/peft_weighting_history.py --workdir /tmp/oldpeft --versions 0.6.2 0.9.0

Explained in: book/merging_adapters.ipynb
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

VERSIONS = ["0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.6.2", "0.7.0", "0.7.1", "0.8.0", "0.8.2", "0.9.0", "0.10.0",
            "0.11.1", "0.12.0", "0.13.2", "0.14.0", "0.15.2", "0.16.0", "0.17.0", "0.17.1", "0.18.0", "0.18.1",
            "0.19.0", "0.19.1", "0.20.0", "0.21.0", "0.21.1", "0.21.2"]
TYPES = ["linear", "cat", "svd", "ties"]
WEIGHTS = [2.0, 1.0]
NEGATIVE = [1.0, -1.0]
SCALINGS = {"a": 2.0, "b": 0.5}  # lora_alpha / r = 8/4 and 2/4
RUNTIME = ["torch==2.13.0", "transformers>=4.40,<4.47", "accelerate>=0.30,<1", "numpy<2.3"]
MARK = "@@PROBE@@"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------
# The probe (runs inside the scratch environment, with one peft release on sys.path)
# ---------------------------------------------------------------------------------------------------
def probe() -> dict:
    import warnings

    import torch
    from torch import nn

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    try:
        import torch.distributed.tensor  # noqa: F401 - peft >= 0.18 reads torch.distributed.tensor.DTensor
    except ImportError:
        pass
    import peft

    rows = {"a": slice(0, 3), "b": slice(3, 6)}
    cols = {"a": slice(0, 4), "b": slice(4, 8)}

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin0 = nn.Linear(8, 6, bias=False)
            if peft.__version__.startswith("0.3."):
                self.config = {"model_type": "custom"}  # peft 0.3 reads model.config

        def forward(self, x):
            return self.lin0(x)

    def build(**extra):
        torch.manual_seed(0)
        cfg = {n: peft.LoraConfig(r=4, lora_alpha=4 * SCALINGS[n], target_modules=["lin0"], lora_dropout=0.0,
                                  **extra) for n in ("a", "b")}
        model = peft.PeftModel(Tiny(), cfg["a"], adapter_name="a")
        model.add_adapter("b", cfg["b"])
        layer = model.base_model.model.lin0
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n in ("a", "b"):
                A = torch.zeros(4, 8)
                B = torch.zeros(6, 4)
                A[:, cols[n]] = torch.rand(4, 4, generator=g) + 0.5  # positive entries: no sign conflicts
                B[rows[n], :] = torch.rand(3, 4, generator=g) + 0.5
                layer.lora_A[n].weight.copy_(A)
                layer.lora_B[n].weight.copy_(B)
        return model, layer

    def proj(x, y) -> float:  # the c with x ≈ c·y (least squares)
        return float((x * y).sum() / (y * y).sum())

    def measure(layer, name, weights) -> dict:
        A2, B2 = layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()
        s2 = float(layer.scaling[name])
        delta = s2 * (B2 @ A2)
        out = {"merged_r": int(A2.shape[0]), "merged_lora_alpha": float(layer.lora_alpha[name]),
               "merged_scaling": s2, "delta": [], "residual": [], "A": [], "B": []}
        exact = torch.zeros_like(delta)
        for n, w in zip(("a", "b"), weights):
            A, B = layer.lora_A[n].weight.detach(), layer.lora_B[n].weight.detach()
            d = float(layer.scaling[n]) * (B @ A)
            exact += w * d
            blk = delta[rows[n], cols[n]]
            c = proj(blk, d[rows[n], cols[n]])
            out["delta"].append(round(c, 6))
            out["residual"].append(float((blk - c * d[rows[n], cols[n]]).norm() / d[rows[n], cols[n]].norm()))
            if A2.shape == A.shape:  # factor-by-factor merge: A' = Σ aᵢ Aᵢ, B' = Σ bᵢ Bᵢ
                out["A"].append(round(proj(A2[:, cols[n]], A[:, cols[n]]), 6))
                out["B"].append(round(proj(B2[rows[n], :], B[rows[n], :]), 6))
        if A2.shape[0] == 8 and not out["A"]:  # cat: A' = [a_a A_a; a_b A_b], B' = [b_a B_a, b_b B_b]
            for i, n in enumerate(("a", "b")):
                A, B = layer.lora_A[n].weight.detach(), layer.lora_B[n].weight.detach()
                out["A"].append(round(proj(A2[4 * i:4 * i + 4], A), 6))
                out["B"].append(round(proj(B2[:, 4 * i:4 * i + 4], B), 6))
        cross = delta.clone()
        cross[rows["a"], cols["a"]] = 0
        cross[rows["b"], cols["b"]] = 0
        out["cross"] = round(float(cross.norm() / exact.norm()), 6)
        return out

    import transformers

    result = {"peft": peft.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
              "types": {}, "negative": {}}
    for weights, key in ((WEIGHTS, "types"), (NEGATIVE, "negative")):
        for t in TYPES:
            model, layer = build()
            kwargs = {"combination_type": t}
            if t == "svd":
                kwargs["svd_rank"] = 6  # = min(out, in) ≥ rank of ΔW': no truncation
            if t == "ties":
                kwargs["density"] = 1.0
            name = f"m_{t}"
            try:
                try:
                    model.add_weighted_adapter(["a", "b"], weights, name, **kwargs)
                except TypeError as exc:  # peft 0.3 has one (linear) rule and no combination_type
                    if t != "linear" or "combination_type" not in str(exc):
                        raise
                    model.add_weighted_adapter(["a", "b"], weights, name)
                result[key][t] = measure(layer, name, weights)
            except Exception as exc:  # noqa: BLE001 - an old release may not know the type, or fail on it
                result[key][t] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    try:  # rsLoRA sources: what scaling does the merged adapter get?
        model, layer = build(use_rslora=True)
        model.add_weighted_adapter(["a", "b"], WEIGHTS, "m", combination_type="cat")
        result["rslora_cat"] = {"merged_r": int(layer.r["m"]), "merged_scaling": float(layer.scaling["m"]),
                                "delta": [round(x, 6) for x in measure(layer, "m", WEIGHTS)["delta"]]}
    except Exception as exc:  # noqa: BLE001 - releases before use_rslora existed
        result["rslora_cat"] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    return result


# ---------------------------------------------------------------------------------------------------
# Reading the measurements as rules
# ---------------------------------------------------------------------------------------------------
def _candidates(w: float, s: float) -> dict[str, float]:
    """Named rules for a multiplier, simplest first (a rule that needs w ≥ 0 is NaN otherwise)."""
    nan = math.nan
    return {"w": w, "w·s": w * s, "√w·s": math.sqrt(w) * s if w >= 0 else nan,
            "√w": math.sqrt(w) if w >= 0 else nan,
            "√(w·s)": math.sqrt(w * s) if w * s >= 0 else nan,
            "sgn(w·s)·√|w·s|": math.copysign(math.sqrt(abs(w * s)), w * s), "√|w·s|": math.sqrt(abs(w * s)),
            "|w|": abs(w), "w²": w * w, "1": 1.0}


def _name(values: list[float], weights: list[float]) -> str:
    if not values:
        return "-"
    for label in _candidates(1.0, 1.0):
        want = [_candidates(w, SCALINGS[n])[label] for n, w in zip(("a", "b"), weights)]
        if all(math.isclose(v, x, rel_tol=1e-4, abs_tol=1e-6) for v, x in zip(values, want)):
            return label
    return "other: " + ", ".join(f"{v:g}" for v in values)


def rules(measured: dict, weights: list[float]) -> dict:
    out = {}
    for t, m in measured.items():
        if "error" in m:
            out[t] = {"error": m["error"]}
            continue
        exact = all(r < 1e-4 for r in m["residual"]) and m["cross"] < 1e-6
        out[t] = {"A": _name(m["A"], weights), "B": _name(m["B"], weights),
                  "delta": _name(m["delta"], weights), "cross_terms": m["cross"] > 1e-6, "exact": exact}
    return out


def _signature(data: dict) -> str:
    if "error" in data:
        return "error"
    parts = {}
    for key in ("rules", "rules_negative"):
        parts[key] = {t: (r.get("error", "").split(":")[0] or f"A {r['A']}, B {r['B']}, ΔW {r['delta']}")
                      for t, r in data[key].items()}
    parts["rslora"] = data["rslora_cat"].get("merged_scaling", "n/a")
    return json.dumps(parts, sort_keys=True)


def summarise(versions: dict) -> list[dict]:
    """Consecutive releases with the same rules, as one row each."""
    rows: list[dict] = []
    for v, data in versions.items():
        sig = _signature(data)
        if rows and rows[-1]["_sig"] == sig:
            rows[-1]["last"] = v
            continue
        row = {"_sig": sig, "first": v, "last": v}
        if "error" not in data:
            for t, r in data["rules"].items():
                factors = f"A×{r['A']}, B×{r['B']} → " if r.get("A", "-") != "-" else ""
                row[t] = r.get("error") or (f"{factors}ΔWᵢ×{r['delta']}"
                                            + (" + cross terms" if r["cross_terms"] else " (exact)"))
            neg = data["negative"].get("linear", {})
            row["negative_weight_linear"] = neg.get("error") or f"weights {NEGATIVE} → ΔWᵢ×{neg['delta']}"
            row["rslora_merged_scaling"] = data["rslora_cat"].get("merged_scaling")
        rows.append(row)
    for row in rows:
        row.pop("_sig")
    return rows


# ---------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------
def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)


def ensure_runtime(workdir: str, pythons: list[str] | None) -> list[str]:
    if pythons:
        return pythons
    venv = os.path.join(workdir, "venv")
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):
        print(f"creating {venv} ({', '.join(RUNTIME)})", file=sys.stderr)
        run([sys.executable, "-m", "venv", venv])
        run([py, "-m", "pip", "install", "-q", *RUNTIME])
    return [py, sys.executable]  # releases that need a newer transformers run on this interpreter


def ensure_release(workdir: str, py: str, version: str) -> str:
    target = os.path.join(workdir, "targets", version)
    if not os.path.isdir(os.path.join(target, "peft")):
        print(f"installing peft=={version}", file=sys.stderr)
        run([py, "-m", "pip", "install", "-q", "--no-deps", "--target", target, f"peft=={version}"])
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/oldpeft", help="scratch folder for the venv and the releases")
    ap.add_argument("--python", nargs="+",
                    help="interpreters with torch, transformers and accelerate, tried in order until a release "
                         "imports (default: a scratch venv with transformers<4.47, then this interpreter)")
    ap.add_argument("--versions", nargs="+", default=VERSIONS)
    ap.add_argument("--out", default=os.path.join(ROOT, "book", "data", "peft_weighting_history.json"))
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        print(MARK + json.dumps(probe()))
        return 0
    os.makedirs(args.workdir, exist_ok=True)
    pythons = ensure_runtime(args.workdir, args.python)
    versions = {}
    for v in args.versions:
        target = ensure_release(args.workdir, pythons[0], v)
        env = dict(os.environ, PYTHONPATH=target, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        t0 = time.time()
        for py in pythons:  # the peft release on PYTHONPATH shadows any installed peft
            proc = subprocess.run([py, os.path.abspath(__file__), "--probe"], env=env, text=True,
                                  capture_output=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)), None)
            if line is not None:
                break
        if line is None:
            versions[v] = {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
        else:
            data = json.loads(line[len(MARK):])
            data["rules"] = rules(data["types"], WEIGHTS)
            data["rules_negative"] = rules(data["negative"], NEGATIVE)
            versions[v] = data
        print(f"peft {v}: {time.time() - t0:.1f} s", file=sys.stderr)
    doc = {
        "generated_by": "tools/peft_weighting_history.py",
        "summary": summarise(versions),
        "setup": {
            "model": "nn.Linear(8, 6, bias=False), LoRA r=4 on it",
            "adapters": {"a": {"r": 4, "lora_alpha": 8, "scaling": SCALINGS["a"]},
                         "b": {"r": 4, "lora_alpha": 2, "scaling": SCALINGS["b"]}},
            "weights": WEIGHTS, "negative_weights": NEGATIVE,
            "calls": {"linear": {}, "cat": {}, "svd": {"svd_rank": 6}, "ties": {"density": 1.0}},
            "fields": {
                "delta": "multiplier c_i with ΔW_merged ⊇ c_i·ΔW_i, where ΔW_i = s_i·B_i·A_i (exact merge: c = w)",
                "A": "multiplier on A_i inside the merged A' (factor types and cat)",
                "B": "multiplier on B_i inside the merged B'",
                "cross": "‖cross-term blocks B_i A_j (i≠j)‖_F / ‖Σ w_i ΔW_i‖_F",
            },
        },
        "versions": versions,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1, ensure_ascii=False)
        fh.write("\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
