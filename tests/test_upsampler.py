"""The upsampler prior: fine codes of one run given another run's coarser reconstruction of the same slices."""

from __future__ import annotations

import csv

import pytest
import torch

from oasisvq import prior, sampling
from oasisvq.checkpoint import load_checkpoint, save_checkpoint
from oasisvq.cli import main
from oasisvq.data import SliceSet
from oasisvq.errors import CheckpointError, ConfigError
from oasisvq.models.priors import (
    AttentionUpsamplerPrior,
    GatedPixelCNN,
    MaskGITPrior,
    PixelCNNUpsamplerPrior,
    PriorConfig,
    UpsamplerPrior,
    _draw,
    build_prior,
)

from .test_sampling import SIZE, TINY, _slices, make_run

FINE = 16  # fine codebook size
PATCH = 2  # image pixels per fine code


def _upsampler(**kw) -> torch.nn.Module:
    cfg = PriorConfig(kind="upsampler", coarse_run="coarse", patch=PATCH, num_classes=0,
                      **{"width": 32, "layers": 4, **kw})
    return build_prior(cfg, FINE, (8, 8))


def _pairs(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Fine 8x8 code grids and images (N, 1, 16, 16) uint8 in which each code's 2x2 pixels spell its four
    bits (black or white): a map from image to codes that is exact and local, if the patches line up."""
    fine = torch.randint(0, FINE, (n, 8, 8), generator=gen)
    bits = (fine[..., None] >> torch.arange(4)) & 1  # (n, 8, 8, 4): the 2x2 pixels of each code, row by row
    image = bits.view(n, 8, 8, 2, 2).permute(0, 1, 3, 2, 4).reshape(n, 1, 16, 16)
    return fine, (image * 255).to(torch.uint8)


def test_logits_follow_the_coarse_image_under_each_fine_code():
    torch.manual_seed(0)
    model = _upsampler(layers=1).eval()  # the image's 3x3 conv and one block at dilation 1: two codes either way
    for p in model.blocks.parameters():
        torch.nn.init.normal_(p, std=0.1)  # leave the identity start, so the block mixes neighbours
    fine, image = _pairs(1, torch.Generator().manual_seed(0))
    changed = image.clone()
    changed[0, 0, :4, :4] = 255 - changed[0, 0, :4, :4]  # the pixels of fine rows/columns 0-1
    with torch.no_grad():
        diff = (model(fine, image) - model(fine, changed)).abs().amax(1)[0]
    assert diff[:2, :2].min() > 0  # over the changed pixels
    assert diff[:4, :4].max() > 0 and diff[4:, :].max() == 0 and diff[:, 4:].max() == 0  # only nearby
    assert torch.allclose(model(fine, image), model(fine, image.float() / 255))  # uint8 or float in [0, 1]


def test_six_blocks_see_seven_codes_either_way():
    """Undilated blocks (prior format 4): the image's 3x3 conv and six 3x3 blocks reach 7 fine codes from
    a changed one, not the 18 of the dilated 1-2-4-8-1-2 blocks of format 3."""
    torch.manual_seed(0)
    model = _upsampler(layers=6).eval()
    for p in model.blocks.parameters():
        torch.nn.init.normal_(p, std=0.1)
    fine = torch.randint(0, FINE, (1, 20, 20))
    image = torch.rand(1, 1, 20 * PATCH, 20 * PATCH)
    changed = image.clone()
    changed[0, 0, 10 * PATCH:11 * PATCH, 10 * PATCH:11 * PATCH] += 1  # the pixels of fine code (10, 10)
    with torch.no_grad():
        reach = (model(fine, image) - model(fine, changed)).abs().amax(1)[0] > 0
    rows, cols = reach.nonzero().T
    assert (int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())) == (3, 17, 3, 17)


def test_decoding_fills_every_fine_code_and_is_reproducible():
    torch.manual_seed(0)
    model = _upsampler().eval()
    _, image = _pairs(3, torch.Generator().manual_seed(1))
    a = model.sample(3, (8, 8), generator=torch.Generator().manual_seed(5), cond=image, steps=5)
    b = model.sample(3, (8, 8), generator=torch.Generator().manual_seed(5), cond=image, steps=5)
    assert a.shape == (3, 8, 8) and torch.equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) < FINE
    with pytest.raises(ValueError, match="coarse run's images"):
        model.sample(3, (8, 8), cond=None)
    with pytest.raises(ValueError, match="coarse run's images"):
        model.sample(3, (8, 8), cond=image[:, 0])
    with pytest.raises(ValueError, match="guidance"):
        model.sample(3, (8, 8), cond=image, guidance=2.0)
    with pytest.raises(ValueError, match="do not cover"):
        model.sample(3, (6, 6), cond=image)
    with pytest.raises(ConfigError, match="coarse run"):
        PriorConfig(kind="upsampler", patch=PATCH, num_classes=0).validate()
    with pytest.raises(ConfigError, match="patch"):
        PriorConfig(kind="upsampler", coarse_run="coarse", num_classes=0).validate()
    with pytest.raises(ConfigError, match="upsampler prior only"):
        PriorConfig(kind="maskgit", coarse_run="coarse").validate()


UPSAMPLERS = {"convolutional": ({}, UpsamplerPrior), "attention": ({"group": 2}, AttentionUpsamplerPrior),
              "autoregressive": ({"autoregressive": True, "layers": 2, "kernel": 3}, PixelCNNUpsamplerPrior)}


@pytest.mark.parametrize("kind", list(UPSAMPLERS))
def test_tiny_upsampler_learns_fine_codes_from_the_coarse_image(one_thread, kind):
    torch.manual_seed(0)
    options, cls = UPSAMPLERS[kind]
    model = _upsampler(**options)
    assert type(model) is cls
    # the transformer starts from GPT-2's small weights and learns slower (2e-3: 0.77 of the codes after 150 steps)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3 if kind == "attention" else 2e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        fine, image = _pairs(16, gen)
        loss = model.loss(fine, image)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    fine, image = _pairs(16, torch.Generator().manual_seed(99))
    passes = {} if kind == "autoregressive" else {"steps": 4}  # it draws code by code
    drawn = model.sample(16, (8, 8), generator=torch.Generator().manual_seed(0), cond=image, **passes)
    assert (drawn == fine).float().mean() > 0.95  # chance: 1/16


def test_an_attention_upsampler_reads_the_pixels_under_each_token_and_sees_the_whole_grid():
    torch.manual_seed(0)
    fine, image = _pairs(1, torch.Generator().manual_seed(0))
    changed = image.clone()
    changed[0, 0, 4:8, 8:12] = 255 - changed[0, 0, 4:8, 8:12]  # the pixels of fine rows 2-3, columns 4-5
    block = torch.zeros(8, 8, dtype=torch.bool)
    block[2:4, 4:6] = True
    for layers, moved in ((0, block), (2, torch.ones(8, 8, dtype=torch.bool))):  # no attention: only its token
        model = AttentionUpsamplerPrior(FINE, (8, 8), PATCH, width=16, layers=layers, heads=2, group=2).eval()
        with torch.no_grad():
            diff = (model(fine, image) - model(fine, changed)).abs().amax(1)[0]
        assert torch.equal(diff > 0, moved), layers
    with pytest.raises(ConfigError, match="heads"):
        PriorConfig(kind="upsampler", coarse_run="c", patch=PATCH, num_classes=0, group=2, width=10).validate()
    PriorConfig(kind="upsampler", coarse_run="c", patch=PATCH, num_classes=0, width=10).validate()  # convolutional


def test_an_autoregressive_upsampler_hides_later_codes_but_reads_the_whole_image():
    torch.manual_seed(0)
    model = _upsampler(autoregressive=True, width=16, layers=3, kernel=3).eval()
    assert type(model) is PixelCNNUpsamplerPrior
    fine, image = _pairs(1, torch.Generator().manual_seed(0))
    later = fine.clone()
    later[0, 4, 5] = (later[0, 4, 5] + 1) % FINE  # raster position 37
    changed = image.clone()
    changed[0, 0, 12:, :] = 255 - changed[0, 0, 12:, :]  # the pixels of fine rows 6-7
    with torch.no_grad():
        code_moved = (model(fine, image) - model(later, image)).abs().amax(1)[0].flatten() > 0
        image_moved = (model(fine, image) - model(fine, changed)).abs().amax(1)[0] > 0
    assert not code_moved[:38].any() and code_moved[38:].any()  # only positions after the changed code
    assert image_moved[6:].all() and image_moved[3:6].any()  # rows above read the image below them
    assert not image_moved[:3].any()  # the image features reach 3 codes either way, the blocks only back
    with pytest.raises(ConfigError, match="group"):
        PriorConfig(kind="upsampler", coarse_run="c", patch=PATCH, num_classes=0, autoregressive=True,
                    group=2).validate()
    with pytest.raises(ConfigError, match="upsampler prior only"):
        PriorConfig(kind="pixelcnn", autoregressive=True).validate()


@pytest.mark.parametrize("kind", ["pixelcnn", "upsampler"])
def test_pixelcnn_sampling_in_windows_draws_what_the_whole_grid_gives(kind):
    """Sampling computes only the receptive field's window around each code; with two 3x3 blocks on a
    9x11 grid the windows are cut on every side, and the codes drawn equal those drawn from full passes."""
    torch.manual_seed(0)
    if kind == "pixelcnn":
        model, grid = GatedPixelCNN(FINE, width=8, layers=2, kernel=3, num_classes=3).eval(), (9, 11)
        cond = torch.tensor([0, 2])
    else:
        model, grid = _upsampler(autoregressive=True, width=8, layers=2, kernel=3).eval(), (8, 8)
        cond = _pairs(2, torch.Generator().manual_seed(3))[1]
    for p in model.parameters():  # away from the identity-like start, so every weight matters
        torch.nn.init.normal_(p, std=0.3)
    windowed = model.sample(2, grid, generator=torch.Generator().manual_seed(7), cond=cond)
    gen, full = torch.Generator().manual_seed(7), torch.zeros(2, *grid, dtype=torch.long)
    with torch.no_grad():
        for r in range(grid[0]):
            for c in range(grid[1]):
                full[:, r, c] = _draw(model(full, cond)[:, :, r, c], 1.0, 0, gen)
    assert torch.equal(windowed, full) and len(full.unique()) > 4


@pytest.fixture()
def two_runs(tmp_path, monkeypatch):
    data = _slices()
    monkeypatch.setattr("oasisvq.data.load_slices", lambda *a, **kw: data)
    return make_run(tmp_path / "fine", 8, FINE), make_run(tmp_path / "coarse", 16, 8)


def test_upsampler_trains_on_two_runs_and_samples_through_the_coarse_prior(two_runs, tmp_path, monkeypatch):
    fine, coarse = two_runs
    prior.train_prior(coarse, "maskgit", epochs=1, progress=False, **TINY)
    with pytest.raises(ConfigError, match="coarse run"):
        prior.train_prior(fine, "upsampler", epochs=1, progress=False)
    monkeypatch.chdir(tmp_path)  # a relative coarse path is stored resolved
    assert main(["train-prior", "fine", "--kind", "upsampler", "--coarse", "coarse", "--epochs", "1", "--width", "16",
                 "--layers", "2", "--batch-size", "4", "--no-progress"]) == 0
    assert main(["train-prior", "fine", "--kind", "upsampler", "--epochs", "2", "--resume", "--no-progress"]) == 0
    meta = load_checkpoint(fine / "prior-upsampler" / "last.safetensors")[1]
    assert meta["step"] == 2 * 3 and 0 < meta["best_val_bits"] < 8
    # the coarse grids came from the coarse MaskGIT's own cache, not from encoding them again
    assert not (fine / "prior-upsampler" / "coarse-codes.safetensors").exists()
    assert meta["prior_config"]["coarse_run"] == str(coarse.resolve())
    assert meta["prior_config"]["patch"] == 8 and meta["coarse_grid"] == [2, 2] and meta["grid"] == [4, 4]
    assert meta["coarse_vqvae"] == prior.fingerprint(coarse) and meta["prior_config"]["decode_steps"] == 32
    assert meta["prior_config"]["width"] == 16 and meta["prior_config"]["layers"] == 2  # given ones win

    layouts = []  # what the coarse prior draws, with and without the upsampler after it
    draw = MaskGITPrior.sample
    monkeypatch.setattr(MaskGITPrior, "sample", lambda *a, **kw: layouts.append(draw(*a, **kw)) or layouts[-1])
    info = sampling.sample(fine, "upsampler", n=5, out=tmp_path / "s", level=(0.2, 0.6), seed=1, steps=3,
                           batch_size=2, progress=False)
    through_upsampler, layouts[:] = torch.cat(layouts), []
    alone = sampling.sample(coarse, "maskgit", n=5, out=tmp_path / "c", level=(0.2, 0.6), seed=1, batch_size=2,
                            progress=False)
    assert torch.equal(torch.cat(layouts), through_upsampler) and alone["levels"] == info["levels"]  # paired
    again = sampling.sample(fine, "upsampler", n=5, out=tmp_path / "t", level=(0.2, 0.6), seed=1, steps=3,
                            batch_size=2, progress=False)
    assert all(0.2 <= v <= 0.6 for v in info["levels"]) and info["levels"] == again["levels"]
    assert all((tmp_path / "s" / f).read_bytes() == (tmp_path / "t" / f).read_bytes() for f in info["files"])

    ranked = []  # a choice temperature reaches both priors and is recorded
    for cls in (MaskGITPrior, UpsamplerPrior):
        monkeypatch.setattr(cls, "sample", lambda self, *a, _draw=cls.sample, **kw:
                            ranked.append((type(self), kw.get("choice_temperature"))) or _draw(self, *a, **kw))
    info = sampling.sample(fine, "upsampler", n=2, out=tmp_path / "r", seed=1, choice_temperature=0.0, progress=False)
    assert ranked == [(MaskGITPrior, 0.0), (UpsamplerPrior, 0.0)] and info["choice_temperature"] == 0.0
    for bad in (-1.0, float("inf")):
        with pytest.raises(ConfigError, match="choice temperature"):
            sampling.sample(fine, "upsampler", n=1, out=tmp_path / "r", choice_temperature=bad, progress=False)

    # a coarse VQ-VAE trained again makes other codes: sampling refuses rather than decode nonsense
    path = coarse / "checkpoints" / "best.safetensors"
    tensors, cmeta = load_checkpoint(path)
    save_checkpoint(path, {k: v + 0.01 if v.is_floating_point() else v for k, v in tensors.items()}, cmeta)
    with pytest.raises(CheckpointError, match="changed after the upsampler"):
        sampling.sample(fine, "upsampler", n=1, out=tmp_path / "u", progress=False)


def test_an_attention_upsampler_trains_from_the_cli_and_samples_through_the_coarse_prior(two_runs, tmp_path):
    fine, coarse = two_runs
    prior.train_prior(coarse, "maskgit", epochs=1, progress=False, **TINY)
    assert main(["train-prior", str(fine), "--kind", "upsampler", "--coarse", str(coarse), "--group", "2", "--epochs",
                 "1", "--width", "16", "--heads", "2", "--layers", "1", "--batch-size", "4", "--no-progress"]) == 0
    model, meta = prior.load_prior(fine, "upsampler")
    assert type(model) is AttentionUpsamplerPrior and meta["prior_config"]["group"] == 2 and model.patch == 8
    info = sampling.sample(fine, "upsampler", n=3, out=tmp_path / "s", seed=1, steps=3, progress=False)
    assert len(info["files"]) == 3 and all((tmp_path / "s" / f).is_file() for f in info["files"])


def test_an_unrolled_upsampler_trains_from_the_cli_and_logs_its_masked_bits(two_runs, tmp_path):
    fine, coarse = two_runs
    prior.train_prior(coarse, "maskgit", epochs=1, progress=False, **TINY)
    assert main(["train-prior", str(fine), "--kind", "upsampler", "--coarse", str(coarse), "--unrolled", "--epochs",
                 "2", "--width", "16", "--layers", "2", "--batch-size", "4", "--no-progress"]) == 0
    _, meta = prior.load_prior(fine, "upsampler")
    assert meta["prior_config"]["unrolled"] is True
    rows = list(csv.DictReader((fine / "prior-upsampler" / "metrics.csv").read_text().splitlines()))
    # train bits are the masked codes' alone, as the validation bits: within a few bits of them, not their sum
    assert all(abs(float(r["train_bits"]) - float(r["val_bits"])) < 2 for r in rows)
    info = sampling.sample(fine, "upsampler", n=2, out=tmp_path / "s", seed=1, steps=3, progress=False)
    assert len(info["files"]) == 2


def test_an_autoregressive_upsampler_trains_from_the_cli_and_samples_through_the_coarse_prior(two_runs, tmp_path):
    fine, coarse = two_runs
    prior.train_prior(coarse, "maskgit", epochs=1, progress=False, **TINY)
    assert main(["train-prior", str(fine), "--kind", "upsampler", "--coarse", str(coarse), "--autoregressive",
                 "--epochs", "1", "--width", "16", "--layers", "2", "--kernel", "3", "--batch-size", "4",
                 "--no-progress"]) == 0
    model, meta = prior.load_prior(fine, "upsampler")
    assert type(model) is PixelCNNUpsamplerPrior and meta["prior_config"]["autoregressive"] and model.patch == 8
    info = sampling.sample(fine, "upsampler", n=3, out=tmp_path / "s", seed=1, choice_temperature=0.0,
                           progress=False)  # the ranking reaches the coarse MaskGIT only
    sampling.sample(fine, "upsampler", n=3, out=tmp_path / "t", seed=1, choice_temperature=0.0, progress=False)
    assert all((tmp_path / "s" / f).read_bytes() == (tmp_path / "t" / f).read_bytes() for f in info["files"])
    with pytest.raises(ConfigError, match="steps"):  # it draws code by code, in no passes
        sampling.sample(fine, "upsampler", n=1, out=tmp_path / "u", steps=3, progress=False)
    kept = (coarse / "prior-maskgit" / "last.safetensors").read_bytes()
    assert main(["train-prior", str(coarse), "--kind", "maskgit", "--autoregressive", "--overwrite",
                 "--epochs", "1"]) == 2
    assert (coarse / "prior-maskgit" / "last.safetensors").read_bytes() == kept


def test_upsampler_on_slices_without_a_level(two_runs, monkeypatch, tmp_path):
    data = _slices()
    data = SliceSet(data.images, dict(data.index, positions=[float("nan")] * len(data)))  # PNG sets without levels
    monkeypatch.setattr("oasisvq.data.load_slices", lambda *a, **kw: data)
    fine, coarse = two_runs
    prior.train_prior(coarse, "maskgit", epochs=1, progress=False, **TINY)
    (coarse / "prior-maskgit" / prior.CODES_FILE).unlink()  # no coarse cache to read: the upsampler encodes
    prior.train_prior(fine, "upsampler", epochs=1, progress=False, coarse_run=str(coarse), width=16, layers=2,
                      batch_size=4)
    assert (fine / "prior-upsampler" / "coarse-codes.safetensors").is_file()
    assert not (coarse / "prior-maskgit" / prior.CODES_FILE).exists()  # nothing written into the coarse run
    info = sampling.sample(fine, "upsampler", n=2, out=tmp_path / "s", steps=2, progress=False)
    assert info["levels"] is None and len(info["files"]) == 2

    # an upsampler of prior format 2 read coarse code ids, one of format 3 ran dilated blocks: neither loads
    path = fine / "prior-upsampler" / "best.safetensors"
    tensors, meta = load_checkpoint(path)
    for fmt in (2, 3):
        save_checkpoint(path, tensors, dict(meta, prior_format=fmt))
        with pytest.raises(CheckpointError, match=f"prior format {fmt}.*train it again"):
            sampling.sample(fine, "upsampler", n=1, out=tmp_path / "u", progress=False)


def test_upsampler_refuses_a_coarse_run_of_other_slices(two_runs, tmp_path):
    fine, _ = two_runs
    other = make_run(tmp_path / "other", 16, 8, size=2 * SIZE)
    with pytest.raises(ConfigError, match="other slices.*size"):
        prior.train_prior(fine, "upsampler", epochs=1, progress=False, coarse_run=str(other))
    with pytest.raises(ConfigError, match="not coarser"):
        prior.train_prior(fine, "upsampler", epochs=1, progress=False, coarse_run=str(fine))


def test_a_cascade_of_upsamplers_samples_through_every_level(two_runs, tmp_path, monkeypatch):
    """16x -> 8x -> 4x downsampling: the finest upsampler's coarse run holds an upsampler itself. Its middle
    grids are those the middle run draws alone with the same seed (each upsampler has its own stream)."""
    mid, coarse = two_runs
    finest = make_run(tmp_path / "finest", 4, FINE)
    prior.train_prior(coarse, "maskgit", epochs=1, progress=False, **TINY)
    small = {"width": 16, "layers": 2, "batch_size": 4}
    prior.train_prior(mid, "upsampler", epochs=1, progress=False, coarse_run=str(coarse), **small)
    assert main(["train-prior", str(finest), "--kind", "upsampler", "--coarse", str(mid), "--coarse-prior", "upsampler",
                 "--epochs", "1", "--width", "16", "--layers", "2", "--batch-size", "4", "--no-progress"]) == 0

    drawn = []  # every upsampler's grids, in the order drawn
    draw = UpsamplerPrior.sample
    monkeypatch.setattr(UpsamplerPrior, "sample", lambda *a, **kw: drawn.append(draw(*a, **kw)) or drawn[-1])
    info = sampling.sample(finest, "upsampler", n=3, out=tmp_path / "s", level=(0.2, 0.6), seed=4, batch_size=2,
                           progress=False)
    assert [tuple(g.shape[1:]) for g in drawn] == [(4, 4), (8, 8)] * 2  # per batch: middle, then finest
    middle, drawn[:] = torch.cat(drawn[0::2]), []
    alone = sampling.sample(mid, "upsampler", n=3, out=tmp_path / "m", level=(0.2, 0.6), seed=4, batch_size=2,
                            progress=False)
    assert torch.equal(torch.cat(drawn), middle) and alone["levels"] == info["levels"]
    assert len(info["files"]) == 3 and all(0.2 <= v <= 0.6 for v in info["levels"])

    path = coarse / "checkpoints" / "best.safetensors"  # a change two levels down is found too
    tensors, cmeta = load_checkpoint(path)
    save_checkpoint(path, {k: v + 0.01 if v.is_floating_point() else v for k, v in tensors.items()}, cmeta)
    with pytest.raises(CheckpointError, match=f"{coarse}: its VQ-VAE changed after the upsampler"):
        sampling.sample(finest, "upsampler", n=1, out=tmp_path / "u", progress=False)
