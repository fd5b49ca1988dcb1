"""The synthetic worlds of configs/worlds.yaml and the phantom keys they use: sub-pixel cracks, fractures without
displacement, posterior-only breaks, basivertebral foramina (measured on the rendered HU, not on the generator's
own tables where possible)."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.runs.config import ConfigError, load_config
from data_prep.synthetic import phantom
from data_prep.synthetic.synth import _sample_fractures, make_grid, synth_config, world_names, world_overrides

# no noise, no blur, no pose: the rendered HU is the geometry itself
CLEAN = ["image.size=128", "image.fov_mm=[50.0, 50.0]", "volume.slices=60", "hu.noise_sigma=[0.0, 0.0]",
         "hu.trabecular_sigma=0.0", "hu.blur_px=[0.0, 0.0]", "anatomy.yaw_deg=[0.0, 0.0]",
         "anatomy.roll_deg=[0.0, 0.0]", "anatomy.vascular_channel_prob=0.0", "anatomy.osteophyte_prob=0.0",
         "anatomy.low_density_prob=0.0", "anatomy.density_jitter=0.0"]
LEVEL = "C5"


def _anatomy(cfg, seed: int = 4):
    rng = np.random.default_rng(seed)
    anatomy = phantom.build_anatomy(rng, cfg["anatomy"])
    return anatomy, make_grid(rng, anatomy, cfg), rng


def _render(anatomy, fractures, grid, cfg):
    return phantom.render(anatomy, fractures, grid, cfg["hu"], np.random.default_rng(0))


def test_worlds_load_and_differ_only_in_fractures_and_look_alikes():
    names = world_names()
    assert names == ("coarse", "default", "subtle")
    base = load_config("synth").to_dict()
    for name in names:
        cfg = synth_config(name).to_dict()
        changed = {section for section in base if cfg[section] != base[section]}
        assert changed <= {"fracture", "anatomy", "hu"}, name
        for section in ("anatomy", "hu"):       # only the look-alike keys of these two sections
            keys = {k for k in base[section] if cfg[section][k] != base[section][k]}
            assert keys <= {"vascular_channel_prob", "vascular_width_mm", "foramen_prob", "foramen_width_mm",
                            "min_channel_px"}, (name, keys)
    assert world_overrides("default") == []
    subtle = synth_config("subtle")
    assert subtle.fracture.gap_mm == [0.3, 1.0] and subtle.fracture.min_gap_px == 0.0
    assert subtle.anatomy.foramen_width_mm == subtle.fracture.gap_mm == subtle.anatomy.vascular_width_mm
    with pytest.raises(ConfigError, match="did you mean 'subtle'"):
        world_overrides("subtel")


def test_demo_studies_are_the_coarse_world():
    """The demo names its world; its fractures are the ones the README's demo figures were measured on."""
    demo = load_config("pipeline").demo
    cfg = synth_config(demo.world, None, list(demo.synth_set))
    assert demo.world == "coarse"
    assert (cfg.fracture.gap_mm, cfg.fracture.shift_mm) == ([1.5, 2.5], [1.5, 3.0])


def test_set_wins_over_the_world(tmp_path):
    from spinefrac.cli import main

    assert main(["synth", str(tmp_path / "s"), "--studies", "1", "--size", "64", "--slices", "16", "--world",
                 "subtle", "--set", "fracture.gap_mm=[0.4, 0.4]", "--no-progress"]) == 0
    import json
    meta = json.loads((tmp_path / "s" / "synth.meta.json").read_text())
    assert meta["config"]["fracture"]["gap_mm"] == [0.4, 0.4]
    assert meta["config"]["anatomy"]["foramen_prob"] == 0.5        # the rest of the world applies
    assert main(["synth", str(tmp_path / "t"), "--studies", "1", "--world", "nope", "--no-progress"]) == 2


@pytest.mark.parametrize("width_mm", [0.25, 0.5, 1.0])
def test_a_crack_renders_a_lucent_line_of_the_requested_width(width_mm):
    """A sagittal crack through the body, no shift: its HU deficit across a row integrates to its width.

    Pixels are 50/128 = 0.39 mm: 0.25 mm is 0.64 px, which the old one-pixel floor widened to 0.39 mm.
    """
    cfg = load_config("synth", None, [*CLEAN, "fracture.min_gap_px=0.0"])
    anatomy, grid, _ = _anatomy(cfg)
    part = anatomy.vertebrae[LEVEL]
    h = part.dims["body_h"]
    crack = phantom.Fracture(LEVEL, "body", frozenset({"body"}), np.array([1.0, 0.0, 0.0]), np.zeros(3),
                             (-h / 2, h / 2), width_mm, np.zeros(3))
    broken, intact = _render(anatomy, [crack], grid, cfg), _render(anatomy, [], grid, cfg)
    x0, y0, z0 = part.frame.origin
    k = int(round((grid.z_top - z0) / grid.thickness))
    row0 = int(round((y0 - grid.origin_xy[1]) / grid.spacing))
    rows = range(row0 - 4, row0 + 5)            # well inside the cancellous bone, away from the cortex
    s = grid.spacing
    soft = cfg["hu"]["muscle"]
    widths, peaks = [], []
    for r in rows:
        bone = intact.hu[k, r] > soft + 100
        deficit = (intact.hu[k, r] - broken.hu[k, r])[bone]
        contrast = intact.hu[k, r][bone] - soft
        assert np.all(deficit > -0.01)              # float32 rounding only: the crack never adds bone
        widths.append(float((deficit / contrast).sum() * s))
        peaks.append(float((deficit / contrast).max()))
    assert np.median(widths) == pytest.approx(width_mm, rel=0.05)
    assert max(peaks) <= min(1.0, width_mm / s) + 1e-3        # a thin line is not widened to a pixel
    assert broken.fracture_boxes[0], "the renderer must see the thin crack (its truth boxes)"


def test_posterior_only_cracks_leave_the_body_intact():
    kinds = "{body: 0.0, teardrop: 0.0, arch: 1.0, complex: 0.0, spinous: 0.0, tp: 0.0}"
    cfg = load_config("synth", None, [*CLEAN, *world_overrides("subtle"), "anatomy.foramen_prob=0.0",
                                      "anatomy.vascular_channel_prob=0.0", f"fracture.kinds_lower={kinds}",
                                      "fracture.pillar_share=0.0", "fracture.tp_share=0.0",
                                      "fracture.gap_mm=[0.6, 0.6]"])
    anatomy, grid, rng = _anatomy(cfg, seed=7)
    fractures = _sample_fractures(rng, anatomy, (LEVEL,), grid, cfg["fracture"])
    assert fractures and all(f.elements <= {"arch_L", "arch_R"} for f in fractures)
    broken, intact = _render(anatomy, fractures, grid, cfg), _render(anatomy, [], grid, cfg)
    assert any(broken.fracture_boxes)
    ks, rs, cs = np.nonzero(np.abs(broken.hu - intact.hu) > 50)
    assert len(ks) > 10
    ox, oy = grid.origin_xy
    part = anatomy.vertebrae[LEVEL]
    u, v, w = part.frame.to_local(ox + cs * grid.spacing, oy + rs * grid.spacing, grid.z_top - ks * grid.thickness)
    body = next(sh for sh in part.shapes if sh.element == "body")
    # nothing changed inside the body beyond its cortex (where a pedicle joins it, the break moves the cortex line)
    assert body.sdf(u, v, w).min() > -(cfg["hu"]["cortex_mm"][1] + grid.spacing)


def test_undisplaced_share_draws_no_shift():
    cfg = load_config("synth", None, [*CLEAN, "fracture.no_shift_prob=1.0"])
    anatomy, grid, rng = _anatomy(cfg)
    fractures = _sample_fractures(rng, anatomy, ("C2", "C5", "C7"), grid, cfg["fracture"])
    assert fractures and all(float(np.linalg.norm(f.shift)) == 0.0 for f in fractures)
    cfg = load_config("synth", None, [*CLEAN, "fracture.no_shift_prob=0.0"])
    anatomy, grid, rng = _anatomy(cfg)
    assert all(np.linalg.norm(f.shift) > 0 for f in _sample_fractures(rng, anatomy, ("C5",), grid, cfg["fracture"]))


def test_foramina_cross_the_posterior_cortex_and_are_not_fractures():
    """Every body gets a foramen: it removes cortex behind the body, and changes neither labels nor fracture truth."""
    cfg = load_config("synth", None, [*CLEAN, *world_overrides("subtle"), "anatomy.vascular_channel_prob=0.0",
                                      "anatomy.foramen_prob=1.0", "anatomy.foramen_width_mm=[0.8, 0.8]"])
    anatomy, grid, rng = _anatomy(cfg)
    fractures = _sample_fractures(rng, anatomy, ("C2",), grid, cfg["fracture"])
    with_foramina = _render(anatomy, fractures, grid, cfg)
    for part in anatomy.parts:
        part.foramina = []
    without = _render(anatomy, fractures, grid, cfg)
    assert with_foramina.fracture_boxes == without.fracture_boxes
    np.testing.assert_array_equal(with_foramina.labels, without.labels)
    ks, rs, cs = np.nonzero(without.hu - with_foramina.hu > 300)     # bone removed
    ox, oy = grid.origin_xy
    hits = set()
    for name in ("C3", "C4", "C5", "C6", "C7"):
        part = anatomy.vertebrae[name]
        u, v, w = part.frame.to_local(ox + cs * grid.spacing, oy + rs * grid.spacing, grid.z_top - ks * grid.thickness)
        mine = (np.abs(w) < part.dims["body_h"] / 2) & (np.abs(u) < part.dims["body_hw"] / 2)
        if not mine.any():
            continue
        hits.add(name)
        cortex = cfg["hu"]["cortex_mm"][1]
        assert (v[mine] > part.dims["body_hd"] - cortex).any()        # through the posterior cortex
        assert v[mine].min() > 0                                      # into the posterior half only
    assert len(hits) >= 4, hits
