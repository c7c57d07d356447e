"""Train oasisvq VQ-VAE presets on the real OASIS data in ../shared/data for a fixed time budget and print
held-out SSIM/PSNR beside the non-learned floors.

    python benchmarks/reconstruction.py --minutes 30 --presets cpu

Training data: the t88 PNG train split + the train subjects of the MNI volumes (split by subject, seed 0).
Held out: the t88 test slices (20 subjects) and the volume slices of the test subject.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import time
from pathlib import Path

import torch

from oasisvq.config import DataConfig, RunConfig, TrainConfig, model_preset
from oasisvq.evaluation import evaluate, floor_name
from oasisvq.tokenizer import load_model, train

DATA = Path(os.environ.get("OASISVQ_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="training budget per preset")
    p.add_argument("--presets", default="cpu", help="comma-separated model presets")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=Path("runs/bench-reconstruction"))
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--ssim-weight", type=float, default=None, help="weight of the SSIM loss (default: the preset's)")
    a = p.parse_args()
    t88, vols = DATA / "oasis1_t88_axial", DATA / "oasis1_mni_volumes"
    if not t88.is_dir() or not vols.is_dir():
        raise SystemExit(f"benchmark skipped: real data not found under {DATA} (set OASISVQ_SHARED_DATA)")
    rows = []
    for preset in a.presets.split(","):
        model = model_preset(preset)
        if a.ssim_weight is not None:
            model.ssim_weight = a.ssim_weight
        cfg = RunConfig(data=DataConfig(paths=[str(t88), str(vols)]), model=model,
                        train=TrainConfig(epochs=0, max_minutes=a.minutes, batch_size=a.batch_size, device=a.device,
                                          evals_per_epoch=2, val_slices=128))
        run = a.out / preset
        t0 = time.time()
        train(cfg, run, overwrite=True, cache_dir=a.cache_dir, progress=False)
        wall = time.time() - t0
        params = sum(v.numel() for v in load_model(run, "best")[0].parameters())
        with open(run / "metrics.csv", newline="") as f:
            ips = float(list(csv.DictReader(f))[-1]["images_per_s"])
        for name, src in (("t88 test", t88), ("volume test subject", vols)):
            m = evaluate(run, data=[str(src)], split="test", out=run / f"eval-{src.name}", cache_dir=a.cache_dir,
                         progress=False)
            floor = floor_name(m)
            rows.append({"preset": preset, "ssim_weight": model.ssim_weight,
                         "grid": f"{m['code_grid']}x{m['code_grid']}", "params": params,
                         "img_per_s": ips, "train_min": a.minutes, "wall_min": round(wall / 60, 1), "held_out": name,
                         "slices": m["slices"], "ssim": m["model"]["ssim"]["mean"], "ssim_std": m["model"]["ssim"]["std"],
                         "ssim_head": m["model"]["ssim_head"]["mean"], "psnr": m["model"]["psnr"]["mean"],
                         "floor_ssim": m["floors"][floor]["ssim"]["mean"],
                         "floor_ssim_head": m["floors"][floor]["ssim_head"]["mean"],
                         "black_ssim": m["floors"]["all_black"]["ssim"]["mean"],
                         "codes_used": m["codebook"]["codes_used"]})
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    if torch.cuda.is_available() and a.device != "cpu":
        machine += f", {torch.cuda.get_device_name()}"
    print(f"\nmachine: {machine}")
    hdr = ("preset | SSIM loss weight | grid | params | train img/s | budget min | held-out | n | SSIM mean +- std | "
           "SSIM in head | PSNR dB | down-f-up SSIM | down-f-up in head | all-black SSIM | codes used")
    print("| " + hdr + " |\n|" + "---|" * len(hdr.split("|")))
    for r in rows:
        print(f"| {r['preset']} | {r['ssim_weight']:g} | {r['grid']} | {r['params'] / 1e6:.2f}M | {r['img_per_s']:.1f} | "
              f"{r['train_min']:g} | "
              f"{r['held_out']} | {r['slices']} | {r['ssim']:.4f} +- {r['ssim_std']:.4f} | {r['ssim_head']:.4f} | "
              f"{r['psnr']:.2f} | {r['floor_ssim']:.4f} | {r['floor_ssim_head']:.4f} | {r['black_ssim']:.4f} | "
              f"{r['codes_used']} |")
    (a.out / "results.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
