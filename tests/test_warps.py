"""The five distortions: determinism, shapes, parameter distributions, identities, warp direction."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from scipy import stats
from torch import nn

from src.data.distort import generate_split, quantize, split_seed
from src.data.warps import WARPS, Recipe, distort_batch, recipe
from src.stn.grids import AffineGrid, base_grid
from src.stn.transformer import SpatialTransformer
from tests.conftest import synthetic_digits

CONF = Path(__file__).resolve().parents[1] / "conf"
DISTORTIONS = tuple(sorted(p.stem for p in (CONF / "data").glob("*.yaml")))
CANVAS = {"r": 28, "rts": 42, "p": 28, "e": 28, "tc": 60}


def data_cfg(name: str, **over):
    return OmegaConf.merge(OmegaConf.load(CONF / "data" / f"{name}.yaml"), over)


def digits(n: int, seed: int = 1) -> torch.Tensor:
    return synthetic_digits(n, seed).double() / 255


def run(x, cfg, seed=0, ac=False, pool=None):
    return distort_batch(x, cfg, torch.Generator().manual_seed(seed), align_corners=ac, clutter_pool=pool)


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def test_configs_have_the_required_keys():
    for name in DISTORTIONS:
        c = OmegaConf.load(CONF / "data" / f"{name}.yaml")
        assert c.name == name and c.canvas == CANVAS[name] and isinstance(c.gen_seed, int) and c.warp in WARPS
        assert c.st_downsample == (2 if name in ("rts", "tc") else 1)


@pytest.mark.parametrize("name", DISTORTIONS)
def test_shapes_dtypes_and_range(name):
    x = digits(12)
    for dtype in (torch.float64, torch.float32):
        y, p = run(x.to(dtype), data_cfg(name))
        assert y.shape == (12, 1, CANVAS[name], CANVAS[name]) and y.dtype == dtype
        assert 0 <= y.min() and y.max() <= 1 and y.max() > 0.5
        assert all(v.shape[0] == 12 and v.is_floating_point() for v in p.values())
    with pytest.raises(ValueError):
        run(x[:, :, :20], data_cfg(name))


@pytest.mark.parametrize("name", DISTORTIONS)
def test_same_seed_same_bytes_at_any_thread_count(name):
    images = synthetic_digits(30, 2)
    cfg, threads = data_cfg(name), torch.get_num_threads()
    hashes = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            out, params = generate_split(images, cfg, split_seed(cfg.gen_seed, "val"), False, images)
            hashes.append((sha(out), sha(torch.cat([v.flatten() for v in params.values()]))))
    finally:
        torch.set_num_threads(threads)
    assert hashes[0] == hashes[1]
    other, _ = generate_split(images, cfg, split_seed(cfg.gen_seed, "test"), False, images)
    assert sha(other) != hashes[0][0]
    assert out.dtype == torch.uint8 and out.shape == (30, 1, CANVAS[name], CANVAS[name])


def test_split_seeds_are_distinct():
    seeds = {split_seed(g, s) for g in range(1, 6) for s in ("train", "val", "test")}
    assert len(seeds) == 15 and all(0 <= s < 2 ** 63 for s in seeds)


# ------------------------------------------------------------------ parameter distributions

N = 2000


def _uniform_ok(v: torch.Tensor, lo: float, hi: float) -> None:
    v = v.numpy()
    assert lo <= v.min() and v.max() <= hi
    assert stats.kstest(v, "uniform", args=(lo, hi - lo)).pvalue > 1e-4


def test_r_angles_uniform():
    _, p = run(digits(1).expand(N, -1, -1, -1), data_cfg("r"))
    _uniform_ok(p["angle"], -90, 90)
    assert abs(p["angle"].std().item() - 180 / math.sqrt(12)) < 3  # a narrower range would fail here


def test_rts_angles_scales_and_placement():
    x = digits(N, 3)
    y, p = run(x, data_cfg("rts"))
    _uniform_ok(p["angle"], -45, 45)
    _uniform_ok(p["scale"], 0.7, 1.2)
    # the stnbhwd demo's placement: the scaled 28×28 square lies uniformly inside the 42×42 canvas
    room = (42 - 28 * p["scale"]) / 2
    for t in (p["tx"], p["ty"]):
        _uniform_ok(t / room, -1, 1)
    # every digit lies fully inside: its ink mass is the source's times scale² (a crop would lose mass)
    ratio = y.sum((1, 2, 3)) / (x.sum((1, 2, 3)) * p["scale"] ** 2)
    assert 0.97 < ratio.min() and ratio.max() < 1.03


def test_rts_square_centre_lands_where_recorded():
    x = torch.zeros(64, 1, 28, 28, dtype=torch.float64)
    x[:, :, 13:15, 13:15] = 1.0  # a dot at the square's centre
    y, p = run(x, data_cfg("rts", angle=[0.0, 0.0], scale=[1.0, 1.0]))  # a pure shift keeps the centroid
    ys, xs = torch.meshgrid(torch.arange(42.0, dtype=torch.float64), torch.arange(42.0, dtype=torch.float64), indexing="ij")
    m = y[:, 0].sum((1, 2))
    cx, cy = (y[:, 0] * xs).sum((1, 2)) / m - 20.5, (y[:, 0] * ys).sum((1, 2)) / m - 20.5
    assert (cx - p["tx"]).abs().max() < 1e-6 and (cy - p["ty"]).abs().max() < 1e-6


def test_p_corner_moves_and_scale():
    _, p = run(digits(1).expand(N, -1, -1, -1), data_cfg("p"))
    _uniform_ok(p["scale"], 0.75, 1.0)
    moves = p["corners"]
    assert moves.shape == (N, 4, 2)
    assert abs(moves.std().item() - 5.0) < 0.15 and abs(moves.mean().item()) < 0.15


def test_p_shows_nothing_beyond_the_horizon():
    x = digits(1).expand(500, -1, -1, -1)
    y, p = run(x, data_cfg("p", corner_sigma_px=12.0, min_ink_inside=0.0))
    g = base_grid(28, 28, False, dtype=torch.float64)
    w = p["theta"][:, 6, None, None] * g[..., 0] + p["theta"][:, 7, None, None] * g[..., 1] + p["theta"][:, 8, None, None]
    behind = w <= 0
    assert behind.any() and torch.all(y[:, 0][behind] == 0)


def test_e_offsets_and_prescale():
    _, p = run(digits(1).expand(N, -1, -1, -1), data_cfg("e"))
    assert p["offsets"].shape == (N, 16, 2)
    assert abs(p["offsets"].std().item() - 1.5) < 0.05 and abs(p["offsets"].mean().item()) < 0.05
    assert torch.all(p["scale"] == 1)
    _, p = run(digits(1).expand(N, -1, -1, -1), data_cfg("e", prescale=True))
    _uniform_ok(p["scale"], 0.75, 1.0)


def test_tc_positions():
    x = digits(N, 4)
    _, p = run(x, data_cfg("tc"), pool=x[:50])
    for key, hi in (("x", 32), ("y", 32), ("patch_pos", 54), ("patch_crop", 22), ("patch_src", 49)):
        v = p[key]
        assert v.min() == 0 and v.max() == hi and torch.all(v == v.round())
    assert p["patch_pos"].shape == (N, 6, 2)


# ------------------------------------------------------------------ identities and direction

@pytest.mark.parametrize("name,over", [
    ("r", {"angle": [0.0, 0.0]}),
    ("p", {"scale": [1.0, 1.0], "corner_sigma_px": 0.0}),
    ("e", {"sigma_px": 0.0}),
    ("rts", {"angle": [0.0, 0.0], "scale": [1.0, 1.0], "placement": "square", "canvas": 28}),
])
@pytest.mark.parametrize("ac", [False, True])
def test_zero_distortion_is_the_identity(name, over, ac):
    x = digits(16)
    y, _ = run(x, data_cfg(name, **over), ac=ac)
    assert (y - x).abs().max() < 1e-5  # grids built from float32 buffers are exact to ~1e-7
    assert torch.equal(quantize(y), quantize(x))


def test_tc_without_patches_is_the_digit_pasted_at_its_position():
    x = digits(16)
    y, p = run(x, data_cfg("tc", n_patches=0))
    for i in range(16):
        c, r = int(p["x"][i]), int(p["y"][i])
        expect = torch.zeros(60, 60, dtype=x.dtype)
        expect[r:r + 28, c:c + 28] = x[i, 0]
        assert torch.equal(y[i, 0], expect)


def test_tc_patches_land_where_recorded():
    x = torch.zeros(8, 1, 28, 28, dtype=torch.float64)
    pool = torch.arange(28 * 28, dtype=torch.float64).reshape(1, 1, 28, 28).repeat(3, 1, 1, 1) / 2000
    pool[1] += 0.25
    y, p = run(x, data_cfg("tc", composite="max"), pool=pool)
    for i in range(8):
        expect = torch.zeros(60, 60, dtype=x.dtype)
        for k in range(6):
            cx, cy = (int(v) for v in p["patch_crop"][i, k])
            px, py = (int(v) for v in p["patch_pos"][i, k])
            patch = pool[int(p["patch_src"][i, k]), 0, cy:cy + 6, cx:cx + 6]
            expect[py:py + 6, px:px + 6] = torch.maximum(expect[py:py + 6, px:px + 6], patch)
        assert torch.equal(y[i, 0], expect)


@pytest.mark.parametrize("ac", [False, True])
def test_positive_angle_is_counter_clockwise_as_displayed(ac):
    x = digits(8)
    y, p = run(x, data_cfg("r", angle=[90.0, 90.0]), ac=ac)
    assert torch.all(p["angle"] == 90)
    # torch.rot90 on (H, W) turns the displayed image counter-clockwise (row 0 is the top)
    assert (y - torch.rot90(x, 1, (2, 3))).abs().max() < 1e-12


@pytest.mark.parametrize("ac", [False, True])
def test_rotation_is_undone_by_its_analytic_inverse_through_the_transformer(ac):
    x = digits(64)
    y, p = run(x, data_cfg("r"), ac=ac)
    a = p["angle"] * (math.pi / 180)
    c, s, z = torch.cos(a), torch.sin(a), torch.zeros_like(a)
    undo = torch.stack([c, s, z, -s, c, z], 1)  # the ST samples the distorted digit along the forward rotation
    st = SpatialTransformer(nn.Flatten(), 784, "aff", (28, 28), align_corners=ac).double()
    yy, xx = torch.meshgrid(torch.arange(28.0) - 13.5, torch.arange(28.0) - 13.5, indexing="ij")
    disc = (xx ** 2 + yy ** 2) < 12 ** 2  # corners leave the frame when rotated
    err = (st.warp(y, undo) - x)[:, 0][:, disc].abs().mean()
    wrong = (st.warp(y, torch.stack([c, -s, z, s, c, z], 1)) - x)[:, 0][:, disc].abs().mean()
    assert err < 0.02 and wrong > 5 * err
    # and the recorded sampling matrix composed with the inverse is the identity
    def h(t):
        return torch.cat([t.view(-1, 2, 3), torch.tensor([[[0.0, 0.0, 1.0]]], dtype=t.dtype).expand(len(t), 1, 3)], 1)
    assert (h(p["theta"]) @ h(undo) - torch.eye(3, dtype=torch.float64)).abs().max() < 1e-12
    # the recorded θ, through the shared affine grid generator, reproduces the image
    grid = AffineGrid((28, 28), ac)(p["theta"])
    assert (torch.nn.functional.grid_sample(x, grid, align_corners=ac) - y).abs().max() < 1e-12


def test_distort_batch_takes_its_randomness_from_the_generator():
    x = digits(8)
    for name in DISTORTIONS:
        cfg = data_cfg(name)
        torch.manual_seed(123)
        a = run(x, cfg, seed=5)[0]
        torch.manual_seed(456)  # the global RNG must not matter
        assert torch.equal(a, run(x, cfg, seed=5)[0])
        assert not torch.equal(a, run(x, cfg, seed=6)[0])


@pytest.mark.gpu
def test_distort_batch_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x = digits(64)
    pool = synthetic_digits(10, 3)
    for name in DISTORTIONS:
        cfg = data_cfg(name)
        y, p = distort_batch(x.float().cuda(), cfg, torch.Generator().manual_seed(0), clutter_pool=pool.cuda())
        assert y.is_cuda and y.dtype == torch.float32 and y.shape[-1] == CANVAS[name] and 0 <= y.min() <= y.max() <= 1
        ref, p_cpu = distort_batch(x, cfg, torch.Generator().manual_seed(0), clutter_pool=pool)
        assert p.keys() == p_cpu.keys() and all(torch.equal(p[k], p_cpu[k]) for k in p)  # one stream on every device
        assert (quantize(y.double().cpu()) != quantize(ref)).float().mean() < 1e-3  # float32 vs float64 warp


@pytest.mark.parametrize("name", DISTORTIONS)
def test_parameters_do_not_depend_on_the_image_dtype(name):
    x, pool = digits(64), synthetic_digits(10, 3)
    params = [run(x.to(dt), data_cfg(name), seed=3, pool=pool)[1] for dt in (torch.float64, torch.float32, torch.bfloat16)]
    for p in params[1:]:
        assert p.keys() == params[0].keys() and all(torch.equal(p[k], params[0][k]) for k in p)
        assert all(v.dtype == torch.float64 and v.device.type == "cpu" for v in p.values())


def test_parameters_come_from_a_cpu_generator():
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="CPU generator"):
        distort_batch(digits(4), data_cfg("r"), SimpleNamespace(device=torch.device("cuda")))


def test_unknown_warp_is_refused():
    with pytest.raises(ValueError, match="data.warp must be one of"):
        run(digits(4), data_cfg("r", warp="swirl"))


@pytest.mark.parametrize("name", ["r", "rts", "p", "e", "tc"])
def test_a_recipe_draws_exactly_what_its_config_draws(name):
    """The datamodule reads each distortion config once, as a plain ``Recipe``: same batches, same params."""
    cfg = data_cfg(name)
    r = recipe(cfg)
    assert isinstance(r, Recipe) and recipe(r) is r and r.canvas == cfg.canvas
    with pytest.raises(AttributeError):
        r.no_such_key  # noqa: B018 - absent keys behave as attributes do
    x = synthetic_digits(64, 4).double() / 255
    warp = WARPS[cfg.warp]  # called directly: distort_batch would convert the config itself
    pool = x if warp.needs_pool else None
    a, b = (warp.draw(x, c, torch.Generator().manual_seed(2), False, None if pool is None else len(pool)) for c in (cfg, r))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(warp.apply(x, a, cfg, False, pool), warp.apply(x, b, r, False, pool))
