"""Why diffusion re-ranking does not move R@1 on the demo: measurements on one finished demo run.

Loads a demo run's stage-2 model (``<run>/stage2/model.safetensors``), encodes its test split and a
*fresh validation corpus* (same generator, another seed, never seen in training and not the test
split), and prints, as JSON lines and short tables:

(a) the generated x0 over each query's top-K candidates: the peakedness of ``softmax(temp * x0)``
    (max probability, entropy against ``ln K``) at the fusion's temperature and at the training
    loss's temperature (``diffusion.loss_temp``), and how often x0's argmax is the true target
    against WTI's top-1;
(b) the re-ranking bonus ``alpha * softmax(temp * x0)``: its spread within a row against the WTI gap
    between rank 1 and rank 2 and between rank 1 and the target;
(c) alpha / temperature / top_k chosen on the validation corpus only, then applied once to test;
(d) what re-ranking could possibly fix on test: queries whose target is outside rank 1 but inside
    the top K, and how many attributes separate the wrongly top-ranked clip from the target
    (``corpus/clips.jsonl``).

x0 is recovered from one re-ranking pass with alpha = temperature = 1: the bonus added to a row is
``softmax(x0)``, so ``log(bonus)`` is x0 up to a per-row constant, which no softmax sees; every
(alpha, temperature) is then evaluated without running the denoisers again (top_k changes what the
denoiser sees, so each K is sampled anew). Nothing here changes the library or its defaults.

    PYTHONPATH=src python benchmarks/why_rerank.py --run /tmp/demo-stage2/seed0/today --out /tmp/why_rerank
    PYTHONPATH=src python benchmarks/why_rerank.py --run /tmp/demo-stage2/seed0/today \\
        --model /tmp/demo-stage2/seed0/<variant>/stage2/model.safetensors   # another stage 2, same stage 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

ALPHAS = (0.25, 0.5, 1.0, 2.0, 4.0)
TEMPS = (1.0, 10.0, 30.0, 100.0)
TOP_KS = (2, 4, 8, 16, 32)
ATTRIBUTES = ("colour", "shape", "size", "motion", "background")


def _corpus(root: Path) -> Any:
    return SimpleNamespace(root=root, video_dir=root / "videos")


def _rank_of_target(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's target column (optimistic ties, as the demo's metrics): (N,)."""
    own = scores.gather(1, targets[:, None])
    return (scores > own).sum(1)


def _bonus(model: Any, sim: torch.Tensor, feats: Any, base: Any, top_k: int, seed: int, ctx: Any) -> dict[str, Any]:
    """softmax(x0) over each row's top-K in descending WTI order, both directions (alpha = temp = 1)."""
    from diffusionret.evaluation.evaluate import rerank_scores

    cfg = dataclasses.replace(base, top_k=top_k, alpha=1.0, temperature=1.0)
    t2v, v2t = rerank_scores(model, sim, feats, rerank=cfg, seed=seed, ctx=ctx)
    out = {}
    for name, base_sim, reranked in (("t2v", sim, t2v), ("v2t", sim.T.contiguous(), v2t)):
        k = min(top_k, base_sim.shape[1])
        top = torch.topk(base_sim, k, dim=1, largest=True, sorted=True)
        p = (reranked.double() - base_sim.double()).gather(1, top.indices)
        out[name] = {"idx": top.indices, "wti": top.values.double(), "p": p}
    return out


def _fused_ranks(d: dict[str, Any], sim: torch.Tensor, targets: torch.Tensor, alpha: float, temp: float) -> torch.Tensor:
    """Target ranks after ``sim + alpha * softmax(temp * x0)`` on the top-K, x0 = log p (row constant dropped)."""
    x0 = torch.log(d["p"].clamp_min(1e-300))
    fused = sim.double().clone()
    fused.scatter_add_(1, d["idx"], alpha * torch.softmax(temp * x0, dim=1))
    return _rank_of_target(fused, targets)


def _x0_stats(d: dict[str, Any], targets: torch.Tensor, temps: tuple[float, ...]) -> dict[str, Any]:
    """Peakedness of softmax(temp * x0) and where its argmax points, over rows with the target in the top K."""
    idx, p = d["idx"], d["p"]
    k = idx.shape[1]
    x0 = torch.log(p.clamp_min(1e-300))
    hit = idx == targets[:, None]
    inside = hit.any(1)
    target_pos = hit.float().argmax(1)
    arg = x0.argmax(1)
    row: dict[str, Any] = {
        "K": k, "queries": int(idx.shape[0]), "target_in_topK": int(inside.sum()),
        "min_softmax_x0": float(p.min()),
        "x0_spread_median": float((x0.max(1).values - x0.min(1).values).median()),
        "argmax_x0_is_target_%": round(100 * float((arg == target_pos)[inside].float().mean()), 1),
        "argmax_x0_is_wti_top1_%": round(100 * float((arg == 0)[inside].float().mean()), 1),
        "wti_top1_is_target_%": round(100 * float((target_pos == 0)[inside].float().mean()), 1),
        # Complementarity: re-ranking can only help where x0 is right and WTI is wrong.
        "rows_wti_wrong": int((inside & (target_pos > 0)).sum()),
        "  of_which_argmax_x0_is_target": int((inside & (target_pos > 0) & (arg == target_pos)).sum()),
        "rows_wti_right": int((inside & (target_pos == 0)).sum()),
        "  of_which_argmax_x0_agrees": int((inside & (target_pos == 0) & (arg == 0)).sum()),
        "x0_target_rank_mean": round(float((x0 > x0.gather(1, target_pos[:, None])).sum(1)[inside].float().mean()) + 1, 2),
        # Spearman correlation of x0 with the WTI order (positions 0..K-1) per row, median over rows.
        "x0_vs_wti_order_spearman_median": round(float(_spearman_rows(x0, -torch.arange(k).double())
                                                       .median()), 3),
    }
    for temp in temps:
        q = torch.softmax(temp * x0, dim=1)
        ent = -(q * torch.log(q.clamp_min(1e-300))).sum(1)
        row[f"temp{temp:g}"] = {"max_prob_median": round(float(q.max(1).values.median()), 4),
                                "entropy_median_over_lnK": round(float(ent.median()) / math.log(k), 4)}
    return row


def _spearman_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ra = a.argsort(1).argsort(1).double()
    rb = b.expand_as(a).argsort(1).argsort(1).double()
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))


def _gaps(d: dict[str, Any], targets: torch.Tensor, alpha: float, temp: float) -> dict[str, Any]:
    """(b): WTI gaps against the bonus's spread, and which rows the fusion reorders at the top."""
    idx, wti, p = d["idx"], d["wti"], d["p"]
    bonus = alpha * torch.softmax(temp * torch.log(p.clamp_min(1e-300)), dim=1)
    hit = idx == targets[:, None]
    inside = hit.any(1)
    pos = hit.float().argmax(1)
    gap12 = wti[:, 0] - wti[:, 1]
    spread = bonus.max(1).values - bonus.min(1).values
    diff12 = bonus[:, 1] - bonus[:, 0]  # what rank 2 gains on rank 1
    wrong = inside & (pos > 0)
    gap_t = (wti[:, 0] - wti.gather(1, pos[:, None])[:, 0])
    gain_t = bonus.gather(1, pos[:, None])[:, 0] - bonus[:, 0]

    def q(x: torch.Tensor) -> list[float]:
        return [round(float(v), 5) for v in torch.quantile(x.float(), torch.tensor([0.25, 0.5, 0.75]))] if x.numel() else []

    return {
        "alpha": alpha, "temp": temp,
        "wti_gap_rank1_rank2_q25_50_75": q(gap12),
        "bonus_spread_in_row_q25_50_75": q(spread),
        "bonus_rank2_minus_rank1_abs_q25_50_75": q(diff12.abs()),
        "rows_top1_swapped_by_bonus": int((diff12 > gap12).sum()),
        "target_rank2..K_rows": int(wrong.sum()),
        "  their_wti_gap_to_top1_q25_50_75": q(gap_t[wrong]),
        "  their_bonus_gain_over_top1_q25_50_75": q(gain_t[wrong]),
        "  their_gain_positive": int((gain_t[wrong] > 0).sum()),
        "  their_gain_exceeds_gap": int((gain_t[wrong] > gap_t[wrong]).sum()),
    }


def _r1(ranks: torch.Tensor) -> float:
    return round(100 * float((ranks == 0).float().mean()), 2)


def _attribute_distance(clips: dict[str, dict[str, str]], a: str, b: str) -> int:
    return sum(clips[a][k] != clips[b][k] for k in ATTRIBUTES)


def main() -> None:
    from diffusionret.demo.corpus import write_corpus
    from diffusionret.demo.pipeline import DemoConfig, _stage_config
    from diffusionret.distributed import DistContext
    from diffusionret.evaluation.evaluate import extract_features, similarity_matrix
    from diffusionret.models.checkpoint import load_checkpoint

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished demo run folder (read only)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/why_rerank"))
    parser.add_argument("--val-seed", type=int, default=10_007, help="seed of the fresh validation corpus")
    parser.add_argument("--model", type=Path, default=None,
                        help="another stage-2 model trained from the run's stage 1 (default: the run's own)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    metrics = json.loads((args.run / "metrics.json").read_text())
    seed = int(metrics["seed"])
    demo = DemoConfig(seed=seed)
    demo = dataclasses.replace(demo, num_workers=0, corpus=dataclasses.replace(demo.corpus, **metrics["config"]["corpus"]))
    ctx = DistContext.single("cpu")
    model_path = args.model or Path(metrics["models"]["stage2"])
    own_model = args.model is None or args.model.resolve() == Path(metrics["models"]["stage2"]).resolve()
    model = load_checkpoint(model_path).model.eval()

    # Validation: a fresh corpus from the same generator (its "test" split, distinct tuples, one
    # caption each, like the demo's test split); no clip of it was trained on or is in the test split.
    val_root = args.out / "val_corpus"
    if not (val_root / "test.csv").is_file():
        write_corpus(val_root, dataclasses.replace(demo.corpus, num_train=1), np.random.default_rng(args.val_seed))
    splits = {"val": _corpus(val_root), "test": _corpus(args.run / "corpus")}
    data: dict[str, Any] = {}
    for name, corpus in splits.items():
        run_cfg = _stage_config("generation", corpus, args.out / name, demo, Path(metrics["models"]["stage1"]))
        feats = extract_features(run_cfg, model, split="test", dist=ctx)
        sim = similarity_matrix(model, feats, chunk_size=run_cfg.eval.chunk_size, ctx=ctx, progress=False)
        c2v = feats.caption_to_video
        data[name] = SimpleNamespace(feats=feats, sim=sim, c2v=c2v, cfg=run_cfg,
                                     targets={"t2v": c2v, "v2t": torch.argsort(c2v)})
        if not bool((torch.bincount(c2v, minlength=feats.num_videos) == 1).all()):
            raise SystemExit(f"{corpus.root}: expected one caption per video")
    base = data["test"].cfg.rerank_config()
    loss_temp = float(data["test"].cfg.diffusion.loss_temp)
    eval_seed = data["test"].cfg.eval.seed

    # Bonuses for every K on both splits (the denoiser runs once per split and K).
    bonus = {name: {k: _bonus(model, d.sim, d.feats, base, k, eval_seed, ctx) for k in TOP_KS} for name, d in data.items()}

    def ranks(name: str, direction: str, k: int | None, alpha: float, temp: float) -> torch.Tensor:
        d = data[name]
        sim = d.sim if direction == "t2v" else d.sim.T.contiguous()
        if k is None:
            return _rank_of_target(sim, d.targets[direction])
        return _fused_ranks(bonus[name][k][direction], sim, d.targets[direction], alpha, temp)

    print(f"# run {args.run} (seed {seed}), stage-2 model {model_path}; fusion as evaluated: alpha {base.alpha}, temperature {base.temperature}, "
          f"top_k {base.top_k}; training loss temperature {loss_temp:g}")
    log = model_path.parent / "metrics.jsonl"
    if log.is_file():
        train_rows = [json.loads(line) for line in log.read_text().splitlines() if '"kind": "train"' in line]
        print(json.dumps({"stage2_steps": train_rows[-1]["step"], "last_gen_loss_t2v_v2t": [
            round(train_rows[-1]["gen_t2v"], 2), round(train_rows[-1]["gen_v2t"], 2)],
            "lnK_constant_output_loss": round(math.log(base.top_k), 2)}))
    print("\n## reproduction: R@1 WTI / re-ranked (reference fusion)"
          + (" vs the run's metrics.json" if own_model else ""))
    for direction in ("t2v", "v2t"):
        row = {"split": "test", "direction": direction, "R1_wti": _r1(ranks("test", direction, None, 1, 1)),
               "R1_rerank": _r1(ranks("test", direction, base.top_k, base.alpha, base.temperature))}
        if own_model:
            row["metrics.json"] = [metrics["test"]["wti"][direction]["R1"], metrics["test"]["rerank"][direction]["R1"]]
        print(json.dumps(row))

    print("\n## (a) the generated x0 over the top-K (K = 32), rows with the target inside the top K")
    for name in data:
        for direction in ("t2v", "v2t"):
            stats = _x0_stats(bonus[name][32][direction], data[name].targets[direction], (1.0, 10.0, loss_temp))
            print(json.dumps({"split": name, "direction": direction, **stats}))

    print("\n## (b) WTI gaps against the bonus alpha * softmax(temp * x0) (K = 32)")
    for name in data:
        for direction in ("t2v", "v2t"):
            for alpha, temp in ((1.0, 1.0), (1.0, loss_temp)):
                print(json.dumps({"split": name, "direction": direction,
                                  **_gaps(bonus[name][32][direction], data[name].targets[direction], alpha, temp)}))

    print("\n## (b2) R@1 t2v / v2t at K = 32 for a few fusions fixed in advance (x0 only: alpha 1000, temp 1)")
    for name in data:
        row = {"split": name, "wti": [_r1(ranks(name, dr, None, 1, 1)) for dr in ("t2v", "v2t")]}
        for label, alpha, temp in (("alpha1_temp1", 1.0, 1.0), ("alpha1_temp10", 1.0, 10.0),
                                   (f"alpha1_temp{loss_temp:g}", 1.0, loss_temp), ("x0_only", 1000.0, 1.0)):
            row[label] = [_r1(ranks(name, dr, 32, alpha, temp)) for dr in ("t2v", "v2t")]
        print(json.dumps(row))
    print("\n## (b3) the reference fusion under 5 draws of the initial noise (R@1 minus WTI R@1, points)")
    for name, d in data.items():
        deltas: dict[str, list[float]] = {"t2v": [], "v2t": []}
        for extra in range(5):
            b = _bonus(model, d.sim, d.feats, base, 32, eval_seed + extra, ctx)
            for dr in ("t2v", "v2t"):
                sim = d.sim if dr == "t2v" else d.sim.T.contiguous()
                deltas[dr].append(round(_r1(_fused_ranks(b[dr], sim, d.targets[dr], 1.0, 1.0))
                                        - _r1(_rank_of_target(sim, d.targets[dr])), 2))
        print(json.dumps({"split": name, "noise_seeds": [eval_seed + e for e in range(5)], **deltas}))

    print("\n## (c) fusion chosen on the validation corpus (mean of t2v and v2t R@1), applied once to test")
    grid = []
    for k in TOP_KS:
        for alpha in ALPHAS:
            for temp in TEMPS:
                val = [_r1(ranks("val", dr, k, alpha, temp)) for dr in ("t2v", "v2t")]
                grid.append({"K": k, "alpha": alpha, "temp": temp, "val_t2v": val[0], "val_v2t": val[1],
                             "val_mean": round(sum(val) / 2, 2)})
    val_wti = [_r1(ranks("val", dr, None, 1, 1)) for dr in ("t2v", "v2t")]
    ref = next(g for g in grid if (g["K"], g["alpha"], g["temp"]) == (32, 1.0, 1.0))
    # Ties on validation go to the reference's settings first, then to the smallest change (alpha, K).
    best = max(grid, key=lambda g: (g["val_mean"], g is ref, -g["alpha"], -g["K"]))
    print(json.dumps({"val_R1_wti": val_wti, "val_R1_reference_fusion": [ref["val_t2v"], ref["val_v2t"]]}))
    print("top 8 settings on validation:")
    for g in sorted(grid, key=lambda g: -g["val_mean"])[:8]:
        print(json.dumps(g))
    test_best = [_r1(ranks("test", dr, best["K"], best["alpha"], best["temp"])) for dr in ("t2v", "v2t")]
    test_wti = [_r1(ranks("test", dr, None, 1, 1)) for dr in ("t2v", "v2t")]
    test_ref = [_r1(ranks("test", dr, 32, 1.0, 1.0)) for dr in ("t2v", "v2t")]
    print(json.dumps({"chosen_on_val": {k: best[k] for k in ("K", "alpha", "temp")}, "test_R1_wti": test_wti,
                      "test_R1_reference_fusion": test_ref, "test_R1_chosen_fusion": test_best}))

    print("\n## (d) what re-ranking could fix on test (WTI ranks; K = 32)")
    clips = {}
    for line in (args.run / "corpus" / "clips.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["split"] == "test":
            clips[rec["video_id"]] = rec
    test_ids = [Path(v).stem for v in data["test"].feats.video_ids]
    for direction in ("t2v", "v2t"):
        r = ranks("test", direction, None, 1, 1)
        d = bonus["test"][32][direction]
        wrong = ((r > 0) & (r < 32)).nonzero()[:, 0]
        dist: dict[int, int] = {}
        which: dict[str, int] = {}
        x0_which: dict[str, int] = {}
        x0_dist: dict[int, int] = {}
        x0 = torch.log(d["p"].clamp_min(1e-300))
        for i in range(r.numel()):
            # x0's own choice among the K when it is wrong (all rows: what the denoiser confuses).
            pick = int(d["idx"][i, int(x0[i].argmax())])
            tv = int(data["test"].c2v[i]) if direction == "t2v" else i
            pv = pick if direction == "t2v" else int(data["test"].c2v[pick])
            if tv != pv:
                a, b = clips[test_ids[tv]], clips[test_ids[pv]]
                diff = [k for k in ATTRIBUTES if a[k] != b[k]]
                x0_dist[len(diff)] = x0_dist.get(len(diff), 0) + 1
                for k in diff:
                    x0_which[k] = x0_which.get(k, 0) + 1
        for i in wrong.tolist():
            # Videos index both directions: t2v row i is caption i whose video is c2v[i]; v2t row i is video i.
            top1 = int(d["idx"][i, 0])
            if direction == "t2v":
                target_vid, top_vid = int(data["test"].c2v[i]), top1
            else:
                target_vid, top_vid = i, int(data["test"].c2v[top1])
            a, b = clips[test_ids[target_vid]], clips[test_ids[top_vid]]
            diff = [k for k in ATTRIBUTES if a[k] != b[k]]
            dist[len(diff)] = dist.get(len(diff), 0) + 1
            for k in diff:
                which[k] = which.get(k, 0) + 1
        print(json.dumps({"direction": direction, "queries": int(r.numel()), "rank1": int((r == 0).sum()),
                          "rank2..5": int(((r >= 1) & (r < 5)).sum()), "rank6..32": int(((r >= 5) & (r < 32)).sum()),
                          "beyond32": int((r >= 32).sum()),
                          "attributes_differing_top1_vs_target": dict(sorted(dist.items())),
                          "which_attributes_differ_top1_vs_target": which,
                          "x0_argmax_wrong": sum(x0_dist.values()),
                          "attributes_differing_x0_argmax_vs_target": dict(sorted(x0_dist.items())),
                          "which_attributes_differ_x0_argmax_vs_target": x0_which}))
    ids = list(clips)
    one_apart = sum(1 for a in ids if any(_attribute_distance(clips, a, b) == 1 for b in ids if b != a))
    print(json.dumps({"test_clips": len(ids), "clips_with_a_neighbour_one_attribute_apart": one_apart}))


if __name__ == "__main__":
    main()
