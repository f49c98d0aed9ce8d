"""Build (and execute) the numoe example notebooks.

The notebooks are generated from the cell lists below, so they stay small,
reviewable and reproducible. Usage, from the repository root::

    python notebooks/_build.py            # write and execute all three, keep outputs
    python notebooks/_build.py --no-exec  # write them without outputs
    python notebooks/_build.py 02         # only the notebooks whose name contains "02"

Executing needs ``nbformat``, ``nbclient`` and ``ipykernel`` (``pip install -e
".[notebooks]"``); notebook 03 also uses PyTorch when it is installed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

SETUP = """\
%matplotlib inline
import numpy as np
import matplotlib.pyplot as plt
import numoe

np.set_printoptions(precision=3, suppress=True, linewidth=110)
plt.rcParams.update({"figure.dpi": 90, "axes.titlesize": 10, "font.size": 9})
"""

# --------------------------------------------------------------------------- 01
ROUTING_TOUR = [
    ("md", """\
# numoe 01 — a tour of routing, dispatch and combine

A Mixture-of-Experts layer sends each token to `k` of `E` expert networks.
This notebook walks through the pieces numoe provides for that, on inputs
small enough to look at:

1. **scores** — softmax or sigmoid over the router logits (`numoe.router_probs`);
2. **selection** — top-k with renormalisation, a selection bias and
   group-limited routing (`numoe.route`);
3. **capacity** — what gets dropped when an expert is full, under each drop
   policy (`numoe.dispatch_plan`);
4. **permute / unpermute** — moving token rows into expert order and back
   (`numoe.permute`, `numoe.unpermute`).

Every array here is a plain NumPy array; the same calls take CUDA arrays."""),
    ("code", SETUP + """
def heat(ax, a, title, fmt="{:.2f}", cmap="viridis", marks=None, **kw):
    \"\"\"imshow with the value written in each cell; `marks` is a bool mask drawn as boxes.\"\"\"
    im = ax.imshow(a, cmap=cmap, aspect="auto", **kw)
    for (i, j), v in np.ndenumerate(a):
        if np.isfinite(v):
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7,
                    color="w" if im.norm(v) < 0.6 else "k")
    if marks is not None:
        for i, j in zip(*np.nonzero(marks)):
            ax.add_patch(plt.Rectangle((j - .5, i - .5), 1, 1, fill=False, ec="red", lw=2))
    ax.set_title(title)
    ax.set_xlabel("expert")
    ax.set_ylabel("token")
    return im


def chosen(experts, E):
    \"\"\"Dense [T, E] mask of the chosen experts.\"\"\"
    m = np.zeros((experts.shape[0], E), dtype=bool)
    np.put_along_axis(m, experts, True, axis=1)
    return m


def dense(r, E):
    \"\"\"Scatter Routing weights [T, k] into a dense [T, E] combine matrix.\"\"\"
    d = np.zeros((r.weights.shape[0], E), dtype=r.weights.dtype)
    np.put_along_axis(d, r.experts, r.weights, axis=1)
    return d
"""),
    ("md", """\
## 1. Scores: softmax vs sigmoid

Six tokens, eight experts. Softmax makes the experts compete (each row sums
to 1); sigmoid scores each expert on its own (DeepSeek-V3). The last token
has all-equal logits, to show how ties are broken."""),
    ("code", """\
rng = np.random.default_rng(0)
T, E, k = 6, 8, 2
logits = rng.normal(size=(T, E)).astype(np.float32)
logits[5] = 0.0                      # all-equal row

fig, axes = plt.subplots(1, 3, figsize=(14, 3.2))
heat(axes[0], logits, "router logits", cmap="coolwarm", vmin=-2.5, vmax=2.5)
heat(axes[1], numoe.router_probs(logits, "softmax"), "softmax scores (rows sum to 1)")
heat(axes[2], numoe.router_probs(logits, "sigmoid"), "sigmoid scores (independent)")
fig.tight_layout()
print("row sums, softmax:", numoe.router_probs(logits, "softmax").sum(axis=1))
"""),
    ("md", """\
## 2. Top-k selection and renormalisation

`numoe.route(logits, k)` returns a `Routing(weights [T, k], experts [T, k])`.
The red boxes are the chosen experts; the colour is the combine weight each
expert gets. With `renormalize=True` the k weights sum to 1 (Mixtral,
Qwen3-MoE); with `renormalize=False` they are the raw scores (OLMoE,
Qwen2-MoE), so a token whose favourite experts are only lukewarm contributes
less."""),
    ("code", """\
variants = {
    "softmax, renormalised": dict(score="softmax", renormalize=True),
    "softmax, raw": dict(score="softmax", renormalize=False),
    "sigmoid, renormalised": dict(score="sigmoid", renormalize=True),
    "sigmoid, raw": dict(score="sigmoid", renormalize=False),
}
fig, axes = plt.subplots(1, 4, figsize=(16, 3.2), sharey=True)
for ax, (name, kw) in zip(axes, variants.items()):
    r = numoe.route(logits, k, **kw)
    heat(ax, dense(r, E), name, marks=chosen(r.experts, E), vmin=0, vmax=1)
    print(f"{name:24s} weight sums {r.weights.sum(axis=1)}")
fig.tight_layout()
r = numoe.route(logits, k)
print("experts (descending score):\\n", r.experts)
"""),
    ("md", """\
### Ties go to the lower expert id

Token 5 has eight equal logits: numoe picks experts 0 and 1, in that order.
The same rule holds for partial ties, so routing never depends on thread
count or memory layout."""),
    ("code", """\
tied = np.array([[1.0, 3.0, 3.0, 0.0, 3.0],
                 [2.0, 2.0, 2.0, 2.0, 2.0]], dtype=np.float32)
r = numoe.route(tied, 2)
print("experts:", r.experts.tolist())
print("weights:", r.weights.tolist())
"""),
    ("md", """\
## 3. A selection bias changes *who* is chosen, not the weights

DeepSeek-V3's auxiliary-loss-free balancing adds a per-expert bias to the
scores **for selection only**. Below, expert 7 gets a large bias: it is now
chosen by every token, yet its weight is still its unbiased sigmoid score
(renormalised over the chosen k)."""),
    ("code", """\
bias = np.zeros(E, dtype=np.float32)
bias[7] = 1.0
plain = numoe.route(logits, k, score="sigmoid", renormalize=False)
biased = numoe.route(logits, k, score="sigmoid", renormalize=False, bias=bias)
s = numoe.router_probs(logits, "sigmoid")

fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharey=True)
heat(axes[0], dense(plain, E), "sigmoid top-2, no bias", marks=chosen(plain.experts, E), vmin=0, vmax=1)
heat(axes[1], dense(biased, E), "bias +1.0 on expert 7", marks=chosen(biased.experts, E), vmin=0, vmax=1)
fig.tight_layout()
print("weights equal the unbiased scores of the chosen experts:",
      np.allclose(biased.weights, np.take_along_axis(s, biased.experts, axis=1)))
"""),
    ("md", """\
## 4. Group-limited routing

DeepSeek-V3 splits the experts into contiguous groups (on different
devices), scores each group by the sum of its two best expert scores, keeps
the best `topk_groups` groups and chooses the top-k experts only inside
them. Here: 16 experts in 4 groups, keep 2 groups, choose 4 experts. Greyed
cells are experts in dropped groups."""),
    ("code", """\
E2, k2, n_groups, topk_groups = 16, 4, 4, 2
lg = rng.normal(size=(T, E2)).astype(np.float32)
s2 = numoe.router_probs(lg, "sigmoid")
r_all = numoe.route(lg, k2, score="sigmoid")
r_grp = numoe.route(lg, k2, score="sigmoid", n_groups=n_groups, topk_groups=topk_groups)

# which groups survived, recomputed from the definition for the picture
gsc = np.sort(s2.reshape(T, n_groups, -1), axis=-1)[..., -2:].sum(-1)
keep = np.argsort(-gsc, axis=1, kind="stable")[:, :topk_groups]
allowed = np.zeros((T, n_groups), dtype=bool)
np.put_along_axis(allowed, keep, True, axis=1)
allowed = np.repeat(allowed, E2 // n_groups, axis=1)

fig, axes = plt.subplots(1, 2, figsize=(15, 3.4), sharey=True)
heat(axes[0], s2, "sigmoid scores, top-4 over all experts", marks=chosen(r_all.experts, E2))
heat(axes[1], np.where(allowed, s2, np.nan), "top-2 groups of 4, then top-4",
     marks=chosen(r_grp.experts, E2))
for ax in axes:
    for g in range(1, n_groups):
        ax.axvline(g * E2 // n_groups - .5, color="k", lw=2)
fig.tight_layout()
print("chosen experts all lie in kept groups:",
      bool(np.take_along_axis(allowed, r_grp.experts, axis=1).all()))
"""),
    ("md", """\
## 5. Capacity and drop policies

With a capacity `C`, each expert keeps at most `C` of its assignments; the
rest are *dropped* (the token skips that expert). Which ones survive is the
drop policy:

* `"slot"` — every token's first choice before any second choice, then token
  order (GShard, Tutel);
* `"position"` — token order over all slots together;
* `"score"` — highest routing weight first.

Sixteen tokens, four experts, top-2, logits skewed towards experts 0 and 1,
capacity factor 1.0. Each cell is one assignment `(token, slot)`, coloured
by its expert, with its routing weight; faded, crossed cells were dropped."""),
    ("code", """\
T3, E3, k3 = 16, 4, 2
lg3 = (rng.normal(size=(T3, E3)) + np.array([0.6, 0.3, -0.2, -0.5])).astype(np.float32)
r3 = numoe.route(lg3, k3)
C = numoe.capacity(T3, E3, k3, 1.0)
print(f"capacity = ceil(1.0 * {T3} * {k3} / {E3}) = {C};",
      "demand per expert:", numoe.expert_counts(r3.experts, E3))

policies = ["slot", "position", "score"]
fig, axes = plt.subplots(1, 4, figsize=(15, 4.6),
                         gridspec_kw=dict(width_ratios=[1, 1, 1, 1.6]))
colors = plt.get_cmap("tab10")(np.arange(E3))
for ax, pol in zip(axes, policies):
    plan = numoe.dispatch_plan(r3.experts, E3, capacity=C, weights=r3.weights, drop_policy=pol)
    rgba = colors[r3.experts]
    rgba[plan.dropped] = 0.2 * rgba[plan.dropped] + 0.8      # dropped: faded
    ax.imshow(rgba, aspect="auto")
    for t, j in np.ndindex(T3, k3):
        ax.text(j, t, f"e{r3.experts[t, j]}  w={r3.weights[t, j]:.2f}", ha="center",
                va="center", fontsize=7, color="0.5" if plan.dropped[t, j] else "k")
        if plan.dropped[t, j]:
            ax.plot([j - .45, j + .45], [t - .4, t + .4], color="0.3", lw=0.8)
            ax.plot([j - .45, j + .45], [t + .4, t - .4], color="0.3", lw=0.8)
    ax.set_xticks(range(k3), [f"slot {j}" for j in range(k3)])
    ax.set_ylabel("token")
    ax.set_title(f'drop_policy="{pol}": {int(plan.dropped.sum())} dropped')
    axes[3].bar(np.arange(E3) + 0.25 * policies.index(pol) - 0.25, plan.counts, width=0.25,
                label=pol)
axes[3].axhline(C, color="k", ls="--", label=f"capacity {C}")
axes[3].bar(np.arange(E3), numoe.expert_counts(r3.experts, E3), width=0.9, color="none",
            ec="grey", label="demand")
axes[3].set_xticks(range(E3), [f"expert {e}" for e in range(E3)])
axes[3].set_title("kept assignments per expert")
axes[3].legend(fontsize=7)
fig.tight_layout()
"""),
    ("md", """\
Under `"slot"` the dropped cells are mostly second choices; under
`"position"` the late tokens lose out; under `"score"` the low-weight
assignments go first. The plan itself is a stable counting sort:
`order` lists the kept flat ids `t*k + j` grouped by expert, and
`offsets` marks where each expert's rows start."""),
    ("code", """\
plan = numoe.dispatch_plan(r3.experts, E3, capacity=C, drop_policy="slot")
for e in range(E3):
    ids = plan.order[plan.offsets[e]:plan.offsets[e + 1]]
    print(f"expert {e}: tokens {(ids // k3).tolist()}")
print("offsets:", plan.offsets, " counts:", plan.counts)
"""),
    ("md", """\
## 6. Permute and unpermute, as pictures

`permute(x, plan)` gathers token rows into expert order (`xs[i] =
x[order[i] // k]`), so that each expert's rows are contiguous and one GEMM
per expert does the work. `unpermute(ys, plan, weights)` sums each token's
expert outputs back with its routing weights, in slot order (no atomics:
bit-reproducible).

Each token row below is a distinct colour ramp, so you can follow the rows.
With identity experts (`ys = xs`) and renormalised weights, unpermute gives
`x` back exactly; with capacity, a token that lost a slot comes back scaled
by the weight it kept."""),
    ("code", """\
T4, H4, E4, k4 = 10, 12, 4, 2
x = (np.arange(T4)[:, None] + np.linspace(0, 0.8, H4)[None, :]).astype(np.float32)
r4 = numoe.route(rng.normal(size=(T4, E4)).astype(np.float32), k4)
plan4 = numoe.dispatch_plan(r4.experts, E4)
xs = numoe.permute(x, plan4)
y = numoe.unpermute(xs, plan4, r4.weights)           # identity experts

capped = numoe.dispatch_plan(r4.experts, E4, capacity=3)
y_capped = numoe.unpermute(numoe.permute(x, capped), capped, r4.weights)

fig, axes = plt.subplots(1, 4, figsize=(15, 4.2),
                         gridspec_kw=dict(width_ratios=[1, 1.6, 1, 1]))
kw = dict(cmap="viridis", vmin=0, vmax=T4, aspect="auto")
axes[0].imshow(x, **kw); axes[0].set_title("x [T, H]"); axes[0].set_ylabel("token")
axes[1].imshow(xs, **kw); axes[1].set_title("xs = permute(x, plan) [T*k, H]")
axes[1].set_yticks(range(len(xs)), [f"t{t}" for t in plan4.order // k4], fontsize=7)
for e in range(E4):
    lo, hi = plan4.offsets[e], plan4.offsets[e + 1]
    axes[1].axhline(lo - .5, color="w", lw=2)
    axes[1].text(H4 - .4, (lo + hi - 1) / 2, f"expert {e}", color="w", ha="right",
                 va="center", fontsize=8, fontweight="bold")
axes[2].imshow(y, **kw); axes[2].set_title("unpermute(xs, plan, w)")
axes[3].imshow(y_capped, **kw); axes[3].set_title("same, capacity 3")
fig.tight_layout()
print("identity experts give x back:", np.allclose(y, x, atol=1e-5))
kept = np.where(capped.dropped, 0, r4.weights).sum(axis=1)
print("with capacity, y[t] = kept weight * x[t]:", np.allclose(y_capped, kept[:, None] * x, atol=1e-5))
print("kept weight per token:", kept)
"""),
    ("md", """\
The same three calls plus `numoe.expert_ffn` are the whole routed part of
`numoe.MoELayer`; notebook 02 looks at load balancing, notebook 03 at
speed."""),
]

# --------------------------------------------------------------------------- 02
LOAD_BALANCING = [
    ("md", """\
# numoe 02 — load balancing

A router that prefers a few experts wastes the rest of the layer and, with
a capacity limit, drops tokens. This notebook builds a deliberately skewed
router and measures it with numoe's telemetry and losses, then balances it
with DeepSeek-V3's auxiliary-loss-free bias update."""),
    ("code", SETUP + """
rng = np.random.default_rng(0)
T, E, k = 8192, 16, 2
skew = np.linspace(-1.0, 1.0, E)          # expert e gets a logit offset of strength * skew[e]


def batch(strength, T=T, seed=None):
    \"\"\"Router logits of one batch: noise plus a per-expert preference.\"\"\"
    g = rng if seed is None else np.random.default_rng(seed)
    return (g.normal(size=(T, E)) + strength * skew).astype(np.float32)


def bars(ax, counts, title, **kw):
    ax.bar(np.arange(len(counts)), counts, **kw)
    ax.axhline(counts.mean(), color="k", ls="--", lw=1, label="mean")
    ax.set_xlabel("expert")
    ax.set_ylabel("assignments")
    ax.set_title(title)
"""),
    ("md", """\
## 1. Expert load of a skewed router

`numoe.expert_counts` counts the `T*k` assignments per expert;
`numoe.routing_stats` summarises them: coefficient of variation,
max/mean load, *balancedness* (mean/max: 1.0 is perfectly even), dead
experts and, given a plan, the drop rate."""),
    ("code", """\
fair_logits, skewed_logits = batch(0.0), batch(2.0)
fair, skewed = numoe.route(fair_logits, k), numoe.route(skewed_logits, k)

fig, axes = plt.subplots(1, 2, figsize=(12, 3.2), sharey=True)
bars(axes[0], numoe.expert_counts(fair.experts, E), "unskewed router")
bars(axes[1], numoe.expert_counts(skewed.experts, E), "skewed router (strength 2)", color="C3")
axes[0].legend()
fig.tight_layout()

C = numoe.capacity(T, E, k, 1.25)
plan = numoe.dispatch_plan(skewed.experts, E, capacity=C)
stats = numoe.routing_stats(skewed.experts, E, weights=skewed.weights, plan=plan)
for key, v in stats.items():
    print(f"{key:14s}", v)
"""),
    ("md", """\
## 2. The auxiliary losses

* `numoe.load_balancing_loss(probs, experts)` is Switch Transformer's
  `E * sum_i f_i * P_i` (fraction of assignments times mean router
  probability per expert). It is 1.0 when both are uniform and grows with
  the skew. (Hugging Face's Mixtral-family value is `k` times this.)
* `numoe.router_z_loss(logits)` is ST-MoE's mean squared log-sum-exp of the
  logits: it penalises large logits, which keeps the router numerically tame.
  Shifting all logits up raises it even though the routing does not change."""),
    ("code", """\
strengths = np.linspace(0, 3, 13)
aux, zl, bal, cv = [], [], [], []
for st in strengths:
    lg = batch(st, seed=1)
    r = numoe.route(lg, k)
    aux.append(numoe.load_balancing_loss(numoe.router_probs(lg), r.experts))
    zl.append(numoe.router_z_loss(lg))
    s = numoe.routing_stats(r.experts, E)
    bal.append(s["balancedness"]); cv.append(s["cv"])

fig, axes = plt.subplots(1, 3, figsize=(15, 3.2))
axes[0].plot(strengths, aux, "o-"); axes[0].axhline(1.0, color="k", ls="--", lw=1)
axes[0].set_title("load_balancing_loss (1.0 = balanced)")
axes[1].plot(strengths, bal, "o-", label="balancedness (mean/max)")
axes[1].plot(strengths, cv, "s-", label="coefficient of variation")
axes[1].set_title("routing_stats"); axes[1].legend()
axes[2].plot(strengths, zl, "o-"); axes[2].set_title("router_z_loss")
for ax in axes:
    ax.set_xlabel("skew strength")
fig.tight_layout()

lg = batch(0.0, seed=2)
print("z-loss of the same logits shifted by +0, +2, +4:",
      [round(numoe.router_z_loss(lg + c), 2) for c in (0, 2, 4)])
print("padding tokens can be masked out:",
      numoe.load_balancing_loss(numoe.router_probs(lg), numoe.route(lg, k).experts,
                                mask=np.arange(T) < T // 2))
"""),
    ("md", """\
## 3. Auxiliary-loss-free balancing, step by step

DeepSeek-V3 balances without a loss term: each expert has a bias that is
added to its score **for selection only**. After every batch,
`numoe.update_bias(bias, counts, rate)` nudges the bias of an overloaded
expert down and of an underloaded one up by `rate`:
`bias + rate * sign(mean(counts) - counts)`.

We route fresh batches from the skewed router (sigmoid scores, as in
DeepSeek-V3) and update the bias after each. A fixed `rate` walks the bias
to the balanced point and then keeps it jittering by ±`rate` around it,
which caps how even the load gets; letting the rate shrink like
`1/sqrt(step)` settles it. We run both, the shrinking one until the load is
even (balancedness ≥ 0.9 for five steps in a row)."""),
    ("code", """\
strength = 2.0


def balance(rate, decay, steps, stop_at=None, seed=3, report=0):
    \"\"\"Route fresh skewed batches, updating the selection bias after each one.\"\"\"
    bias = np.zeros(E, dtype=np.float32)
    hist = {"balancedness": [], "cv": [], "bias": [], "counts": []}
    for step in range(steps):
        lg = batch(strength, seed=seed * 100_000 + step)
        r = numoe.route(lg, k, score="sigmoid", bias=bias)
        counts = numoe.expert_counts(r.experts, E)
        s = numoe.routing_stats(r.experts, E)
        hist["balancedness"].append(s["balancedness"]); hist["cv"].append(s["cv"])
        hist["bias"].append(bias.copy()); hist["counts"].append(counts)
        if report and step % report == 0:
            print(f"step {step:3d}: balancedness {s['balancedness']:.3f}  cv {s['cv']:.3f}  "
                  f"max/mean {s['max_over_mean']:.2f}")
        if stop_at and min(hist["balancedness"][-5:]) >= stop_at and step >= 4:
            print(f"step {step:3d}: balancedness {s['balancedness']:.3f} -- even for five steps")
            break
        bias = numoe.update_bias(bias, counts, rate / np.sqrt(1 + step / 10) if decay else rate)
    return bias, hist


bias, hist = balance(0.01, decay=True, steps=400, stop_at=0.9, report=10)
_, fixed = balance(0.01, decay=False, steps=150)
"""),
    ("code", """\
fig, axes = plt.subplots(1, 3, figsize=(16, 3.4))
axes[0].plot(fixed["balancedness"], color="grey", label="fixed rate 0.01")
axes[0].plot(hist["balancedness"], color="C0", lw=2, label="rate 0.01 / sqrt(1 + step/10)")
axes[0].axhline(0.9, color="k", ls="--", lw=1)
axes[0].set_xlabel("step"); axes[0].set_title("balancedness (mean/max load)"); axes[0].legend()
axes[1].plot(np.array(hist["bias"]))
axes[1].set_xlabel("step"); axes[1].set_title("selection bias per expert (shrinking rate)")
w, last = 0.4, len(hist["counts"]) - 1
axes[2].bar(np.arange(E) - w / 2, hist["counts"][0], width=w, color="C3", label="step 0")
axes[2].bar(np.arange(E) + w / 2, hist["counts"][-1], width=w, color="C2", label=f"step {last}")
axes[2].axhline(T * k / E, color="k", ls="--", lw=1)
axes[2].set_xlabel("expert"); axes[2].set_title("assignments per expert"); axes[2].legend()
fig.tight_layout()
print(f"fixed rate, last 50 steps: balancedness {np.mean(fixed['balancedness'][-50:]):.3f} on average")
"""),
    ("md", """\
The learned bias mirrors the skew: experts the router over-favours get a
negative bias, the neglected ones a positive one. Because the bias only
enters the selection, the combine weights are still the router's own
(unbiased) scores — the model's output is not distorted by a loss term
pulling on the router."""),
    ("code", """\
lg = batch(strength, seed=4)
s = numoe.router_probs(lg, "sigmoid")
r = numoe.route(lg, k, score="sigmoid", bias=bias, renormalize=False)
print("weights are the unbiased scores of the chosen experts:",
      np.allclose(r.weights, np.take_along_axis(s, r.experts, axis=1)))
print("correlation of final bias with the skew:", round(float(np.corrcoef(bias, skew)[0, 1]), 3))
"""),
]

# --------------------------------------------------------------------------- 03
PERFORMANCE = [
    ("md", """\
# numoe 03 — performance

A quick run of `numoe bench` through its Python API (`numoe.bench`), with
small shapes and short time budgets so the whole notebook runs in about a
minute on a laptop. The full suites are on the command line:
`numoe bench` (layers; `numoe bench --full` adds the larger model-shaped
rows), `numoe bench routing`, `numoe bench --latency` and
`numoe bench --startup`; their numbers, with the machine they were
measured on, are in `docs/performance.md`. Figures below are from whatever
machine executed this notebook — compare ratios within one run, not
absolute times across machines. Every table prints each time as
`median [min-max]` over its samples, a legend, and a warning when the
spread says the machine was busy."""),
    ("code", SETUP + """
import warnings
warnings.filterwarnings("ignore", message="IProgress not found")   # tqdm, via transformers
from numoe import bench

info = bench.machine_info()
print(bench.header_line(info))
"""),
    ("md", """\
## 1. Whole layers: numoe vs the NumPy reference vs PyTorch

`bench.run_layer_suite` builds each registry row with `MoELayer.random`,
checks the output against the float64 reference and times numoe, the
reference and — when PyTorch and transformers are installed — the
equivalent Hugging Face transformers MoE block with the same weights
(eager, and the `grouped_mm` experts implementation where available). Each
row gets a PASS/FAIL verdict: its error against the reference within the
stated tolerance of its dtype. The `seed-*` row is one of the original
Mixtral-shaped configurations; the `tiny-*` rows are one small layer per
model family."""),
    ("code", """\
shapes = ["seed-32x512x1024", "tiny-*"]
layers = bench.run_layer_suite(shapes, budget=0.3, hf=True)
print(bench.format_table(layers, "layers"))
"""),
    ("code", """\
def speedup_bars(ax, rows, series, label):
    # bars of other / numoe time per row (> 1: numoe is faster), values on the bars
    width = 0.8 / len(series)
    for j, (key, name) in enumerate(series):
        vals = np.array([r.get(key) or np.nan for r in rows], dtype=float)
        xs = np.arange(len(rows)) + (j - (len(series) - 1) / 2) * width
        bars = ax.bar(xs, vals, width=width, label=name)
        ax.bar_label(bars, labels=["" if np.isnan(v) else f"{v:.2g}" for v in vals],
                     fontsize=7, padding=2)
    ax.axhline(1.0, color="k", lw=1, ls="--")
    ax.set_xticks(range(len(rows)), [label(r) for r in rows], rotation=20, ha="right")
    ax.set_ylabel("speedup of numoe (> 1: numoe faster)")
    ax.set_ylim(0, 1.2 * np.nanmax([r.get(k) or np.nan for r in rows for k, _ in series]))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))


for r in layers:
    r["hf_eager_ratio"] = r["hf_eager_s"] and r["hf_eager_s"] / r["numoe_s"]
    r["hf_grouped_ratio"] = r["hf_grouped_s"] and r["hf_grouped_s"] / r["numoe_s"]
# against PyTorch when it is installed, else against the NumPy reference
series = [(key, name) for key, name in [("hf_eager_ratio", "vs PyTorch (HF eager)"),
                                         ("hf_grouped_ratio", "vs PyTorch (HF grouped_mm)")]
          if any(r.get(key) for r in layers)] or [("ref_speedup", "vs NumPy reference")]
fig, ax = plt.subplots(figsize=(11, 3.8))
speedup_bars(ax, layers, series, lambda r: r["name"])
ax.set_title("one MoE layer forward, float32: other's time / numoe's time")
fig.tight_layout()
for r in layers:
    vs = "" if r["speedup"] is None else f", best HF time / numoe = {r['speedup']:.2f}"
    print(f"{r['name']:18s} numoe {r['numoe_s'] * 1e3:7.3f} ms, "
          f"reference / numoe = {r['ref_s'] / r['numoe_s']:6.1f}{vs}; "
          f"max rel err {r['rel_err']:.1e}")
"""),
    ("md", """\
## 2. Routing and data movement

`bench.run_routing_suite` times softmax top-k routing against the
reference and PyTorch (`softmax` + `topk` + renormalise), and the dispatch
plan, permute and unpermute against the floor for moving the same bytes:
a plain `np.copyto` of the `[T*k, H]` rows."""),
    ("code", """\
routing = bench.run_routing_suite(T=16384, experts=(8, 64), ks=(2, 8), H=256, budget=0.3)
print(bench.format_table(routing, "routing"))

label = lambda r: f"E={r['E']} k={r['k']}"
for r in routing:
    r["copy_over_permute"] = r["copy_s"] / r["permute_s"]
    r["copy_over_unpermute"] = r["copy_s"] / r["unpermute_s"]
fig, axes = plt.subplots(1, 2, figsize=(14, 3.6))
speedup_bars(axes[0], routing, [(key, name) for key, name in
             [("ref_ratio", "vs NumPy reference"), ("torch_ratio", "vs PyTorch")]
             if any(r.get(key) for r in routing)], label)
axes[0].set_title(f"top-k routing of {routing[0]['T']} tokens")
speedup_bars(axes[1], routing, [("copy_over_permute", "permute"),
                                ("copy_over_unpermute", "unpermute")], label)
axes[1].set_ylabel("copy floor / time (1 = at the floor)")
axes[1].set_title(f"moving rows (H={routing[0]['H']}) against np.copyto of the same bytes")
fig.tight_layout()
"""),
    ("md", """\
## 3. A roofline

How close is the layer to this machine's limits? Two ceilings, both
measured here: the float32 GEMM rate of NumPy's BLAS (`bench.blas_gflops`,
a 2048³ `np.matmul`) and the read bandwidth of a parallel read-only pass
over 256 MiB (`bench.read_bandwidth`, a Numba `prange` sum: the layer
mostly reads weights, and a copy, which also writes, would understate it).
A kernel doing `F` FLOPs while moving `B` bytes
has arithmetic intensity `F / B`; it can run no faster than
`min(peak, intensity * bandwidth)`.

We sweep the token count of the seed layer (8 experts, top-2, hidden 512,
expert width 1024). The bytes are the weights of the experts the batch
touches (read once) plus the activations in and out. Decode-sized batches
read whole experts for a handful of rows and sit on the bandwidth slope;
larger batches reuse each weight for many rows and climb towards the GEMM
ceiling."""),
    ("code", """\
peak = bench.blas_gflops(np.float32, budget=0.5)
bw = bench.read_bandwidth(budget=0.5)
print(f"measured: sgemm {peak:.1f} GFLOP/s, read bandwidth {bw / 1e9:.1f} GB/s, "
      f"ridge at {peak * 1e9 / bw:.1f} FLOP/byte")

row = bench.ROWS["seed-32x512x1024"]
layer = numoe.MoELayer.random(bench.build_config(row), seed=0, dtype=np.float32)
points = []
for T in (1, 4, 16, 64, 256, 1024):
    x = np.random.default_rng(T).standard_normal((T, row.H)).astype(np.float32)
    t, _, _ = bench.measure(lambda: layer(x), budget=0.3)
    _, info = layer.forward(x, return_info=True)
    touched = np.unique(np.asarray(info["routing"].experts)).size
    nbytes = touched * bench.expert_bytes(layer) + layer.router.nbytes + 2 * x.nbytes
    flops = bench.layer_flops(layer, T)
    points.append((T, flops / nbytes, flops / t / 1e9))
    print(f"T={T:5d}: {t * 1e3:8.3f} ms, intensity {flops / nbytes:7.2f} FLOP/B, "
          f"{flops / t / 1e9:6.1f} GFLOP/s ({100 * flops / t / 1e9 / peak:4.1f}% of sgemm)")
"""),
    ("code", """\
ai = np.logspace(-1, 3, 200)
fig, ax = plt.subplots(figsize=(8, 4.6))
ax.loglog(ai, np.minimum(peak, ai * bw / 1e9), "k-", lw=2, label="roof: min(sgemm, AI x bandwidth)")
ax.axhline(peak, color="grey", ls=":", lw=1)
for T, x_ai, gf in points:
    ax.plot(x_ai, gf, "o", ms=8)
    ax.annotate(f"T={T}", (x_ai, gf), textcoords="offset points", xytext=(6, -10), fontsize=8)
ax.set_xlabel("arithmetic intensity (FLOP / byte)")
ax.set_ylabel("achieved GFLOP/s")
ax.set_title(f"seed layer (E={row.E}, k={row.k}, H={row.H}, F={row.F}) on this machine")
ax.legend(loc="lower right")
fig.tight_layout()
"""),
    ("md", """\
Where a point sits well below the sloped roof, the batch is small enough
that fixed costs (routing, planning, Python) dominate; on the flat part the
remaining gap to the sgemm line is the cost of many small per-expert GEMMs
instead of one large one. `numoe bench --latency` (per-call latency
percentiles on fresh tokens against the weight-read floor) and
`numoe bench --startup` (import and first-call JIT cost, cold and warm
cache) cover the rest; `numoe bench --dtype bfloat16` and
`numoe bench --weights int8` run the same tables at lower precision."""),
]

# --------------------------------------------------------------------------- 04
TRAINING = [
    ("md", """\
# numoe 04 — training an MoE layer in NumPy

`layer.backward(x, info, d_y, aux_loss_coef=..., z_loss_coef=...)` returns the
gradient of `sum(y * d_y) + aux_loss_coef * aux_loss + z_loss_coef * z_loss`
with respect to the input and every array of `layer.parameters()` — the live
arrays the layer computes with, so an optimizer step done in place changes
the next forward. Nothing here needs PyTorch: a few lines of NumPy make an
Adam optimizer.

The task is a teacher-student regression with structure for experts to
find: tokens come from 8 clusters, and each cluster has its own linear map
`y = x @ A_c`. A student MoE layer (8 experts, top-2) learns it three ways:

1. **no balancing** — the routing is whatever the gradients make it;
2. **auxiliary loss** — the Switch load-balancing loss added to the
   objective (`aux_loss_coef`), which pulls the router's scores toward an
   even load;
3. **aux-loss-free** (DeepSeek-V3) — no extra loss: after each step,
   `numoe.update_bias` nudges a selection-only bias against the load.

We watch the loss, the load per expert and, at the end, which clusters each
expert serves."""),
    ("code", SETUP + """import numba

# a tiny layer: one thread avoids the parallel start-up cost of each call
# (on a busy machine it dominates at this size)
numba.set_num_threads(1)

H, E, k, F, C = 16, 8, 2, 16, 8           # hidden, experts, top-k, expert width, clusters
rng = np.random.default_rng(0)
centers = rng.normal(0, 2.0, (C, H))
maps = rng.normal(0, 1 / np.sqrt(H), (C, H, H))


def data(n, seed):
    \"\"\"n tokens: cluster ids, inputs around the cluster centres, targets x @ A_c.\"\"\"
    g = np.random.default_rng(seed)
    c = g.integers(0, C, n)
    x = centers[c] + g.normal(0, 1, (n, H))
    y = np.einsum("nh,nhj->nj", x, maps[c])
    return x.astype(np.float32), y.astype(np.float32), c


x_val, y_val, c_val = data(2048, 10**6)
cfg = numoe.MoEConfig(E, k, H, F, selection_bias=True)    # softmax top-2, SwiGLU experts


class Adam:
    \"\"\"Adam on a dict of live arrays, updated in place.\"\"\"

    def __init__(self, params, lr=3e-3, b1=0.9, b2=0.999, eps=1e-8):
        self.p, self.lr, self.b1, self.b2, self.eps, self.t = params, lr, b1, b2, eps, 0
        self.m = {n: np.zeros_like(a) for n, a in params.items()}
        self.v = {n: np.zeros_like(a) for n, a in params.items()}

    def step(self, grads):
        self.t += 1
        for n, p in self.p.items():
            g = grads[n]
            self.m[n] = self.b1 * self.m[n] + (1 - self.b1) * g
            self.v[n] = self.b2 * self.v[n] + (1 - self.b2) * g * g
            m = self.m[n] / (1 - self.b1 ** self.t)
            v = self.v[n] / (1 - self.b2 ** self.t)
            p -= (self.lr * m / (np.sqrt(v) + self.eps)).astype(p.dtype)   # in place


def train(aux=0.0, rate=0.0, steps=200, batch=256, seed=1):
    \"\"\"Train a fresh student; `aux`: aux-loss coefficient, `rate`: update_bias rate.\"\"\"
    layer = numoe.MoELayer.random(cfg, seed=seed)
    opt = Adam(layer.parameters())
    hist = {"loss": [], "load": [], "val_step": [], "val": [], "balance": []}
    grads = None   # the gradient arrays, reused every step (out=)
    for step in range(steps):
        x, y, _ = data(batch, step)
        out, info = layer.forward(x, return_info=True)
        err = out - y
        hist["loss"].append(float(np.mean(err ** 2)))
        grads = layer.backward(x, info, 2 * err / err.size, aux_loss_coef=aux,
                               out=grads)
        opt.step(grads)
        counts = info["stats"]["counts"]
        hist["load"].append(counts / counts.sum())
        if rate:   # aux-loss-free balancing: a selection-only bias against the load
            layer.selection_bias = numoe.update_bias(layer.selection_bias, counts,
                                                     rate / np.sqrt(1 + step / 10))
        if step % 10 == 0 or step == steps - 1:
            yv, iv = layer.forward(x_val, return_info=True)
            hist["val_step"].append(step)
            hist["val"].append(float(np.mean((yv - y_val) ** 2)))
            hist["balance"].append(iv["stats"]["balancedness"])
    return layer, hist
"""),
    ("code", """\
import time

runs = {}
for name, kw in [("no balancing", {}), ("aux loss (coef 1.0)", {"aux": 1.0}),
                 ("update_bias (rate 0.003)", {"rate": 0.003})]:
    t0 = time.perf_counter()
    runs[name] = train(**kw)
    h = runs[name][1]
    print(f"{name:26s} val MSE {h['val'][0]:7.3f} -> {h['val'][-1]:.3f}   "
          f"balancedness (mean/max load on the validation set) {h['balance'][0]:.2f} -> "
          f"{h['balance'][-1]:.2f}   ({time.perf_counter() - t0:.1f} s)")
"""),
    ("md", """\
## Loss and load over training

Left: the validation MSE (all three learn the task). Middle: the
balancedness of the load on the validation set, mean over max assignments
per expert (1.0 is perfectly even). Right: each run's share of the
assignments per expert over the training steps."""),
    ("code", """\
fig, axes = plt.subplots(1, 3, figsize=(16, 3.6))
for name, (layer, h) in runs.items():
    axes[0].semilogy(h["val_step"], h["val"], label=name)
    axes[1].plot(h["val_step"], h["balance"], label=name)
axes[0].set_xlabel("step"); axes[0].set_title("validation MSE"); axes[0].legend()
axes[1].set_xlabel("step"); axes[1].set_title("balancedness (mean / max load)")
axes[1].set_ylim(0, 1.05); axes[1].legend()
share = np.concatenate([np.array(h["load"]).T for _, h in runs.values()], axis=0)
im = axes[2].imshow(share, aspect="auto", cmap="magma", vmin=0, vmax=2.5 / E)
for i in range(1, len(runs)):
    axes[2].axhline(i * E - 0.5, color="w", lw=2)
axes[2].set_yticks([E * i + E / 2 - 0.5 for i in range(len(runs))], list(runs), fontsize=7)
axes[2].set_xlabel("step"); axes[2].set_title("share of assignments per expert (rows)")
fig.colorbar(im, ax=axes[2], fraction=0.04)
fig.tight_layout()
"""),
    ("md", """\
## What the experts specialise in

For each run, the share of a cluster's assignments (rows) that each expert
(columns) receives on the validation set. A cluster sends each token to 2
experts, so a row of two cells at 0.5 is a cluster owned by one pair of
experts."""),
    ("code", """\
fig, axes = plt.subplots(1, len(runs), figsize=(15, 3.8))
for ax, (name, (layer, h)) in zip(axes, runs.items()):
    r = layer.forward(x_val, return_info=True)[1]["routing"]
    spec = np.zeros((C, E))
    for j in range(k):
        np.add.at(spec, (c_val, r.experts[:, j]), 1)
    spec /= spec.sum(axis=1, keepdims=True)
    ax.imshow(spec, cmap="Blues", vmin=0, vmax=0.5)
    for (i, j), v in np.ndenumerate(spec):
        if v >= 0.05:
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="w" if v > 0.3 else "k")
    ax.set_xlabel("expert"); ax.set_ylabel("cluster"); ax.set_title(name)
    load = numoe.expert_counts(r.experts, E)
    print(f"{name:26s} assignments per expert: {load.tolist()}")
fig.tight_layout()
"""),
    ("md", """\
The clusters are learned as units: most rows concentrate on a few experts,
so each expert serves a handful of clusters — the routing is learned from
the regression loss alone, through `route_backward` (the gradient of the
combine weights, with the chosen experts held fixed).

The two balancing methods act differently. The auxiliary loss changes the
router's *scores* (and so the combine weights) to spread the load; its
coefficient trades balance against the task loss. `update_bias` never
touches the gradients: it only shifts which experts are *chosen*, and the
combine weights stay the router's own scores — it is why DeepSeek-V3 calls
it auxiliary-loss-free. The rate shrinks like `1/sqrt(step)` so the bias
settles instead of jittering (see notebook 02).

Every gradient here is bit-identical for any number of threads, and
matches PyTorch autograd through the Hugging Face blocks
(`tests/test_parity_backward.py`)."""),
]

NOTEBOOKS = {
    "01_routing_tour.ipynb": ROUTING_TOUR,
    "02_load_balancing.ipynb": LOAD_BALANCING,
    "03_performance.ipynb": PERFORMANCE,
    "04_training.ipynb": TRAINING,
}


def build(cells):
    """A notebook object from ``("md" | "code", source)`` pairs."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    nb = new_notebook()
    nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src)
                for kind, src in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.validate(nb)
    return nb


def execute(nb, cwd, timeout=600):
    """Run every cell in a fresh kernel (in ``cwd``); raises on the first error."""
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def main(argv=None):
    import nbformat

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("only", nargs="*", help="build only notebooks whose name contains one of these")
    ap.add_argument("--no-exec", action="store_true", help="write without executing")
    args = ap.parse_args(argv)
    for name, cells in NOTEBOOKS.items():
        if args.only and not any(s in name for s in args.only):
            continue
        nb = build(cells)
        if not args.no_exec:
            t0 = time.perf_counter()
            execute(nb, HERE)
            print(f"{name}: executed in {time.perf_counter() - t0:.1f} s")
        nbformat.write(nb, HERE / name)
        print(f"wrote {HERE / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
