"""A synthetic abdominal CT phantom with a small, low-contrast pancreas.

The phantom is the example's built-in data set: no download, generated on the fly and
deterministic in a seed. Each case is a contrast-enhanced (portal venous) abdominal CT volume
with a body outline, subcutaneous fat, the muscle wall, spine, psoas and paraspinal muscles,
kidneys, liver, spleen, stomach (air-fluid level), duodenum wrapped around the pancreatic head,
colon and small-bowel loops, aorta, SMA, IVC and the portal / superior mesenteric / splenic
veins, and a pancreas: a tube along a random smooth curve (head, neck, body, tail) of varying
thickness, with a lobulated texture, lying in a rim of fat between the stomach and the
aorta/spine, the splenic vein running along its posterior surface.

The task is hard by intensity alone and easy by context, like the real one: the pancreas takes
well under 1% of the volume and its Hounsfield values overlap with liver, spleen, bowel and
stomach wall, so the best single HU interval reaches a Dice of about 0.1
(:func:`threshold_baseline`), while its shape and neighbours (fat rim, splenic vein, duodenum)
identify it for a convolutional network.

Geometry: arrays are in ``(x, y, z)`` order with a diagonal affine (RAS-like, as MONAI uses
after ``Orientationd(axcodes="RAS")``): ``x`` grows towards the patient's right, ``y`` towards
anterior and ``z`` towards superior. The anatomy is laid out in a fixed reference box of
192 x 192 x 160 mm that is stretched to the field of view, so ``shape`` sets the sampling, not
the anatomy.

Run ``python -m examples.pancreas.phantom --stats --png phantom.png`` for the pancreas volume
fraction and the threshold baseline over a few seeds, and a picture of one case.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline
from scipy.spatial import cKDTree

from attention_gates.files import atomic_write

__all__ = ["generate_phantom", "phantom_id", "threshold_baseline", "HU"]

#: Hounsfield values of the phantom's tissues (portal venous phase), before blur and noise.
HU: dict[str, float] = {
    "air": -1000.0,
    "subcutaneous_fat": -105.0,
    "fat": -90.0,
    "muscle": 55.0,
    "cancellous_bone": 230.0,
    "cortical_bone": 650.0,
    "disc": 90.0,
    "csf": 15.0,
    "kidney_cortex": 165.0,
    "kidney_medulla": 115.0,
    "liver": 110.0,
    "spleen": 120.0,
    "bowel_wall": 100.0,
    "fluid": 15.0,
    "pancreas": 100.0,
    "pancreas_cleft": -30.0,
    "artery": 170.0,
    "ivc": 135.0,
    "portal_vein": 155.0,
}

_REF_HALF = np.array([96.0, 96.0, 80.0])  # half size of the reference box, mm (x, y, z)
_NOISE_STD = 14.0  # HU, after spatial correlation
_NOISE_SIGMA = 0.7  # voxels, correlation of the noise
_BLUR_SIGMA = 0.6  # voxels, partial-volume blur


class _Grid:
    """Voxel centres of a volume in reference millimetres, as broadcastable axes."""

    def __init__(self, shape: tuple[int, int, int]):
        self.shape = shape
        axes = [((np.arange(n, dtype=np.float32) + 0.5) / n - 0.5) * 2 * h for n, h in zip(shape, _REF_HALF)]
        self.x = axes[0][:, None, None]
        self.y = axes[1][None, :, None]
        self.z = axes[2][None, None, :]
        self.step = 2 * _REF_HALF / np.asarray(shape)  # reference mm per voxel

    def ellipsoid(self, centre, semi, warp=None) -> np.ndarray:
        """Inside of an axis-aligned ellipsoid; an infinite semi-axis makes a cylinder."""
        q = np.float32(0.0)
        for c, s, ax in zip(centre, semi, (self.x, self.y, self.z)):
            if np.isfinite(s):
                q = q + ((ax - np.float32(c)) / np.float32(s)) ** 2
        if warp is not None:
            q = q + warp
        return np.broadcast_to(q < 1.0, self.shape)

    def tube(self, points: np.ndarray, radius: np.ndarray):
        """Distance (mm) of every voxel to a sampled curve and the index of its nearest sample.

        Only voxels within ``radius.max()`` plus a margin of the curve's bounding box are
        measured; the others get ``inf`` and index ``-1``.
        """
        dist = np.full(self.shape, np.inf, dtype=np.float32)
        index = np.full(self.shape, -1, dtype=np.int64)
        reach = float(radius.max()) + 3.0
        lo = np.floor((points.min(0) - reach + _REF_HALF) / self.step).astype(int)
        hi = np.ceil((points.max(0) + reach + _REF_HALF) / self.step).astype(int)
        lo = np.clip(lo, 0, self.shape)
        hi = np.clip(hi, 0, self.shape)
        if np.any(hi <= lo):
            return dist, index
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        xs, ys, zs = (ax.ravel()[sl] for ax, sl in zip((self.x, self.y, self.z), box))
        centres = np.stack(np.meshgrid(xs, ys, zs, indexing="ij"), axis=-1).reshape(-1, 3)
        d, i = cKDTree(points).query(centres, distance_upper_bound=reach)
        sub = tuple(hi - lo)
        dist[box] = d.reshape(sub)
        index[box] = np.where(np.isfinite(d), i, -1).reshape(sub)
        return dist, index


def _smooth_field(rng: np.random.Generator, shape, cell: int = 8) -> np.ndarray:
    """Zero-mean, unit-std random field varying over about ``cell`` voxels.

    Fine fields (``cell`` <= 2) are filtered white noise; coarse ones are filtered at a lower
    resolution and upsampled, which is much cheaper.
    """
    if cell <= 2:
        field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), cell / 2)
        return (field - field.mean()) / (field.std() + 1e-6)
    low = tuple(-(-n // cell) + 2 for n in shape)
    field = ndimage.gaussian_filter(rng.standard_normal(low).astype(np.float32), 1.0)
    field = ndimage.zoom(field, cell, order=1)[tuple(slice(cell, cell + n) for n in shape)]
    return (field - field.mean()) / (field.std() + 1e-6)


def _curve(control: np.ndarray, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth curve through ``control`` points: (points [samples, 3], t in [0, 1])."""
    knots = np.linspace(0.0, 1.0, len(control))
    t = np.linspace(0.0, 1.0, samples)
    return CubicSpline(knots, control, bc_type="natural")(t), t


def _bowel(grid, vol, cavity, dist, index, radius, lumen_hu, wall_mm, air_level):
    """Paint a bowel-like tube inside the abdominal cavity: a wall of soft tissue, a lumen of
    fluid with air on top."""
    inside = (dist < radius[np.maximum(index, 0)]) & cavity
    lumen = inside & (dist < radius[np.maximum(index, 0)] - wall_mm)
    vol[inside] = HU["bowel_wall"]
    content = lumen_hu[np.maximum(index, 0)]
    vol[lumen] = content[lumen]
    # air rises anteriorly (patient supine): lumen in front of the local level is air
    air = lumen & (np.broadcast_to(grid.y, grid.shape) > air_level[np.maximum(index, 0)])
    vol[air] = HU["air"]


def _body_wall(rng: np.random.Generator, g: _Grid, vol: np.ndarray, warp: np.ndarray) -> np.ndarray:
    """Skin and subcutaneous fat, the muscle wall, and the abdominal cavity filled with fat; returns the cavity."""
    u = rng.uniform
    body_c = (0.0, -4.0 + u(-3, 3), 0.0)
    body_s = np.array([u(84, 92), u(68, 76)])
    fat_t, muscle_t = u(7, 13), u(4, 6)
    vol[g.ellipsoid(body_c, (*body_s, np.inf), warp)] = HU["subcutaneous_fat"]
    vol[g.ellipsoid(body_c, (*(body_s - fat_t), np.inf), warp)] = HU["muscle"]
    cavity = g.ellipsoid(body_c, (*(body_s - fat_t - muscle_t), np.inf), warp)
    vol[cavity] = HU["fat"]
    vol[cavity] += 8.0 * _smooth_field(rng, g.shape, cell=2)[cavity]
    return cavity


def _spine(rng: np.random.Generator, g: _Grid, vol: np.ndarray, warp: np.ndarray, s: np.ndarray) -> None:
    """Vertebral bodies with discs, the spinal canal and arch, the psoas and paraspinal muscles."""
    for side in (-1, 1):
        vol[g.ellipsoid((side * 22, -64, 0), (14, 9, np.inf), warp)] = HU["muscle"]
        psoas = g.ellipsoid((side * 25 + s[0], -40, 0), (8.0, 10.0, np.inf), warp) & (g.z < 25 + s[2])
        vol[psoas] = HU["muscle"]
    vertebra = g.ellipsoid((0, -46, 0), (13, 12, np.inf))
    vol[vertebra] = HU["cortical_bone"]
    vol[g.ellipsoid((0, -46, 0), (10.5, 9.5, np.inf))] = HU["cancellous_bone"]
    phase = rng.uniform(0, 32)
    disc = vertebra & (np.abs(((g.z - phase) % 32.0) - 16.0) < 3.5)
    vol[disc] = HU["disc"]
    arch = g.ellipsoid((0, -64, 0), (10, 9, np.inf))
    vol[arch] = HU["cortical_bone"]
    vol[g.ellipsoid((0, -64, 0), (6, 5.5, np.inf))] = HU["csf"]


def _solid_organs(rng: np.random.Generator, g: _Grid, vol: np.ndarray, warp: np.ndarray, cavity: np.ndarray, s: np.ndarray) -> None:
    """Kidneys (cortex and medulla), liver, spleen, and the stomach (wall, fluid, an air level on top)."""
    u = rng.uniform
    for side, z0 in ((-1, -4.0), (1, -12.0)):
        c = (side * 48 + s[0], -40 + s[1], z0 + s[2] + u(-5, 5))
        semi = np.array([15, 19, 40]) * u(0.9, 1.1)
        vol[g.ellipsoid(c, semi, warp) & cavity] = HU["kidney_cortex"]
        vol[g.ellipsoid(c, semi * 0.62, warp) & cavity] = HU["kidney_medulla"]
    liver = g.ellipsoid((46 + s[0], 8 + s[1], 44 + s[2]), np.array([44, 56, 62]) * u(0.92, 1.08), warp) & cavity
    vol[liver] = HU["liver"] + 6.0 * _smooth_field(rng, g.shape, cell=2)[liver]
    spleen = g.ellipsoid((-60 + s[0], -18 + s[1], 36 + s[2]), np.array([18, 28, 40]) * u(0.85, 1.15), warp) & cavity
    vol[spleen] = HU["spleen"]
    st_c = np.array([-28 + s[0], 32 + s[1], 40 + s[2]])
    st_s = np.array([26, 21, 32]) * u(0.85, 1.1)
    stomach = g.ellipsoid(st_c, st_s, warp) & cavity
    vol[stomach] = HU["bowel_wall"]
    lumen = g.ellipsoid(st_c, st_s - 4.0, warp) & cavity
    vol[lumen] = HU["fluid"] + 10.0 * _smooth_field(rng, g.shape, cell=2)[lumen]
    vol[lumen & (g.y > st_c[1] + u(-4, 10))] = HU["air"]


def _pancreas_line(rng: np.random.Generator, s: np.ndarray) -> dict[str, np.ndarray]:
    """The pancreas centre line, head (t=0), neck, body, tail (t=1), and the uncinate process:
    ``{"main": points[240, 3], "t", "r_main": radius per point, "r_knots", "points", "radius"}``
    (``points``/``radius``: main line and uncinate process together)."""
    u = rng.uniform
    ctrl = np.array([[24, -2, -18], [6, 3, -8], [-14, 0, 0], [-34, -6, 8], [-50, -10, 14]], dtype=float)
    ctrl += s + rng.normal(0.0, [4.0, 3.0, 4.0], size=ctrl.shape)
    main, t = _curve(ctrl, 240)
    r_knots = np.array([12.5, 7.5, 9.0, 8.0, 6.0]) * u(0.85, 1.15) * rng.uniform(0.9, 1.1, 5)
    r_main = np.interp(t, np.linspace(0, 1, 5), r_knots)
    head = main[0]
    unc, tu = _curve(np.array([head, head + [-4, -5, -8], head + [-10, -8, -14]]), 40)
    r_unc = np.interp(tu, [0, 1], [r_knots[0] * 0.8, 5.0])
    return {"main": main, "t": t, "r_main": r_main, "r_knots": r_knots,
            "points": np.concatenate([main, unc]), "radius": np.concatenate([r_main, r_unc])}  # fmt: skip


def _bowel_loops(rng: np.random.Generator, g: _Grid, vol: np.ndarray, cavity: np.ndarray, s: np.ndarray) -> None:
    """Ascending, transverse and descending colon (stool and gas pockets) and small-bowel loops below the pancreas."""
    u = rng.uniform
    colon_ctrl = np.array([[58, 2, -80], [58, 4, -30], [48, 30, -14], [0, 48, -18], [-46, 30, -10], [-60, -2, -2], [-60, 0, -80]], dtype=float)
    colon_ctrl += s + rng.normal(0.0, 3.0, size=colon_ctrl.shape)
    colon, _ = _curve(colon_ctrl, 300)
    tubes, radii, content, level = [colon], [np.full(len(colon), u(11, 14))], [], []
    gas = ndimage.gaussian_filter1d(rng.standard_normal(len(colon)), 8.0)
    content.append(np.where(gas > 0.1 * gas.std(), HU["air"], HU["fluid"] + 20))  # stool and gas pockets
    for _ in range(int(rng.integers(5, 9))):
        start = np.array([u(-40, 40), u(5, 45), u(-74, -48)])
        pts = start + np.cumsum(rng.normal(0.0, [14.0, 10.0, 8.0], size=(5, 3)), axis=0)
        pts[:, 2] = np.clip(pts[:, 2], -78, -44)
        pts[:, 1] = np.clip(pts[:, 1], -5, 55)
        loop, _ = _curve(pts, 120)
        tubes.append(loop)
        radii.append(np.full(len(loop), u(7, 10)))
        content.append(np.full(len(loop), HU["fluid"] + u(-5, 25)))
    for tube in tubes:
        has_air = rng.random() < 0.5  # an air-fluid level in about half the loops
        level.append(tube[:, 1] + (u(2.0, 6.0) if has_air else np.inf))
    d, i = g.tube(np.concatenate(tubes), np.concatenate(radii))
    _bowel(g, vol, cavity, d, i, np.concatenate(radii), np.concatenate(content), 2.5, np.concatenate(level))


def _duodenum(rng: np.random.Generator, g: _Grid, vol: np.ndarray, cavity: np.ndarray, head: np.ndarray, rh: float) -> None:
    """The duodenum: a C loop around the pancreatic head (centre ``head``, radius ``rh``), from the pylorus to the third part."""
    u = rng.uniform
    duo_ctrl = np.array(
        [
            head + [-4, rh + 14, 24],
            head + [rh + 10, 10, 14],
            head + [rh + 13, 0, 0],
            head + [rh + 11, -2, -18],
            head + [2, -4, -rh - 15],
            head + [-30, -6, -rh - 16],
        ]
    )
    duo, _ = _curve(duo_ctrl, 160)
    duo_r = np.full(len(duo), u(8.5, 10.5))
    d, i = g.tube(duo, duo_r)
    _bowel(g, vol, cavity, d, i, duo_r, np.full(len(duo), HU["fluid"] + u(0, 20)), 3.0, duo[:, 1] + u(3, 8))


def _pancreas(rng: np.random.Generator, g: _Grid, vol: np.ndarray, cavity: np.ndarray, line: dict[str, np.ndarray]) -> np.ndarray:
    """The pancreas in its rim of fat, with a lobulated texture (fat clefts between lobules); returns its mask."""
    d, i = g.tube(line["points"], line["radius"])
    edge = 1.0 + 0.12 * _smooth_field(rng, g.shape, cell=2)
    rad = np.where(i >= 0, line["radius"][np.maximum(i, 0)], 0.0) * edge
    vol[(d < rad + 2.0) & cavity] = HU["fat"]
    pancreas = (d < rad) & cavity
    lobules = ndimage.gaussian_filter(rng.standard_normal(g.shape).astype(np.float32), 0.8)
    cleft = lobules > np.quantile(lobules[pancreas], 0.82) if pancreas.any() else np.zeros(g.shape, bool)
    vol[pancreas] = HU["pancreas"] + 8.0 * lobules[pancreas] / (lobules.std() + 1e-6)
    vol[pancreas & cleft] = HU["pancreas_cleft"]
    return pancreas


def _vessels(rng: np.random.Generator, g: _Grid, vol: np.ndarray, cavity: np.ndarray, s: np.ndarray, line: dict[str, np.ndarray]) -> np.ndarray:
    """Aorta, SMA, IVC, SMV - portal vein and the splenic vein along the pancreas' back, painted last; returns their mask."""
    main, t, r_main = line["main"], line["t"], line["r_main"]
    aorta_c = (-10 + s[0], -24 + s[1])
    aorta = g.ellipsoid((*aorta_c, 0), (10, 10, np.inf))
    ivc = g.ellipsoid((16 + s[0], -22 + s[1], 0), (11, 8, np.inf)) & (g.z < 50)
    neck = main[np.argmin(np.abs(t - 0.25))]
    r_neck = r_main[np.argmin(np.abs(t - 0.25))]
    sma_pts, _ = _curve(np.array([[*aorta_c, 2.0], [aorta_c[0] + 3, aorta_c[1] + 13, -12], [neck[0] - 4, aorta_c[1] + 16, -80]]), 80)
    sma_d, _ = g.tube(sma_pts, np.array([3.5]))
    vessels = aorta | ivc | (sma_d < 3.5)
    vol[aorta | (sma_d < 3.5)] = HU["artery"]
    vol[ivc] = HU["ivc"]
    confluence = neck + [0, -r_neck - 3.5, 0]
    smv = np.array([confluence + [2, 2, -70], confluence + [1, 0, -30], confluence])
    portal = np.array([confluence, confluence + [14, 2, 14], confluence + [30, 6, 30]])
    sel = t >= 0.25
    splenic = main[sel] - np.stack([np.zeros(sel.sum()), r_main[sel] + 2.0, np.zeros(sel.sum())], axis=1)
    splenic = np.concatenate([splenic, _curve(np.array([splenic[-1], splenic[-1] + [-8, -4, 4], splenic[-1] + [-16, -6, 8]]), 30)[0]])
    v_pts = np.concatenate([_curve(smv, 60)[0], _curve(portal, 60)[0], splenic])
    v_rad = np.concatenate([np.full(60, 5.5), np.full(60, 6.0), np.full(len(splenic), rng.uniform(3.8, 4.8))])
    d, i = g.tube(v_pts, v_rad)
    veins = (d < np.where(i >= 0, v_rad[np.maximum(i, 0)], 0.0)) & cavity
    vol[veins] = HU["portal_vein"]
    return vessels | veins


def _one_gland(vol: np.ndarray, gland: np.ndarray) -> np.ndarray:
    """The label (uint8): the largest connected part of ``gland``; the crumbs the veins cut off become fat."""
    parts, n_parts = ndimage.label(gland)
    if n_parts > 1:
        largest = 1 + int(np.argmax(np.bincount(parts.ravel())[1:]))
        vol[(parts > 0) & (parts != largest)] = HU["fat"]
        parts = parts == largest
    return (parts > 0).astype(np.uint8)


def generate_phantom(
    seed: int,
    shape: Sequence[int] = (96, 96, 64),
    spacing: Sequence[float] = (2.0, 2.0, 2.5),
) -> dict:
    """Generate one synthetic abdominal CT case, deterministic in ``seed``.

    Args:
        seed: random seed; the same seed always gives the same case.
        shape: volume size ``(X, Y, Z)`` in voxels, each at least 16.
        spacing: voxel size ``(sx, sy, sz)`` in mm, put on the affine's diagonal.

    Returns:
        A dict with ``"image"`` (``np.ndarray[X, Y, Z]`` float32, Hounsfield units),
        ``"label"`` (``np.ndarray[X, Y, Z]`` uint8, 0 background, 1 pancreas), ``"affine"``
        (``np.ndarray[4, 4]`` float64, voxel to RAS mm, ``spacing`` on the diagonal, the
        volume centred on the origin) and ``"case_id"`` (``"phantom_<seed>"``).

    Raises:
        TypeError: ``seed`` is not an int.
        ValueError: ``shape`` or ``spacing`` do not have three entries, a size is below 16 or
            a spacing is not positive.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be three sizes >= 16 (x, y, z), got {shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive sizes in mm (x, y, z), got {spacing}")

    # every step draws from one generator, in this order: the same seed, the same case
    rng = np.random.default_rng(int(seed))
    g = _Grid(shape)
    vol = np.full(shape, HU["air"], dtype=np.float32)
    warp = 0.08 * _smooth_field(rng, shape)
    cavity = _body_wall(rng, g, vol, warp)
    s = np.array([rng.uniform(-5, 5), rng.uniform(-4, 4), rng.uniform(-6, 6)])  # shift of the organs inside the cavity
    _spine(rng, g, vol, warp, s)
    _solid_organs(rng, g, vol, warp, cavity, s)
    line = _pancreas_line(rng, s)
    _bowel_loops(rng, g, vol, cavity, s)
    _duodenum(rng, g, vol, cavity, line["main"][0], line["r_knots"][0])
    pancreas = _pancreas(rng, g, vol, cavity, line)
    vessels = _vessels(rng, g, vol, cavity, s, line)
    label = _one_gland(vol, pancreas & ~vessels)

    # partial-volume blur and correlated CT noise
    vol = ndimage.gaussian_filter(vol, _BLUR_SIGMA)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), _NOISE_SIGMA)
    vol += noise * (_NOISE_STD / (noise.std() + 1e-6))
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -0.5 * (np.asarray(shape) - 1) * np.asarray(spacing)
    return {
        "image": np.clip(vol, -1024.0, 3071.0).astype(np.float32),
        "label": label,
        "affine": affine,
        "case_id": phantom_id(seed),
    }


def phantom_id(seed: int) -> str:
    """The case id of the phantom of ``seed``: ``"phantom_<seed>"``."""
    return f"phantom_{int(seed)}"


def threshold_baseline(cases: Iterable[Mapping], low: float = -200.0, high: float = 400.0, step: float = 5.0) -> dict:
    """The best single Hounsfield interval as a pancreas segmenter, and the pancreas fraction.

    Every interval ``[a, b)`` with ``a`` and ``b`` on a grid of ``step`` HU over ``[low, high]``
    (plus the open ends below ``low`` and above ``high``, so one-sided thresholds are
    included) is scored by the Dice of ``a <= image < b`` against the label, pooled over all
    cases (the pooled counts favour the threshold). The one with the highest Dice wins.

    Args:
        cases: dicts with ``"image"`` (``np.ndarray[X, Y, Z]``, HU) and ``"label"``
            (``np.ndarray[X, Y, Z]``, pancreas where > 0), e.g. from :func:`generate_phantom`.
        low, high, step: the HU grid searched.

    Returns:
        ``{"dice": float, "interval": [a, b], "dice_per_case": [float, ...],
        "pancreas_fraction": float, "pancreas_fraction_per_case": [float, ...], "cases": int}``
        where ``a`` may be ``-inf`` and ``b`` ``inf``; ``pancreas_fraction`` is the mean over
        cases of the labelled share of the volume.

    Raises:
        ValueError: no cases, an image and label of different shapes, or a case without
            pancreas.
    """
    edges = np.concatenate([[-np.inf], np.arange(low, high + step / 2, step), [np.inf]])
    n_bins = len(edges) - 1
    pos = np.zeros(n_bins)
    tot = np.zeros(n_bins)
    per_case = []
    fractions = []
    for case in cases:
        image, label = np.asarray(case["image"]), np.asarray(case["label"]) > 0
        name = case.get("case_id", "?")
        if image.shape != label.shape:
            raise ValueError(f"case {name}: image shape {image.shape} and label shape {label.shape} differ")
        if not label.any():
            raise ValueError(f"case {name}: the label has no pancreas voxels")
        bins = np.clip(np.searchsorted(edges, image, side="right") - 1, 0, n_bins - 1)
        p = np.bincount(bins[label], minlength=n_bins)
        a = np.bincount(bins.ravel(), minlength=n_bins)
        pos += p
        tot += a
        per_case.append((p, a, label.sum()))
        fractions.append(float(label.mean()))
    if not per_case:
        raise ValueError("threshold_baseline needs at least one case, got none")
    # Dice of every interval [edges[i], edges[j]) from cumulative counts
    cp = np.concatenate([[0.0], np.cumsum(pos)])
    ct = np.concatenate([[0.0], np.cumsum(tot)])
    tp = cp[None, :] - cp[:, None]
    pred = ct[None, :] - ct[:, None]
    dice = np.where(np.triu(np.ones_like(tp, dtype=bool), 1), 2 * tp / (pred + pos.sum() + 1e-12), -1.0)
    i, j = np.unravel_index(np.argmax(dice), dice.shape)
    per = []
    for p, a, n in per_case:
        tp_c = p[i:j].sum()
        per.append(float(2 * tp_c / (a[i:j].sum() + n)))
    return {
        "dice": float(dice[i, j]),
        "interval": [float(edges[i]), float(edges[j])],
        "dice_per_case": per,
        "pancreas_fraction": float(np.mean(fractions)),
        "pancreas_fraction_per_case": fractions,
        "cases": len(per_case),
    }


def save_png(case: Mapping, path: str) -> None:
    """Save axial slices through the pancreas and a coronal slice of a case, label outlined.

    Args:
        case: a dict from :func:`generate_phantom`.
        path: the PNG file to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image, label = case["image"], case["label"]
    zs = np.flatnonzero(label.any(axis=(0, 1)))
    picks = [int(zs[len(zs) // 5]), int(zs[len(zs) // 2]), int(zs[(4 * len(zs)) // 5])] if len(zs) else [image.shape[2] // 2] * 3
    y_c = int(np.flatnonzero(label.any(axis=(0, 2))).mean()) if label.any() else image.shape[1] // 2
    views = [(image[:, :, z].T, label[:, :, z].T, f"axial z={z}") for z in picks]
    views.append((image[:, y_c, :].T, label[:, y_c, :].T, f"coronal y={y_c}"))
    fig, axes = plt.subplots(1, len(views), figsize=(4 * len(views), 4.2))
    for ax, (img, lab, title) in zip(axes, views):
        # radiological display: patient's right on the left of the image, anterior up
        ax.imshow(img[::-1, ::-1], cmap="gray", vmin=-160, vmax=240, interpolation="nearest")
        if lab.any():
            ax.contour(lab[::-1, ::-1], levels=[0.5], colors="tab:orange", linewidths=1.0)
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle(f"{case['case_id']}: pancreas outlined (window [-160, 240] HU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m examples.pancreas.phantom --stats --png out.png``."""
    parser = argparse.ArgumentParser(prog="python -m examples.pancreas.phantom", description=__doc__.splitlines()[0])
    parser.add_argument("--stats", action="store_true", help="print the pancreas fraction and the threshold baseline")
    parser.add_argument("--seeds", type=int, default=8, help="number of seeds (0..N-1) for --stats")
    parser.add_argument("--shape", type=int, nargs=3, default=(96, 96, 64), metavar=("X", "Y", "Z"))
    parser.add_argument("--png", help="write slices of the case of seed 0 to this PNG file")
    parser.add_argument("--json", help="write the --stats result to this JSON file")
    args = parser.parse_args(argv)
    if not (args.stats or args.png):
        parser.error("nothing to do: pass --stats and/or --png PATH")
    if args.stats:
        start = time.perf_counter()
        cases = [generate_phantom(seed, shape=args.shape) for seed in range(args.seeds)]
        per_case = (time.perf_counter() - start) / max(args.seeds, 1)
        result = threshold_baseline(cases)
        result["seconds_per_case"] = per_case
        print(f"{'seed':>4} {'pancreas %':>10} {'interval Dice':>13}")
        for seed, (f, d) in enumerate(zip(result["pancreas_fraction_per_case"], result["dice_per_case"])):
            print(f"{seed:>4} {100 * f:>10.3f} {d:>13.3f}")
        a, b = result["interval"]
        print(f"mean pancreas fraction {100 * result['pancreas_fraction']:.3f}% of the volume")
        print(f"best HU interval [{a:g}, {b:g}): pooled Dice {result['dice']:.3f}")
        print(f"generation {per_case:.2f} s per case, shape {tuple(args.shape)}")
        if args.json:
            atomic_write(args.json, json.dumps(result, indent=2))
    if args.png:
        save_png(generate_phantom(0, shape=args.shape), args.png)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
