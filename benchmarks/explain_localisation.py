"""Do the heatmaps look at the right place, and are they faithful to the model? One table per question.

1. C-NMC 2019 single cells on black: share of heatmap mass inside the cell (mask = the non-black region, holes
   filled) and how often the peak lies on it. Target: mass share >= 0.9. When the model directory holds a
   ``split.json`` that names C-NMC images, only its ``test`` part (held-out subjects) is used, or with ``--part val``
   its validation part: for choosing between runs (seeds, recipes) without using the cells that report.
2. ALL-IDB1 fields with expert white-cell masks (5 fields, 63 blasts): (a) a 257 x 257 window centred on each blast
   centroid (clamped inside the field; the ALL-IDB2 crop size); (b) the field tiled into 257 x 257 windows, keeping
   those with >= 2 % white-cell pixels (``--max-windows`` keeps an evenly spaced subset of each). Reported: how
   often the peak falls inside a white cell, against chance (the white-cell share of the window), and the heat mass
   inside white cells.
3. Faithfulness on the C-NMC images: deletion AUC (remove the hottest pixels first, to black; lower is better) and
   insertion AUC (restore them first into a blurred image; higher is better) of the calibrated probability of the
   explained (predicted) class, for every method and for a random map as smooth as a 7 x 7 CAM. A method beats the
   baseline when its mean deletion is lower and its mean insertion higher (and *clearly* when the 95 % bootstrap CIs
   of both paired differences, method minus random on the same images, exclude 0); ``win`` is the share of images where
   insertion - deletion is larger than the random map's. Also ROAD (``--road-percentiles``; ``--no-road`` skips it):
   the removed pixels are imputed from their neighbours instead of set to black or blurred, so the model is not
   scored on images unlike any it saw; MoRF (lower is better) and LeRF (higher is better), mean probability over the
   percentiles. A method beats the baseline on ROAD when its MoRF is lower and its LeRF higher than the random map's.
   Each pair of curves also as one number, the usual summaries: insertion - deletion, and ROAD combined =
   (LeRF - MoRF) / 2 (higher is better for both), method minus random map with the same kind of CI. A map can lose
   on one side of a pair (e.g. insertion) and still rank the pixels better overall; the combined score says which.
   The cell's own mask, used as a map, is scored the same way (``cell mask (reference)``): what a map that meets the
   localisation target exactly gets in these tests.

    nice -n 10 python benchmarks/explain_localisation.py                        # leukemia-cell, all methods
    python benchmarks/explain_localisation.py --model /path/to/model --methods gradcam occlusion --n-cells 20

Writes benchmarks/results/explain_localisation_<model name>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from leukoscope.data.datasets import load_dataset
from leukoscope.data.images import read_image
from leukoscope.explain import METHODS, gradcam_array
from leukoscope.explain.record import RECORD_FILE, record_from_results, weights_sha256
from leukoscope.models import load_model
from leukoscope.research.faithfulness import (
    ROAD_PERCENTILES,
    deletion_insertion,
    differences,
    model_score_fn,
    paired_difference,
    random_map,
    road,
)

RESULTS = Path(__file__).resolve().parent / "results"
WINDOW = 257
SLOW = {"scorecam"}
# Not a method: the cell's own mask as a map (1 on the cell, 0 elsewhere), scored like the methods. It is what a map
# meeting the localisation target perfectly would get in the faithfulness tests.
REFERENCE = "cell mask (reference)"


def cell_mask(rgb: np.ndarray) -> np.ndarray:
    """The non-black region of a C-NMC image, holes filled (dark chromatin inside a nucleus is still the cell)."""
    fg = rgb.max(axis=2) > 15
    fg = cv2.morphologyEx(fg.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)).astype(bool)
    return ndimage.binary_fill_holes(fg)


def heldout_names(model_path: Path, part: str = "test") -> set[str] | None:
    split = model_path / "split.json"
    if not split.exists():
        return None
    parts = json.loads(split.read_text()).get("parts", {})
    seen = [Path(p).name for part in parts.values() for p in part]
    if not any(n.startswith("UID_") for n in seen):
        return None  # the model never saw C-NMC 2019
    return {Path(p).name for p in parts.get(part, [])}


def windows_around(points: list[tuple[int, int]], w: int, h: int) -> list[tuple[int, int]]:
    out = []
    for x, y in points:
        x0 = int(np.clip(x - WINDOW // 2, 0, w - WINDOW))
        y0 = int(np.clip(y - WINDOW // 2, 0, h - WINDOW))
        out.append((x0, y0))
    return out


def tiles(w: int, h: int) -> list[tuple[int, int]]:
    xs = list(range(0, w - WINDOW + 1, WINDOW))
    ys = list(range(0, h - WINDOW + 1, WINDOW))
    if xs[-1] + WINDOW < w:
        xs.append(w - WINDOW)
    if ys[-1] + WINDOW < h:
        ys.append(h - WINDOW)
    return [(x, y) for y in ys for x in xs]


def peak_in(heat: np.ndarray, mask: np.ndarray) -> bool:
    return bool(mask[np.unravel_index(int(np.argmax(heat)), heat.shape)])


def mass_in(heat: np.ndarray, mask: np.ndarray) -> float:
    total = float(heat.sum())
    return float(heat[mask].sum()) / total if total > 0 else float("nan")


def summary(values: list[float]) -> dict:
    a = np.asarray(values, np.float64)
    a = a[~np.isnan(a)]
    if not len(a):
        return {"mean": float("nan"), "median": float("nan"), "n": 0}
    return {"mean": float(a.mean()), "median": float(np.median(a)), "q10": float(np.quantile(a, 0.1)), "n": int(len(a))}


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    methods = args.methods or METHODS.names()
    data_root = Path(args.data_root) if args.data_root else None
    result: dict = {"model": model.name, "model_path": str(model.path), "backend": model.backend,
                    "target_layer": model.target_layer, "methods": methods, "python": platform.python_version(),
                    "torch": torch.__version__, "args": {k: v for k, v in vars(args).items() if k != "func"},
                    "weights_sha256": weights_sha256(model.path), "date": time.strftime("%Y-%m-%d")}

    # ---- 1. C-NMC 2019 cells ------------------------------------------------------------------------------------
    cnmc = load_dataset("cnmc2019", root=data_root / "cnmc2019" if data_root else None)
    held = heldout_names(model.path, args.part)
    samples = [s for s in cnmc.samples if held is None or s.path.name in held]
    step = max(1, len(samples) // args.n_cells)
    samples = samples[::step][:args.n_cells]
    selection = (f"the {args.part} part of the model's split (held-out subjects)" if held is not None
                 else "all (the model never saw C-NMC 2019)")
    result["cnmc"] = {"images": len(samples), "selection": selection, "part": args.part, "every_kth": step}
    per: dict[str, dict[str, list]] = {m: {"mass": [], "peak": [], "del": [], "ins": [], "sec": [], "win": [],
                                           "morf": [], "lerf": [], "win_road": []}
                                       for m in [*methods, REFERENCE, "random"]}
    pcts = tuple(args.road_percentiles) if not args.no_road else ()
    size = model.input_size
    areas = []
    for i, s in enumerate(samples):
        rgb = read_image(s.path)
        mask = cell_mask(rgb)
        areas.append(float(mask.mean()))
        k = int(model.predict_arrays([rgb])[0].argmax())
        prepared = model.preprocess.prepare(rgb)
        score = model_score_fn(model, k)
        rnd = random_map(size, seed=i)
        rnd_full = model.preprocess.to_image(rnd, rgb)  # zero outside a crop (Preprocess.crop), like the methods' maps
        base = deletion_insertion(score, prepared, rnd, steps=args.steps, seed=i)
        per["random"]["mass"].append(mass_in(rnd_full, mask))
        per["random"]["peak"].append(peak_in(rnd_full, mask))
        per["random"]["del"].append(base["deletion"])
        per["random"]["ins"].append(base["insertion"])
        if pcts:
            base_road = road(score, prepared, rnd, percentiles=pcts, seed=i)
            per["random"]["morf"].append(base_road["morf"])
            per["random"]["lerf"].append(base_road["lerf"])
        for m in [*methods, REFERENCE]:
            if m in SLOW and i >= args.n_slow:
                continue
            t = time.perf_counter()
            heat = mask.astype(np.float32) if m == REFERENCE else gradcam_array(model, rgb, target_class=k, method=m)
            per[m]["sec"].append(time.perf_counter() - t)
            per[m]["mass"].append(mass_in(heat, mask))
            per[m]["peak"].append(peak_in(heat, mask))
            small = model.preprocess.to_input(heat, rgb)  # over the image the model sees
            f = deletion_insertion(score, prepared, small, steps=args.steps, seed=i)
            per[m]["del"].append(f["deletion"])
            per[m]["ins"].append(f["insertion"])
            per[m]["win"].append(f["insertion"] - f["deletion"] > base["insertion"] - base["deletion"])
            if pcts:
                r = road(score, prepared, small, percentiles=pcts, seed=i)
                per[m]["morf"].append(r["morf"])
                per[m]["lerf"].append(r["lerf"])
                per[m]["win_road"].append(r["combined"] > base_road["combined"])
        print(f"  cnmc {i + 1}/{len(samples)}", end="\r", flush=True)
    result["cnmc"]["cell_area_fraction"] = summary(areas)
    result["cnmc"]["methods"] = {
        m: {"mass_in_cell": summary(v["mass"]), "peak_in_cell": float(np.mean(v["peak"])) if v["peak"] else None,
            "deletion_auc": summary(v["del"]), "insertion_auc": summary(v["ins"]),
            "win_vs_random": float(np.mean(v["win"])) if v["win"] else None,
            "road_morf": summary(v["morf"]) if v["morf"] else None,
            "road_lerf": summary(v["lerf"]) if v["lerf"] else None,
            "road_win_vs_random": float(np.mean(v["win_road"])) if v["win_road"] else None,
            "seconds_per_image_median": float(np.median(v["sec"])) if v["sec"] else None, "n": len(v["mass"])}
        for m, v in per.items()}
    rnd_del, rnd_ins = np.mean(per["random"]["del"]), np.mean(per["random"]["ins"])
    for m in [*methods, REFERENCE]:
        r = result["cnmc"]["methods"][m]
        # the random baseline over the same images as the method (Score-CAM runs on fewer)
        n = r["n"]
        rd, ri = np.mean(per["random"]["del"][:n]), np.mean(per["random"]["ins"][:n])
        r["random_deletion_same_images"], r["random_insertion_same_images"] = float(rd), float(ri)
        r["beats_random"] = bool(r["deletion_auc"]["mean"] < rd and r["insertion_auc"]["mean"] > ri)
        # paired differences (method - random) over the same images: deletion / MoRF should be < 0, insertion /
        # LeRF > 0; "clearly" = the whole 95 % CI on the right side of 0
        r["paired_vs_random"] = {"deletion": paired_difference(per[m]["del"], per["random"]["del"]),
                                 "insertion": paired_difference(per[m]["ins"], per["random"]["ins"])}
        pv = r["paired_vs_random"]
        r["beats_random_clearly"] = bool(pv["deletion"]["ci"][1] < 0 and pv["insertion"]["ci"][0] > 0)
        # the usual one-number summaries of each pair of curves: insertion - deletion, and ROAD's (LeRF - MoRF) / 2
        pv["insertion_minus_deletion"] = paired_difference(differences(per[m]["ins"], per[m]["del"]),
                                                           differences(per["random"]["ins"], per["random"]["del"]))
        r["beats_random_combined_clearly"] = bool(pv["insertion_minus_deletion"]["ci"][0] > 0)
        if pcts:
            rm, rl = np.mean(per["random"]["morf"][:n]), np.mean(per["random"]["lerf"][:n])
            r["random_road_morf_same_images"], r["random_road_lerf_same_images"] = float(rm), float(rl)
            r["beats_random_road"] = bool(r["road_morf"]["mean"] < rm and r["road_lerf"]["mean"] > rl)
            pv["road_morf"] = paired_difference(per[m]["morf"], per["random"]["morf"])
            pv["road_lerf"] = paired_difference(per[m]["lerf"], per["random"]["lerf"])
            r["beats_random_road_clearly"] = bool(pv["road_morf"]["ci"][1] < 0 and pv["road_lerf"]["ci"][0] > 0)
            pv["road_combined"] = paired_difference(differences(per[m]["lerf"], per[m]["morf"], 0.5),
                                                    differences(per["random"]["lerf"], per["random"]["morf"], 0.5))
            r["beats_random_road_combined_clearly"] = bool(pv["road_combined"]["ci"][0] > 0)
        r["per_image"] = {k: per[m][k] for k in ("mass", "del", "ins", "morf", "lerf")}
    result["cnmc"]["random"] = {"deletion_auc": float(rnd_del), "insertion_auc": float(rnd_ins),
                                "per_image": {k: per["random"][k] for k in ("mass", "del", "ins", "morf", "lerf")}}
    result["cnmc"]["road_percentiles"] = list(pcts)

    # ---- 2. ALL-IDB1 fields with white-cell masks --------------------------------------------------------------
    idb = load_dataset("all_idb1", root=data_root / "all_idb" if data_root else None)
    fields = [s for s in idb.samples if s.meta.get("wbc_mask") is not None]
    field_res: dict[str, dict[str, list]] = {kind: {m: [] for m in [*methods, "chance", "mass"]}
                                             for kind in ("blast_windows", "tiles")}
    masses: dict[str, dict[str, list]] = {kind: {m: [] for m in methods} for kind in ("blast_windows", "tiles")}
    n_blasts = 0
    images, masks_, jobs = {}, {}, {"blast_windows": [], "tiles": []}
    for s in fields:
        rgb = read_image(s.path)
        wbc = np.asarray(Image.open(s.meta["wbc_mask"]).convert("L")) > 0
        h, w = wbc.shape
        if rgb.shape[:2] != (h, w):
            raise ValueError(f"mask {wbc.shape} and field {rgb.shape[:2]} differ: {s.path}")
        images[s.path.stem], masks_[s.path.stem] = rgb, wbc
        n_blasts += len(s.meta["blasts"])
        jobs["blast_windows"] += [(s.path.stem, *xy) for xy in windows_around(s.meta["blasts"], w, h)]
        jobs["tiles"] += [(s.path.stem, *t) for t in tiles(w, h)
                          if wbc[t[1]:t[1] + WINDOW, t[0]:t[0] + WINDOW].mean() >= 0.02]
    for kind, wins in jobs.items():
        if args.max_windows and len(wins) > args.max_windows:
            wins = [wins[int(i)] for i in np.linspace(0, len(wins) - 1, args.max_windows).round()]
        for j, (stem, x0, y0) in enumerate(wins):
            crop = np.ascontiguousarray(images[stem][y0:y0 + WINDOW, x0:x0 + WINDOW])
            m_crop = masks_[stem][y0:y0 + WINDOW, x0:x0 + WINDOW]
            field_res[kind]["chance"].append(float(m_crop.mean()))
            for m in methods:
                if m in SLOW and j >= args.n_slow:
                    continue
                heat = gradcam_array(model, crop, method=m)
                field_res[kind][m].append(peak_in(heat, m_crop))
                masses[kind][m].append(mass_in(heat, m_crop))
            print(f"  {kind} {j + 1}/{len(wins)}      ", end="\r", flush=True)
    result["all_idb1"] = {"fields": [s.path.stem for s in fields], "blasts": n_blasts, "window": WINDOW}
    for kind in ("blast_windows", "tiles"):
        r = {"windows": len(field_res[kind]["chance"]),
             "chance_peak_in_wbc": float(np.mean(field_res[kind]["chance"]))}
        for m in methods:
            v = field_res[kind][m]
            r[m] = {"peak_in_wbc": float(np.mean(v)) if v else None, "n": len(v),
                    "mass_in_wbc": summary(masses[kind][m])}
        result["all_idb1"][kind] = r
    return result


def table(res: dict) -> str:
    c = res["cnmc"]
    lines = [f"model {res['model']} ({res['model_path']}, backend {res['backend']}, "
             f"target layer {res['target_layer']})",
             "",
             f"C-NMC 2019: {c['images']} images ({c['selection']}); cell covers "
             f"{c['cell_area_fraction']['mean']:.2f} of the image on average",
             "| method | n | mass in cell (mean / median / q10) | peak on cell | deletion AUC (lower) | "
             "insertion AUC (higher) | beats random | win rate | s/image |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m, r in c["methods"].items():
        mass = r["mass_in_cell"]
        extra = ("—", "—", "—") if m == "random" else (
            "yes" if r["beats_random"] else "NO", f"{r['win_vs_random']:.2f}", f"{r['seconds_per_image_median']:.2f}")
        q10 = mass.get("q10", float("nan"))
        lines.append(f"| {m} | {r['n']} | {mass['mean']:.3f} / {mass['median']:.3f} / {q10:.3f}"
                     f" | {r['peak_in_cell']:.2f} | {r['deletion_auc']['mean']:.3f} | {r['insertion_auc']['mean']:.3f}"
                     f" | {extra[0]} | {extra[1]} | {extra[2]} |")
    lines += ["", "Method minus random map on the same images, mean [95 % bootstrap CI over images]: deletion and "
                  "ROAD MoRF should be below 0, insertion and ROAD LeRF above",
              "| method | deletion | insertion | ROAD MoRF | ROAD LeRF | clearly beats random: del/ins, ROAD | "
              "insertion - deletion | ROAD (LeRF - MoRF) / 2 |",
              "|---|---|---|---|---|---|---|---|"]

    def ci(x: dict | None) -> str:
        return "—" if not x else f"{x['mean']:+.3f} [{x['ci'][0]:+.3f}, {x['ci'][1]:+.3f}]"

    for m, r in c["methods"].items():
        if m == "random":
            continue
        pv = r["paired_vs_random"]
        road_ok = r.get("beats_random_road_clearly")
        lines.append(f"| {m} | {ci(pv['deletion'])} | {ci(pv['insertion'])} | {ci(pv.get('road_morf'))} | "
                     f"{ci(pv.get('road_lerf'))} | {'yes' if r['beats_random_clearly'] else 'no'}, "
                     f"{'—' if road_ok is None else 'yes' if road_ok else 'no'} | "
                     f"{ci(pv.get('insertion_minus_deletion'))} | {ci(pv.get('road_combined'))} |")
    if c.get("road_percentiles"):
        lines += ["", f"ROAD on the same images (removed pixels imputed from their neighbours; percentiles "
                      f"{c['road_percentiles']}): mean probability of the explained class",
                  "| method | n | MoRF (lower) | LeRF (higher) | random MoRF / LeRF, same images | beats random "
                  "| win rate |",
                  "|---|---|---|---|---|---|---|"]
        for m, r in c["methods"].items():
            if m == "random" or r.get("road_morf") is None:
                continue
            lines.append(f"| {m} | {r['n']} | {r['road_morf']['mean']:.3f} | {r['road_lerf']['mean']:.3f} | "
                         f"{r['random_road_morf_same_images']:.3f} / {r['random_road_lerf_same_images']:.3f} | "
                         f"{'yes' if r['beats_random_road'] else 'NO'} | {r['road_win_vs_random']:.2f} |")
    a = res["all_idb1"]
    lines += ["", f"ALL-IDB1: fields {', '.join(a['fields'])} ({a['blasts']} blasts), {a['window']}x{a['window']} "
                  "windows; peak inside a white cell (mass inside white cells)"]
    methods = [m for m in c["methods"] if m not in ("random", REFERENCE)]
    lines += ["| windows | n | chance | " + " | ".join(methods) + " |", "|---|---|---|" + "---|" * len(methods)]
    for kind, title in (("blast_windows", "centred on blasts"), ("tiles", "tiles with >= 2% WBC")):
        r = a[kind]
        cells = [f"{r[m]['peak_in_wbc']:.2f} ({r[m]['mass_in_wbc']['mean']:.2f}; n={r[m]['n']})" for m in methods]
        lines.append(f"| {title} | {r['windows']} | {r['chance_peak_in_wbc']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="leukemia-cell")
    p.add_argument("--methods", nargs="*", default=None, help="default: every registered method")
    p.add_argument("--n-cells", type=int, default=60, help="C-NMC images (evenly spaced over the selection)")
    p.add_argument("--n-slow", type=int, default=10, help="images for Score-CAM (one forward pass per channel)")
    p.add_argument("--max-windows", type=int, default=0, help="ALL-IDB1 windows per kind, evenly spaced (0: all)")
    p.add_argument("--steps", type=int, default=16, help="points on the deletion / insertion curves, minus one")
    p.add_argument("--road-percentiles", type=int, nargs="+", default=list(ROAD_PERCENTILES),
                   help="shares of the pixels ROAD removes, in percent")
    p.add_argument("--no-road", action="store_true", help="skip ROAD (it solves one sparse system per point)")
    p.add_argument("--part", choices=("test", "val"), default="test",
                   help="which part of the model's split the C-NMC cells come from: val to choose between runs "
                        "(e.g. seeds) without looking at the test cells, test to report")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--record", action="store_true",
                   help=f"also write the faithfulness verdicts into the model directory's {RECORD_FILE} (what "
                        "`leukoscope explain` tells its reader; test part only)")
    p.add_argument("--record-from", nargs="+", metavar="RESULTS_JSON",
                   help=f"no run: write the model's {RECORD_FILE} from earlier results files of the same weights "
                        "(later files update the methods they measured)")
    args = p.parse_args()
    if args.record_from:
        write_record(Path(load_model(args.model).path), [json.loads(Path(f).read_text()) for f in args.record_from])
        return
    t = time.time()
    res = run(args)
    res["wall_seconds"] = time.time() - t
    out = Path(args.out) if args.out else RESULTS / f"explain_localisation_{res['model']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(" " * 40)
    print(table(res))
    print(f"\nwrote {out} ({res['wall_seconds']:.0f} s)")
    if args.record:
        write_record(Path(res["model_path"]), [res])


def write_record(model_dir: Path, results: list[dict]) -> None:
    """Merge results (held-out or never-seen C-NMC cells, these weights) into ``model_dir``'s faithfulness record."""
    sha = weights_sha256(model_dir)
    path = model_dir / RECORD_FILE
    rec = json.loads(path.read_text()) if path.is_file() else None
    for res in results:
        if Path(res["model_path"]).resolve() != model_dir.resolve():
            raise SystemExit(f"results of {res['model_path']}, not of {model_dir}")
        if res.get("weights_sha256", sha) != sha:
            raise SystemExit(f"results of other weights than {model_dir}/model.safetensors (sha256 differs)")
        sel = res["cnmc"].get("selection", "")
        if res["cnmc"].get("part", "test") != "test" or not ("test part" in sel or sel.startswith("all")):
            raise SystemExit(f"results on {sel!r}: only held-out test cells (or cells the model never saw) go into "
                             "the record")
        rec = record_from_results(res, rec, sha, kind="cutout", title="C-NMC 2019 cells cut out onto black")
    path.write_text(json.dumps(rec, indent=1) + "\n")
    for name, m in rec["methods"].items():
        p = m.get("insertion_minus_deletion") or {}
        print(f"{name:>24}: {p.get('verdict', 'not measured')} ({p.get('mean', float('nan')):+.3f}, n={m['n_cells']})")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
