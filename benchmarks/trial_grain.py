"""Trial (not adopted): add back, as Gaussian noise inside the head, the power a tokeniser removes, and see
what the two-sample test makes of decoded real slices and of samples with and without it.

    PYTHONPATH=src python benchmarks/trial_grain.py --split validate RUN SAMPLES_DIR [SAMPLES_DIR ...]

The noise spectrum is estimated on 256 training slices only: real minus reconstructed 2-D power, above the
first radius where the reconstruction keeps less than 90% of the real power, scaled to the head's share of
the slice. Prints the two-sample accuracy (all features and each group) and precision / recall against
the held-out slices, for: training slices (the floor), their reconstructions (the decoded floor), those
with noise added, and each sample set with and without noise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from oasisvq import data
from oasisvq.config import RunConfig
from oasisvq.evaluation import generation as g
from oasisvq.tokenizer import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("samples", nargs="*", type=Path)
    ap.add_argument("--split", default="validate")
    a = ap.parse_args()
    slices = data.load_slices(RunConfig.load(a.run / "config.json").data, None, progress=False)
    held, train = slices.split(a.split), slices.split("train")
    model, _ = load_model(a.run, "best")

    @torch.no_grad()
    def reconstruct(u8: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(u8[:, None]).float() / 255
        return torch.cat([model.decode_indices(model.encode(x[i:i + 16])) for i in range(0, len(x), 16)]
                         ).clamp(0, 1)[:, 0]

    est = train.uint8(np.sort(np.random.default_rng(5).choice(len(train), 256, replace=False)))
    x, r = torch.from_numpy(est).float() / 255, reconstruct(est)
    size = x.shape[-1]
    p_real, p_rec = (torch.fft.fft2(x).abs() ** 2).mean(0), (torch.fft.fft2(r).abs() ** 2).mean(0)
    f = torch.fft.fftfreq(size)
    radius = torch.clamp((torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2) / 0.5 * 64).long(), max=64)
    kept = torch.stack([p_rec[radius == k].mean() / p_real[radius == k].mean() for k in range(64)])
    cut = int(torch.nonzero(kept < 0.9).flatten()[0])
    missing = torch.clamp(p_real - p_rec, min=0) * (radius >= cut) / float((r > 0.05).float().mean())
    print(f"noise above {cut / 128:.3f} cycles/pixel, std inside the head {float(missing.sum().sqrt()) / size**2:.4f}")

    def grain(img: torch.Tensor, seed: int) -> torch.Tensor:
        white = torch.randn(img.shape, generator=torch.Generator().manual_seed(seed))
        noise = torch.fft.ifft2(torch.fft.fft2(white) * missing.sqrt() / size).real
        return (img + noise * (img > 0.05)).clamp(0, 1)

    to_u8 = lambda t: (t.numpy() * 255).round().astype(np.uint8)
    real = held.uint8(np.sort(np.random.default_rng(0).permutation(len(held))[:1000]))
    floor = train.uint8(np.sort(np.random.default_rng(1).choice(len(train), 64, replace=False)))
    sets = {"floor": floor, "decoded floor": to_u8(reconstruct(floor)),
            "decoded floor + noise": to_u8(grain(reconstruct(floor), 0))}
    for d in a.samples:
        s = g.read_sample_pngs(d)[0]
        sets[d.name], sets[d.name + " + noise"] = s, to_u8(grain(torch.from_numpy(s).float() / 255, 1))
    f_real = g.features(real)
    for name, imgs in sets.items():
        f_r, f_x = g.standardize(f_real, f_real, g.features(imgs))[1:]
        c, pr = g.compare(f_x, f_r), g.prdc(f_x, f_r)
        print(f"{name:28s} two-sample {c['two_sample_accuracy']:.2f} (net {c['two_sample_net']:.2f}, intensity "
              f"{c['two_sample_intensity']:.2f}, spectrum {c['two_sample_spectrum']:.2f})  precision "
              f"{pr['precision']:.2f} recall {pr['recall']:.2f}", flush=True)


if __name__ == "__main__":
    main()
