"""The checker's default cells written plainly in NumPy, for a side-by-side timing.

Same algorithm as crates/theory/src/sim.rs for one layer, identity activation, MSE to a
linear teacher, Kaiming-uniform A, SGD and Adam, coherent and fresh inputs, the three
scalings: stacked [train; held-out] forward, hand-written backward, moments m = 1..4 of
the adapter output, of the held-out output and of the input gradient, gradient norms.
Prints one JSON line: {"seconds_per_trial": ..., "cells": ...}.
"""
import json, sys, time
import numpy as np


def moments(y):
    a = np.abs(y).astype(np.float64)
    v = y.astype(np.float64)
    return [a.mean(), (a * a).mean(), (v * a * a).mean(), (a ** 4).mean(),
            v.mean(), (a * a * a).mean()]


def run_trial(width, ranks, batch, heldout, steps, lr_sgd, lr_adam, seed):
    rng = np.random.default_rng(seed)
    d = width
    W = (rng.standard_normal((d, d), dtype=np.float32) / np.sqrt(d)).astype(np.float32)
    T = (rng.standard_normal((d, d), dtype=np.float32) / np.sqrt(d)).astype(np.float32)
    rmax = max(ranks)
    bound = 1.0 / np.sqrt(d)
    Amax = rng.uniform(-bound, bound, size=(rmax, d)).astype(np.float32)
    held = rng.standard_normal((heldout, d), dtype=np.float32)
    batches = [rng.standard_normal((batch, d), dtype=np.float32) for _ in range(steps + 1)]
    stacks = []
    for x in batches:
        u = np.concatenate([x, held], axis=0)
        stacks.append((u, u @ W.T, u @ T.T))
    cells = 0
    for reuse in ("coherent", "fresh"):
        for opt in ("sgd", "adam"):
            lr = lr_sgd if opt == "sgd" else lr_adam
            for beta in (1.0, 0.5, 0.0):
                for r in ranks:
                    cells += 1
                    gamma = np.float32(r ** -beta)
                    A = Amax[:r].copy()
                    B = np.zeros((d, r), np.float32)
                    if opt == "adam":
                        mA = np.zeros_like(A); vA = np.zeros_like(A)
                        mB = np.zeros_like(B); vB = np.zeros_like(B)
                    out = []
                    for t in range(steps + 1):
                        u, base, target = stacks[0 if reuse == "coherent" else t]
                        ax = (u @ A.T) * gamma
                        ad = ax @ B.T
                        f = base + ad
                        v = (f[:batch] - target[:batch]) / batch
                        bv = (v @ B) * gamma
                        g_in = bv @ A
                        out.append(moments(ad[:batch]) + moments(ad[batch:]) + moments(g_in) + moments(v))
                        gB = v.T @ ax[:batch]
                        gA = bv.T @ u[:batch]
                        out.append([np.linalg.norm(gA), np.linalg.norm(gB)])
                        if t == steps:
                            break
                        if opt == "sgd":
                            A -= lr * gA
                            B -= lr * gB
                        else:
                            b1, b2, eps = 0.9, 0.999, 1e-8
                            k = t + 1
                            for p, g, m, s in ((A, gA, mA, vA), (B, gB, mB, vB)):
                                m *= b1; m += (1 - b1) * g
                                s *= b2; s += (1 - b2) * g * g
                                p -= (lr / (1 - b1 ** k)) * m / (np.sqrt(s / (1 - b2 ** k)) + eps)
    return cells


if __name__ == "__main__":
    cfg = json.loads(sys.argv[1])
    trials = int(sys.argv[2])
    run_trial(cfg["width"], cfg["ranks"][:2], cfg["batch"], cfg["heldout"], 1, cfg["lr_sgd"], cfg["lr_adam"], 0)  # warm-up
    t0 = time.perf_counter()
    cells = 0
    for k in range(trials):
        cells += run_trial(cfg["width"], cfg["ranks"], cfg["batch"], cfg["heldout"], cfg["steps"], cfg["lr_sgd"], cfg["lr_adam"], k)
    dt = time.perf_counter() - t0
    gemm = np.ones((2048, 2048), np.float32)
    gemm @ gemm
    t1 = time.perf_counter()
    reps = 5
    for _ in range(reps):
        gemm @ gemm
    g = reps * 2 * 2048 ** 3 / (time.perf_counter() - t1) / 1e9
    print(json.dumps({"seconds_per_trial": dt / trials, "cells": cells, "numpy_sgemm_gflops": g}))
