"""Lesions from a click and its diameter: ``lesion_from_click`` (the record), ``check_diameter``, and the
region grown from the click (``grow_from_click``, ``sphere_region``).

A click gives a point and a rough diameter, not an outline. Reporting the sphere of that
diameter as if measured overstates the volume of most real lesions (a sphere of 29 mm is
12.8 mL, the ellipsoidal tumour inside it 7.5 mL) and makes its smallest axis larger than its
real long axis. So the lesion is grown from the click instead, with SimpleITK's
``ConnectedThreshold`` (standard seeded region growing), bounded by intensity and distance:

1. **Bound.** Only voxels within :data:`BOUND_FACTOR` x the diameter of the click (a ball of
   radius 0.75 d, i.e. a lesion up to 1.5 x the given diameter) are considered.
2. **Intensities.** After a light in-plane median filter, the lesion's HU is the median
   around the click (a ball of about a third of the radius), the surrounding parenchyma's the
   median of the shell from 1.15 radii to 3 mm past the bound (its voxels clearly unlike the lesion, should
   the lesion reach into it); the noise is the robust spread of neighbouring voxels' differences.
3. **Threshold.** Voxels on the lesion's side of the level just past the midpoint between the
   two (:data:`EDGE_LEVEL`: about the half-maximum of a blurred edge, so partial-volume voxels
   count as the true boundary does) and not too far beyond the lesion's own HU are grown from
   the click. Lesions darker than the parenchyma
   (cysts, most metastases) and brighter than it are handled alike.
4. **Clean-up.** An in-plane opening cuts thin bridges (a touching vessel), the component
   holding the click is kept, holes are filled (a necrotic centre) and the outline is closed.

Outcomes (:attr:`ClickRegion.method`):

* ``"grown"``: the grown region.
* ``"capped"``: no clear edge: the lesion does not differ from its surroundings, or the grown
  region covers much of the bound's surface (it leaked into the liver). The region is cut to
  the sphere of the given diameter, and a one-line warning says so.
* ``"sphere"``: growing failed (a diameter too small to grow in, or a grown region far smaller
  than the diameter given): the sphere of the given diameter, with a note.

Everything is computed on the image's own grid in mm, so anisotropic spacing is handled by
construction; only a box around the bound is read.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from liverlesion.errors import UserError
from liverlesion.lesion_measure import measure_lesion
from liverlesion.lesions import AIR_THRESHOLD_HU, Lesion, LesionMask, LesionWithMask, make_lesion_id
from liverlesion.volume import Volume

log = logging.getLogger(__name__)

#: The search bound: a ball of this many diameters' radius around the click (0.75: lesions up to
#: 1.5 x the given diameter are measured whole).
BOUND_FACTOR = 0.75
#: The lesion's HU is the median of a ball of this fraction of the radius around the click ...
SEED_FRACTION = 0.35
#: ... at most this radius (mm), so that a small lesion given a generous diameter is still sampled.
SEED_MAX_MM = 2.5
#: The parenchyma's HU is the median of the shell from this many radii to the bound + SHELL_MARGIN_MM.
SHELL_START = 1.15
SHELL_MARGIN_MM = 3.0
#: Least lesion-parenchyma difference (HU) taken as an edge ...
MIN_CONTRAST_HU = 12.0
#: ... and at least this many robust standard deviations of the (filtered) parenchyma.
MIN_CONTRAST_SD = 3.0
#: Where between the lesion's HU (0) and its surroundings' (1) the edge is drawn. The half-maximum
#: (0.5) is the edge of a blurred step, but on 2.5-5 mm slices it loses the caps of a small lesion,
#: and noisy edge voxels lost to 6-connectivity and the opening shrink it further: on synthetic
#: 10-40 mm lesions (tests/test_click.py) 0.5 measured 5-15% low, 0.55 within -13..+10%.
EDGE_LEVEL = 0.55
#: Bridges narrower than about twice this fraction of the radius are cut (an in-plane opening) ...
OPEN_FRACTION = 0.15
#: ... with a disk of at most this radius (mm).
OPEN_MAX_MM = 5.0
#: A grown region covering more than this fraction of the bound's surface has leaked (a lesion up
#: to 1.3 x the given diameter covers under 10% of it in the synthetic tests).
LEAK_FRACTION = 0.12
#: A grown region below this fraction of the given diameter's sphere is a failed growth.
MIN_FILL = 0.1
#: Below this many voxels in the given diameter's sphere, growing is pointless: the sphere is used.
MIN_SPHERE_VOXELS = 8

#: What :attr:`ClickRegion.method` puts in the lesion table's ``measurement`` column.
MEASUREMENT = {
    "grown": "estimated from click",
    "capped": "estimated from click (capped at the diameter)",
    "sphere": "estimated from click (sphere of the diameter)",
}
LEAK_NOTE = (
    "grown region reached the diameter bound; the lesion's edge is not clear at this click, "
    "measurements are capped"
)


@dataclass(frozen=True)
class ClickRegion:
    """A click's lesion voxels as a boolean crop of the image.

    Attributes:
        crop: Boolean ``[z, y, x]`` array, tight around the voxels.
        offset: Index of ``crop[0, 0, 0]`` in the image.
        method: ``"grown"``, ``"capped"`` or ``"sphere"`` (see the module docstring).
        note: Why the result is capped or a sphere ("" when grown).
        lesion_hu: Lesion HU estimated at the click (NaN for a sphere made without growing).
        background_hu: Surrounding HU estimated from the shell (NaN likewise).
    """

    crop: np.ndarray
    offset: tuple[int, int, int]
    method: str
    note: str = ""
    lesion_hu: float = math.nan
    background_hu: float = math.nan

    @property
    def measurement(self) -> str:
        """How the measurements were obtained, for the lesion table (all "estimated from click")."""
        return MEASUREMENT[self.method]


def _box(
    centre: np.ndarray, radius_mm: float, spacing: np.ndarray, shape: np.ndarray
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Index box ``[lo, hi)`` of a ball inside the image, and whether the ball was clipped."""
    half = radius_mm / spacing
    lo = np.floor(centre - half).astype(int)
    hi = np.ceil(centre + half).astype(int) + 1
    clipped = bool(np.any(lo < 0) or np.any(hi > shape))
    return np.maximum(lo, 0), np.minimum(hi, shape), clipped


def _dist2(lo: np.ndarray, hi: np.ndarray, centre: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Squared distance (mm²) of each voxel of the box to ``centre``, via open grids."""
    axes = [((np.arange(a, b) - c) * s) ** 2 for a, b, c, s in zip(lo, hi, centre, spacing, strict=True)]
    return axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]


def _tight(crop: np.ndarray, lo: Sequence[int]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """``crop`` cut to its foreground, with the offset of the cut in the image."""
    sl = ndimage.find_objects(crop.astype(np.uint8))[0]
    return crop[sl], tuple(int(a) + s.start for a, s in zip(lo, sl, strict=True))  # type: ignore[return-value]


def sphere_region(
    image: Volume, centre_idx: np.ndarray, diameter_mm: float, point_name: str = "point", note: str = ""
) -> ClickRegion:
    """The sphere of ``diameter_mm`` around ``centre_idx`` (fractional z, y, x), inside the image.

    Round in mm (an ellipsoid in voxels when the spacing is anisotropic); the voxel nearest the
    centre is always included; parts outside the image are clipped with a warning.
    """
    spacing = np.asarray(image.spacing, dtype=float)
    shape = np.asarray(image.shape)
    radius = diameter_mm / 2.0
    lo, hi, clipped = _box(centre_idx, radius, spacing, shape)
    crop = _dist2(lo, hi, centre_idx, spacing) <= radius**2
    near = np.clip(np.round(centre_idx).astype(int), 0, shape - 1)
    crop[tuple(near - lo)] = True
    if clipped:
        # Voxels of the whole sphere, estimated from its volume (it is not built outside the image).
        full_voxels = max(int(round(math.pi / 6 * diameter_mm**3 / float(np.prod(spacing)))), 1)
        lost = full_voxels - int(crop.sum())
        if lost > 0:
            log.warning(
                "%s: the %.1f mm sphere extends past the image edge; about %d of %d voxels clipped",
                point_name,
                diameter_mm,
                lost,
                full_voxels,
            )
    crop, off = _tight(crop, lo)
    return ClickRegion(crop, off, "sphere", note)


def _median_inplane(sub: np.ndarray) -> np.ndarray:
    """3 x 3 in-plane median (SimpleITK): removes noise, keeps edges; no smoothing across thick slices."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(sub, dtype=np.float32))
    return sitk.GetArrayFromImage(sitk.Median(img, [1, 1, 0]))


def _connected_threshold(
    values: np.ndarray, seed_zyx: Sequence[int], lower: float, upper: float
) -> np.ndarray:
    """SimpleITK ``ConnectedThreshold`` (6-connected) from one seed; a boolean array."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(values, dtype=np.float32))
    z, y, x = (int(v) for v in seed_zyx)
    out = sitk.ConnectedThreshold(img, seedList=[(x, y, z)], lower=float(lower), upper=float(upper))
    return sitk.GetArrayFromImage(out).astype(bool)


_INPLANE = ndimage.generate_binary_structure(2, 1)[None]  # 4-neighbourhood of one axial slice


def _disk(radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """An in-plane disk of ``radius_mm`` as a ``(1, h, w)`` structuring element (at least the 4-neighbourhood)."""
    ry, rx = (max(int(radius_mm / s), 1) for s in spacing[1:])
    y, x = np.ogrid[-ry : ry + 1, -rx : rx + 1]
    disk = (y * spacing[1]) ** 2 + (x * spacing[2]) ** 2 <= max(
        radius_mm, float(spacing[1:].max())
    ) ** 2 + 1e-9
    return disk[None]


def grow_from_click(
    image: Volume, centre_idx: np.ndarray, diameter_mm: float, point_name: str = "point"
) -> ClickRegion:
    """Grow a lesion from a click, bounded by intensity and by the diameter; see the module docstring.

    Args:
        image: CT volume (HU).
        centre_idx: The click as fractional array indices ``(z, y, x)``, inside the image.
        diameter_mm: The lesion's diameter as given with the click, mm (> 0).
        point_name: How the click is named in warnings.

    Returns:
        The region (grown, capped at the diameter, or the sphere), with a note when not grown.
    """
    spacing = np.asarray(image.spacing, dtype=float)
    shape = np.asarray(image.shape)
    centre = np.asarray(centre_idx, dtype=float)
    radius = diameter_mm / 2.0
    sphere_voxels = math.pi / 6 * diameter_mm**3 / float(np.prod(spacing))
    if sphere_voxels < MIN_SPHERE_VOXELS:
        return sphere_region(
            image, centre, diameter_mm, point_name, note="diameter too small to grow a region; sphere used"
        )
    bound = BOUND_FACTOR * diameter_mm
    shell_out = bound + SHELL_MARGIN_MM
    lo, hi, _ = _box(centre, shell_out, spacing, shape)
    d2 = _dist2(lo, hi, centre, spacing)
    in_bound = d2 <= bound**2
    in_sphere = d2 <= radius**2
    sub = _median_inplane(np.asarray(image.array[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]))

    # Seed ball: at least the nearest voxel and its in-plane neighbours.
    seed_r = max(min(SEED_FRACTION * radius, SEED_MAX_MM), 1.01 * float(spacing[1:].max()))
    seed_ball = d2 <= seed_r**2
    near = tuple(np.clip(np.round(centre).astype(int), lo, hi - 1) - lo)
    seed_ball[near] = True
    lesion_hu = float(np.median(sub[seed_ball]))
    in_shell_ball = d2 <= shell_out**2
    shell = in_shell_ball & (d2 >= (SHELL_START * radius) ** 2)
    if shell.sum() < 8:  # clipped away by the image edge: use what lies outside the sphere
        shell = in_shell_ball & ~in_sphere
    if not shell.any():
        note = "no surroundings of the click inside the image to compare with; sphere used"
        log.warning("%s: %s", point_name, note)
        return sphere_region(image, centre, diameter_mm, point_name, note=note)
    ring = sub[shell]
    # When the diameter was given too small, part of the shell is lesion: the surroundings are the
    # shell voxels clearly on the far side of the lesion's HU.
    first = float(np.median(ring))
    far = ring[np.sign(first - lesion_hu) * (ring - lesion_hu) > abs(first - lesion_hu) / 2]
    background_hu = float(np.median(far)) if far.size else first
    # Noise from in-plane neighbour differences inside the bound: edges are a small minority.
    diffs = np.diff(sub, axis=2)[in_bound[:, :, 1:] & in_bound[:, :, :-1]]
    noise = 1.4826 * float(np.median(np.abs(diffs - np.median(diffs)))) / math.sqrt(2)
    contrast = background_hu - lesion_hu  # > 0: darker than its surroundings
    hus = {"lesion_hu": round(lesion_hu, 1), "background_hu": round(background_hu, 1)}

    def capped(region: np.ndarray | None, why: str) -> ClickRegion:
        log.warning("%s: %s (%s)", point_name, LEAK_NOTE, why)
        if region is None:  # no edge at all: the sphere itself
            out = sphere_region(image, centre, diameter_mm, point_name)
            return ClickRegion(out.crop, out.offset, "capped", f"{LEAK_NOTE} ({why})", **hus)
        cut = region & in_sphere
        cut[near] = True
        crop, off = _tight(cut, lo)
        return ClickRegion(crop, off, "capped", f"{LEAK_NOTE} ({why})", **hus)

    if abs(contrast) < max(MIN_CONTRAST_HU, MIN_CONTRAST_SD * noise):
        why = (
            f"HU {lesion_hu:.0f} at the click vs {background_hu:.0f} around it, "
            f"less than {max(MIN_CONTRAST_HU, MIN_CONTRAST_SD * noise):.0f} HU apart"
        )
        return capped(None, why)

    mid = lesion_hu + EDGE_LEVEL * (background_hu - lesion_hu)
    reach = max(abs(contrast), MIN_CONTRAST_SD * noise)  # how far beyond the lesion's own HU to accept
    if contrast > 0:
        lower, upper = max(lesion_hu - reach, -500.0), mid  # never into air (lesions.AIR_THRESHOLD_HU)
    else:
        lower, upper = mid, lesion_hu + reach
    # Voxels outside the bound get a value outside [lower, upper], so growing stays inside it.
    values = np.where(in_bound, sub, np.float32(upper + 1e4))
    inside = (values >= lower) & (values <= upper)
    seeds = np.argwhere(seed_ball & inside)
    if len(seeds) == 0:  # not expected (the seed median lies in the range): the sphere, said so
        note = "no voxel near the click within the lesion's HU range; sphere used"
        log.warning("%s: %s", point_name, note)
        return sphere_region(image, centre, diameter_mm, point_name, note=note)
    # The in-range seed voxel nearest the click.
    seed = seeds[np.argmin((((seeds + lo - centre) * spacing) ** 2).sum(axis=1))]
    grown = _connected_threshold(values, seed, lower, upper)

    # Clean-up: cut bridges (a vessel, a neighbouring structure) in-plane with a disk that grows
    # with the lesion, keep the click's component, fill holes, close.
    disk = _disk(min(max(OPEN_FRACTION * radius, float(spacing[1:].max())), OPEN_MAX_MM), spacing)
    opened = ndimage.binary_opening(grown, structure=disk)
    comp, n = ndimage.label(opened)
    if n:
        keep = comp[tuple(seed)]
        if keep == 0:  # the seed itself was opened away: the component nearest it
            idx = np.argwhere(comp > 0)
            keep = comp[tuple(idx[np.argmin((((idx - seed) * spacing) ** 2).sum(axis=1))])]
        # Give back what the opening shaved off the kept part (noisy edge voxels), not the bridges.
        region = grown & ndimage.binary_dilation(comp == keep, structure=disk)
    else:
        region = grown
    region = ndimage.binary_fill_holes(region)
    # Per slice too: a necrotic core open at the lesion's top or bottom slice.
    region = ndimage.binary_fill_holes(region, structure=_INPLANE)
    region = ndimage.binary_closing(region, structure=_INPLANE, border_value=0) & in_bound
    region[tuple(seed)] = True

    # Leak: the region covers much of the bound's surface, taken as the outer in-plane voxel's
    # depth of the ball (in mm, so thick slices do not make it thicker).
    surface = in_bound & (d2 >= (bound - float(spacing[1:].max())) ** 2)
    touching = float((region & surface).sum()) / max(int(surface.sum()), 1)
    log.debug(
        "click: lesion %.0f bg %.0f noise %.1f touching %.3f", lesion_hu, background_hu, noise, touching
    )
    if touching > LEAK_FRACTION:
        return capped(region, f"it covers {100 * touching:.0f}% of the {bound:.1f} mm bound's surface")
    if region.sum() < MIN_FILL * sphere_voxels:
        note = (
            f"grown region ({int(region.sum())} voxels) is under {100 * MIN_FILL:.0f}% of the "
            f"{diameter_mm:g} mm sphere; sphere used"
        )
        log.warning("%s: %s", point_name, note)
        out = sphere_region(image, centre, diameter_mm, point_name, note=note)
        return ClickRegion(out.crop, out.offset, "sphere", note, **hus)
    crop, off = _tight(region, lo)
    return ClickRegion(crop, off, "grown", "", **hus)


# ----------------------------------------------------------------------------- clicks


def physical_bounds(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """The volume's extent in LPS mm: ``(min_xyz, max_xyz)`` over the outer voxel faces."""
    shape = np.asarray(volume.shape, dtype=float)
    corners = np.array([[z, y, x] for z in (0, 1) for y in (0, 1) for x in (0, 1)], dtype=float)
    pts = volume.index_to_physical(corners * shape - 0.5)
    return pts.min(axis=0), pts.max(axis=0)


#: Largest lesion diameter accepted for a click, mm (a whole adult liver is about 150-200 mm wide).
MAX_DIAMETER_MM = 300.0


def check_diameter(diameter_mm, name: str = "--diameter", image: Volume | None = None) -> float:
    """Refuse a click diameter that is not a finite positive number of mm, or implausibly large.

    Args:
        diameter_mm: The diameter in mm.
        name: How the value is named in the message (e.g. ``"--diameter"``).
        image: When given, the diameter must also not exceed the image's largest extent.

    Returns:
        The diameter as a float.

    Raises:
        UserError: Naming ``name`` and the value.
    """
    try:
        d = float(diameter_mm)
    except (TypeError, ValueError):
        d = math.nan
    if not (math.isfinite(d) and d > 0):
        raise UserError(f"{name} {diameter_mm!r}: must be a positive, finite number of mm (e.g. 15)")
    if d > MAX_DIAMETER_MM:
        raise UserError(
            f"{name} {d:g} mm: larger than any plausible liver lesion (at most {MAX_DIAMETER_MM:g} mm); "
            f"give the lesion's diameter in mm (not um or another unit), e.g. 15"
        )
    if image is not None:
        lo, hi = physical_bounds(image)
        extent = float(np.max(hi - lo))
        if d > extent:
            raise UserError(
                f"{name} {d:g} mm: larger than the image itself (largest extent {extent:.1f} mm); "
                f"give the lesion's diameter in mm, e.g. 15"
            )
    return d


def _fmt_xyz(p: Sequence[float]) -> str:
    """A point for messages: one decimal, or 4 significant digits once a coordinate is absurdly large."""
    return "(" + ", ".join(f"{v:.1f}" if abs(v) < 1e6 else f"{v:.4g}" for v in p) + ")"


def lesion_from_click(
    image: Volume,
    point_xyz_mm: Sequence[float],
    diameter_mm: float,
    patient_id: str = "",
    lesion_class: str = "",
    *,
    lesion_id: str | None = None,
    image_ref: str = "",
    point_name: str = "point",
    method: str = "grow",
) -> LesionWithMask:
    """A lesion around a clicked LPS point, grown from it within ``diameter_mm`` (:mod:`liverlesion.click`).

    ``method="grow"`` (the default) grows the lesion from the click, bounded by intensity and by
    the diameter; where no edge is found it is capped at the sphere of the diameter, and where
    growing fails it is that sphere (each with a one-line warning). ``method="sphere"`` gives the
    sphere directly. The sphere is round in millimetres (an ellipsoid in voxels when the spacing
    is anisotropic); parts outside the volume are clipped with a warning; the voxel nearest the
    point is always included, so a tiny diameter still gives a lesion. The record's
    ``measurement`` says how it was made; a click's measurements are always estimates.

    Args:
        image: CT volume (HU).
        point_xyz_mm: Click position ``(x, y, z)`` in LPS mm (DICOM patient coordinates).
        diameter_mm: Lesion diameter in mm (> 0).
        patient_id: Patient identifier.
        lesion_class: Class name.
        lesion_id: Identifier (default ``{patient_id}-L01``).
        image_ref: Image reference stored in the record.
        point_name: How the point is named in error messages.
        method: ``"grow"`` or ``"sphere"``.

    Returns:
        ``(Lesion, LesionMask)``: the lesion's voxels inside the image, as a crop.

    Raises:
        UserError: Bad diameter or method, point outside the volume, or point in air.
    """
    if method not in ("grow", "sphere"):
        raise UserError(f"click method {method!r}: expected 'grow' or 'sphere'")
    point = np.asarray(point_xyz_mm, dtype=float).reshape(-1)
    if point.shape != (3,) or not np.all(np.isfinite(point)):
        raise UserError(f"{point_name} {tuple(point_xyz_mm)}: expected three finite numbers x,y,z in LPS mm")
    check_diameter(diameter_mm, f"{point_name} diameter", image)
    centre = image.physical_to_index(point)
    if not image.contains_index(centre):
        lo, hi = physical_bounds(image)
        extent = ", ".join(f"{a} {mn:.1f}..{mx:.1f}" for a, mn, mx in zip("xyz", lo, hi, strict=True))
        hint = "check the coordinates are LPS mm (DICOM patient coordinates) for this image"
        flipped = point * np.array([-1.0, -1.0, 1.0])
        if image.contains_index(image.physical_to_index(flipped)):
            hint = (
                f"it looks like RAS coordinates (e.g. from 3D Slicer): negate x and y to use LPS, "
                f"i.e. {_fmt_xyz(flipped)}"
            )
        raise UserError(
            f"{point_name} {_fmt_xyz(point)} mm is outside the image, whose LPS extent is {extent} mm; {hint}"
        )
    near = np.clip(np.round(centre).astype(int), 0, np.asarray(image.shape) - 1)
    # Median of the 3x3x3 neighbourhood: robust to noise and a single odd voxel.
    nb = image.array[tuple(slice(max(c - 1, 0), c + 2) for c in near)]
    hu_at = float(np.median(nb))
    if hu_at < AIR_THRESHOLD_HU:
        raise UserError(
            f"{point_name} {_fmt_xyz(point)} mm is in air (HU {hu_at:.0f} < {AIR_THRESHOLD_HU:.0f}): outside the body "
            "(or in lung / bowel gas); check the coordinates are LPS mm on this image"
        )
    if method == "sphere":
        region = sphere_region(image, centre, diameter_mm, f"{point_name} {_fmt_xyz(point)} mm")
    else:
        region = grow_from_click(image, centre, diameter_mm, f"{point_name} {_fmt_xyz(point)} mm")
    crop, off = region.crop, region.offset
    m = measure_lesion(image, crop, off)
    lesion = Lesion(
        lesion_id=lesion_id or make_lesion_id(patient_id, 1),
        patient_id=patient_id,
        lesion_class=lesion_class,
        image=image_ref,
        mask="",
        label=None,
        source="click",
        **m,
        measurement=region.measurement,
    )
    return lesion, LesionMask(crop, tuple(int(o) for o in off), tuple(image.shape))
