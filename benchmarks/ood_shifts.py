"""Out-of-distribution scores of cell models on real shifts: which method flags what, and what flagging buys.

    python benchmarks/ood_shifts.py --model leukemia-cell \
        --loso pbc=runs/loso_pbc_s0 deepapl=runs/loso_deepapl_s0 cnmc2019=runs/loso_cnmc2019_s0 \
               all_idb2=runs/loso_all_idb2_s0 aria=runs/loso_aria_s0 \
        --json benchmarks/results/ood_shifts.json --plot benchmarks/results/ood_selective.png --card
    # the shipped model's rows again, the held-out-source rows taken from an earlier run's results file
    python benchmarks/ood_shifts.py --methods mahalanobis knn energy msp --held-out-from OLD.json --json ... --card

For every method of :mod:`leukoscope.models.ood` (fitted on the training part's embeddings, threshold keeping 95 % of
the validation part), each shift is scored against the model's own test part (in distribution):

- each source held out whole: a model trained without it (``--loso SOURCE=MODEL_DIR``) against its own test part;
  with the accuracy of all its answers on that source and of the unflagged ones;
- BCCD whole fields given to the cell model; PBC platelets (in the shipped model's training, not in the PBC-held-out
  model's);
- images that are not blood: scikit-image's sample photos (whole and cropped), its text page, noise and flat colour;
- synthetic shifts of the test images: blur, under- and over-exposure, stain (channel swap, hue rotation).

Reported per shift and method: the AUROC of the score (test part vs shift) and the share flagged; per model the
selective-prediction curve (accuracy against the share answered, most unusual left out first). Embeddings are
cached under ``--cache`` (per weights), so a rerun only recomputes the scores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np

from leukoscope.data.datasets import Dataset, load_dataset
from leukoscope.data.images import read_image
from leukoscope.evaluate.metrics import roc_auc
from leukoscope.evaluate.run import model_parts
from leukoscope.models import load_model
from leukoscope.models.modeldir import softmax
from leukoscope.models.ood import KEEP, OOD_METHODS, embed_images, fit_detector

SEED = 0


def capped(samples: list, n: int, seed: int = SEED) -> list:
    if len(samples) <= n:
        return list(samples)
    idx = np.sort(np.random.default_rng(seed).choice(len(samples), n, replace=False))
    return [samples[i] for i in idx]


class Embedder:
    """Embeds images through one model, caching (logits, embeddings) per key under ``cache``."""

    def __init__(self, model, cache: Path) -> None:
        self.model = model
        self.dir = cache / str(model.info.get("weights_sha256", "x"))[:16]
        self.dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, key: str, images: list) -> tuple[np.ndarray, np.ndarray, list[int]]:
        path = self.dir / f"{key}.npz"
        if path.exists():
            z = np.load(path)
            return z["logits"], z["features"], list(z["ok"])
        t = time.time()
        logits, feats, ok, _ = embed_images(self.model, images, progress=True, desc=key)
        np.savez(path, logits=logits, features=feats, ok=np.array(ok, int))
        print(f"  {self.model.name} {key}: {len(ok)} images in {time.time() - t:.0f} s", flush=True)
        return logits, feats, ok


def labelled(emb: Embedder, key: str, ds: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    index = {c: i for i, c in enumerate(emb.model.classes)}
    z, f, ok = emb(key, [s.path for s in ds.samples])
    return z, f, np.array([index[ds.samples[i].label] for i in ok], int)


# ---------------------------------------------------------------------------------------------------------- shifts
def blur(rgb: np.ndarray) -> np.ndarray:
    sigma = 0.015 * max(rgb.shape[:2])
    return cv2.GaussianBlur(rgb, (0, 0), sigma)


def darken(rgb: np.ndarray) -> np.ndarray:
    return (rgb.astype(np.float32) * 0.3).astype(np.uint8)


def brighten(rgb: np.ndarray) -> np.ndarray:
    return (255 - (255 - rgb.astype(np.float32)) * 0.25).astype(np.uint8)


def swap_channels(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[..., ::-1])


def hue_rotate(rgb: np.ndarray) -> np.ndarray:
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0].astype(int) + 60) % 180
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


SYNTHETIC = {"blur": blur, "underexposed": darken, "overexposed": brighten, "stain_channel_swap": swap_channels,
             "stain_hue_rotation": hue_rotate}


def not_blood(n_crops: int = 3) -> list[np.ndarray]:
    """scikit-image's sample images that ship with it (whole and ``n_crops`` random half-size crops each), its text
    page, uniform and Gaussian noise and flat colours."""
    import skimage.data as sd

    rng = np.random.default_rng(SEED)
    out = []
    names = ["astronaut", "brick", "camera", "cat", "chelsea", "checkerboard", "clock", "coffee", "coins",
             "colorwheel", "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo",
             "microaneurysms", "moon", "page", "retina", "rocket", "text", "motorcycle_left"]
    for name in names:
        try:
            im = getattr(sd, name)()
        except Exception as exc:  # noqa: BLE001  (an image this scikit-image lacks or must download: skipped, said)
            print(f"  skimage.data.{name} unavailable ({type(exc).__name__}); skipped")
            continue
        im = np.asarray(im)
        if im.dtype == bool:
            im = im.astype(np.uint8) * 255
        im = cv2.normalize(im, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8) if im.dtype != np.uint8 else im
        if im.ndim == 2:
            im = np.repeat(im[..., None], 3, 2)
        im = np.ascontiguousarray(im[..., :3])
        out.append(im)
        h, w = im.shape[:2]
        for _ in range(n_crops):
            ch, cw = h // 2, w // 2
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            out.append(np.ascontiguousarray(im[y:y + ch, x:x + cw]))
    for _ in range(10):
        out.append(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
        out.append(np.clip(rng.normal(128, 40, (256, 256, 3)), 0, 255).astype(np.uint8))
    for c in [(255, 255, 255), (0, 0, 0), (200, 160, 200), (128, 128, 128)]:
        out.append(np.full((256, 256, 3), c, np.uint8))
    return out


# ---------------------------------------------------------------------------------------------------------- scoring
def fit_all(train, val, temperature: float, methods: list[str]) -> dict:
    z_tr, f_tr, y_tr = train
    z_va, f_va = val
    return {m: fit_detector(m, (f_tr, z_tr, y_tr), (f_va, z_va), temperature, KEEP) for m in methods}


def shift_row(det, test, shift) -> dict:
    s_in, s_out = det.score(test[1], test[0]), det.score(shift[1], shift[0])
    y = np.r_[np.zeros(len(s_in)), np.ones(len(s_out))]
    return {"auroc": float(roc_auc(y, np.r_[s_in, s_out])), "flagged": float(det.flag(s_out).mean()),
            "n": int(len(s_out))}


def answers(model, logits: np.ndarray) -> np.ndarray:
    proba = softmax(logits / model.temperature)
    return np.array([model.decide(p) for p in proba], int)


def selective(correct: np.ndarray, scores: np.ndarray, flagged: np.ndarray) -> dict:
    """Accuracy against the share answered (least unusual first), and of the flagged and unflagged parts."""
    order = np.argsort(scores, kind="stable")
    cov = np.array([1.0, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5])
    curve = [float(correct[order[:max(1, int(round(c * len(order))))]].mean()) for c in cov]
    return {"coverage": cov.tolist(), "accuracy": curve, "accuracy_all": float(correct.mean()),
            "accuracy_unflagged": float(correct[~flagged].mean()) if (~flagged).any() else None,
            "accuracy_flagged": float(correct[flagged].mean()) if flagged.any() else None,
            "flagged": float(flagged.mean()), "n": int(len(correct))}


def model_block(model, cache: Path, max_train: int, methods: list[str]) -> tuple[Embedder, dict, tuple, dict]:
    emb = Embedder(model, cache)
    parts = model_parts(model)
    train = labelled(emb, "train", parts["train"].subset(capped(parts["train"].samples, max_train)))
    val = labelled(emb, "val", parts["val"])
    test = labelled(emb, "test", parts["test"])
    dets = fit_all(train, val[:2], model.temperature, methods)
    return emb, dets, test, parts


def run(args: argparse.Namespace) -> dict:
    cache = Path(args.cache)
    model = load_model(args.model)
    emb, dets, test, _ = model_block(model, cache, args.max_train, args.methods)
    bccd = load_dataset("bccd")
    pbc = load_dataset("pbc")
    platelets = [s.path for s in pbc.samples if s.labels.get("pbc_group") == "platelet"]
    test_paths = [s.path for s in capped(model_parts(model)["test"].samples, args.max_shift)]
    # each shift's images, as a function so that the quality checks can walk them again
    seen_platelets = "pbc" in model.info.get("datasets", [])
    platelet_key = "platelets_trained_on" if seen_platelets else "platelets_not_trained_on"
    makers = {"not_blood": not_blood,
              "bccd_fields": lambda: [s.path for s in capped(bccd.samples, args.max_shift)],
              platelet_key: lambda: platelets}
    for name, fn in SYNTHETIC.items():
        makers[f"synthetic_{name}"] = lambda fn=fn: (fn(read_image(p)) for p in test_paths)
    keys = {platelet_key: "platelets"}  # cache keys of earlier runs
    shifts = {name: emb(keys.get(name, name), make()) for name, make in makers.items()}

    out: dict = {"model": model.name, "weights_sha256": model.info.get("weights_sha256"), "keep": KEEP,
                 "methods": list(args.methods), "in_distribution": {}, "shifts": {}, "held_out_sources": {},
                 "selective": {}, "shipped_method": None if model.ood is None else model.ood.method}
    y_ans = answers(model, test[0])
    for m, det in dets.items():
        s = det.score(test[1], test[0])
        out["in_distribution"][m] = {"flagged": float(det.flag(s).mean()), "n": int(len(s)),
                                     "threshold": det.threshold}
        out["selective"][f"{model.name} test part/{m}"] = selective(y_ans == test[2], s, det.flag(s))
    for name, sh in shifts.items():
        out["shifts"][name] = {m: shift_row(det, test, sh) for m, det in dets.items()}
    if model.ood is not None and model.quality is not None and model.ood.method in dets:
        out["with_quality"] = with_quality(model, emb, dets[model.ood.method], test, shifts, makers, keys)

    for spec in args.loso:
        src, mdir = spec.split("=", 1)
        lm = load_model(mdir)
        if src in lm.info.get("datasets", []):
            raise SystemExit(f"{mdir} was trained on {src}: it cannot stand for {src} held out")
        l_emb, l_dets, l_test, _ = model_block(lm, cache, args.max_train, args.methods)
        ds = load_dataset(src, target=lm.info.get("target"))
        ds = ds.subset(capped(ds.samples, args.max_shift))
        held = labelled(l_emb, f"heldout_{src}", ds)
        correct = answers(lm, held[0]) == held[2]
        row: dict = {"model": str(mdir), "n": int(len(held[2]))}
        for m, det in l_dets.items():
            row[m] = shift_row(det, l_test, held)
            s = det.score(held[1], held[0])
            row[m]["selective"] = selective(correct, s, det.flag(s))
        if src == "pbc" and seen_platelets:  # platelets through a model that never saw any
            pl = l_emb("platelets", platelets)
            out["shifts"]["platelets_not_trained_on"] = {m: shift_row(det, l_test, pl) for m, det in l_dets.items()}
        out["held_out_sources"][src] = row
        print(f"{src}: " + ", ".join(f"{m} AUROC {row[m]['auroc']:.3f} flagged {row[m]['flagged']:.2f}"
                                     for m in args.methods), flush=True)
    if args.held_out_from:
        reuse_held_out(out, Path(args.held_out_from))
    out["summary"] = summary(out)
    return out


def warned(model, emb: Embedder, key: str, images) -> np.ndarray:
    """Whether each readable image gets an image-quality warning from the model's reference (cached like the
    embeddings, per quality reference)."""
    import hashlib

    from leukoscope.preprocess.quality import QUALITY_FILE

    tag = hashlib.sha256((model.path / QUALITY_FILE).read_bytes()).hexdigest()[:12]
    path = emb.dir / f"warned_{key}_{tag}.npy"
    if path.exists():
        return np.load(path)
    out = []
    for im in images:
        try:
            rgb = read_image(im) if isinstance(im, (str, Path)) else im
        except Exception:  # noqa: BLE001  (unreadable: the embeddings skipped it too)
            continue
        out.append(bool(model.quality.check(rgb)))
    arr = np.array(out, bool)
    np.save(path, arr)
    return arr


def with_quality(model, emb: Embedder, det, test, shifts: dict, makers: dict, keys: dict) -> dict:
    """The shipped detector and the quality warnings together: per shift, the share warned and the share flagged
    or warned (a user is told not to trust the answer either way); the same for the test part (false alarms)."""
    parts = model_parts(model)
    test_w = warned(model, emb, "test", [s.path for s in parts["test"].samples])
    if len(test_w) != len(test[0]):
        raise RuntimeError(f"test part: {len(test_w)} images checked, {len(test[0])} embedded")
    res = {"method": det.method, "test_part": {
        "warned": float(test_w.mean()),
        "flagged_or_warned": float((det.flag(det.score(test[1], test[0])) | test_w).mean()), "n": int(len(test_w))}}
    res["shifts"] = {}
    for name, sh in shifts.items():
        w = warned(model, emb, keys.get(name, name), makers[name]())
        if len(w) != len(sh[0]):
            raise RuntimeError(f"{name}: {len(w)} images checked, {len(sh[0])} embedded")
        f = det.flag(det.score(sh[1], sh[0]))
        res["shifts"][name] = {"warned": float(w.mean()), "flagged_or_warned": float((f | w).mean()), "n": len(w)}
    return res


def reuse_held_out(out: dict, path: Path) -> None:
    """Take the held-out-source rows (and the platelets through the PBC-held-out model) of an earlier results file:
    they depend only on the leave-one-source-out models, not on the model scored here. Refused when the earlier file
    lacks one of this run's methods; the rows keep a note of where they come from."""
    old = json.loads(path.read_text())
    missing = [m for m in out["methods"] if m not in old["methods"]]
    if missing:
        raise SystemExit(f"{path} has no held-out rows for {missing}: run with --methods {' '.join(old['methods'])}")
    keep = lambda row: {k: v for k, v in row.items() if k not in old["methods"] or k in out["methods"]}  # noqa: E731
    for src, row in old["held_out_sources"].items():
        if src not in out["held_out_sources"]:
            out["held_out_sources"][src] = keep(row) | {"from": str(path), "from_seconds": old.get("seconds")}
    if "platelets_not_trained_on" in old["shifts"] and "platelets_not_trained_on" not in out["shifts"]:
        out["shifts"]["platelets_not_trained_on"] = keep(old["shifts"]["platelets_not_trained_on"])
    out["held_out_from"] = {"path": str(path), "weights_sha256": old.get("weights_sha256")}


def summary(out: dict) -> dict:
    """Per method: mean AUROC over the shifts and held-out sources, the share of non-blood images flagged and of
    in-distribution test images flagged."""
    res = {}
    for m in out["methods"]:
        aucs = [v[m]["auroc"] for v in out["shifts"].values()] + [v[m]["auroc"] for v in
                                                                   out["held_out_sources"].values()]
        res[m] = {"mean_auroc": float(np.mean(aucs)), "not_blood_flagged": out["shifts"]["not_blood"][m]["flagged"],
                  "test_flagged": out["in_distribution"][m]["flagged"],
                  "held_out_unflagged_beats_all": all(
                      (v[m]["selective"]["accuracy_unflagged"] or 0) > v[m]["selective"]["accuracy_all"]
                      for v in out["held_out_sources"].values()) if out["held_out_sources"] else None}
    return res


def plot(out: dict, path: Path, method: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    curves = {k.split("/")[0]: v for k, v in out["selective"].items() if k.endswith("/" + method)}
    curves |= {f"{src} held out": v[method]["selective"] for src, v in out["held_out_sources"].items()}
    for name, c in curves.items():
        ax.plot(c["coverage"], c["accuracy"], marker="o", ms=3, label=name)
    ax.invert_xaxis()
    ax.set_xlabel("share of images answered (most unusual left out first)")
    ax.set_ylabel("accuracy of the answered images")
    ax.set_title(f"Selective prediction, {method} score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="leukemia-cell")
    ap.add_argument("--loso", nargs="*", default=[], metavar="SOURCE=MODEL_DIR")
    ap.add_argument("--methods", nargs="+", default=list(OOD_METHODS), choices=OOD_METHODS)
    ap.add_argument("--held-out-from", default=None, metavar="JSON",
                    help="take the held-out-source rows of an earlier results file instead of --loso models (the "
                         "leave-one-source-out models are not shipped; their rows do not depend on --model)")
    ap.add_argument("--max-train", type=int, default=4000)
    ap.add_argument("--max-shift", type=int, default=600)
    ap.add_argument("--cache", default=".cache/ood_benchmark")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--plot-method", default=None, help="default: the method of the model's stored detector")
    ap.add_argument("--card", action="store_true",
                    help="also write the results into the model directory (ood_shifts.json) and its card's section "
                         "'When not to trust an answer' (for the method of its stored detector)")
    args = ap.parse_args()
    t = time.time()
    out = run(args)
    out["seconds"] = round(time.time() - t, 1)
    text = json.dumps(out, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    print(json.dumps(out["summary"], indent=1))
    if args.plot:
        plot(out, Path(args.plot), args.plot_method or out["shipped_method"] or args.methods[0])
    if args.card:
        from leukoscope.train.trust import SHIFTS_FILE, write_trust_section

        model = load_model(args.model)
        (model.path / SHIFTS_FILE).write_text(text)
        write_trust_section(model.path)


if __name__ == "__main__":
    main()
