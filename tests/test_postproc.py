import subprocess
import sys

import numpy as np
import pytest
from postproc_reference import gland_loop, nuclei_loop, records_loop, types_loop
from scipy import ndimage as ndi

from cerberus_histo.data.synthetic import synth_tile
from cerberus_histo.data.targets import instance_target
from cerberus_histo.postproc import (
    LUMEN_PARAMS,
    GlandParams,
    NucleiParams,
    gland_instances,
    instance_types,
    link_lumina,
    measure,
    nuclei_instances,
    postprocess,
)


def probs_from_truth(inst, k, rng, noise=0.08, blur=1.0):
    """Softmax-like maps (background, interior, contour) from a true instance map, blurred and noisy."""
    label = instance_target(inst, k)
    p = np.stack([(label == c).astype(np.float32) for c in range(3)])
    p = ndi.gaussian_filter(p, (0, blur, blur)) + rng.normal(0, noise, p.shape).astype(np.float32)
    p = np.clip(p, 1e-3, None)
    return p / p.sum(0, keepdims=True)


def best_iou(true, pred):
    ious = []
    for i in np.unique(true)[1:]:
        m = true == i
        cand = np.unique(pred[m])
        cand = cand[cand > 0]
        ious.append(max([(m & (pred == j)).sum() / (m | (pred == j)).sum() for j in cand], default=0))
    return np.array(ious)


@pytest.fixture(scope="module")
def tile():
    return synth_tile(320, 7)


def test_touching_nuclei_are_separated():
    interior = np.zeros((20, 30), np.float32)
    contour = np.zeros_like(interior)
    interior[5:15, 3:14] = interior[5:15, 16:27] = 0.9
    contour[4:16, 14:16] = 0.9  # the band between them
    contour[4, 2:28] = contour[15, 2:28] = contour[4:16, 2] = contour[4:16, 27] = 0.9
    inst = nuclei_instances(interior, contour)
    assert inst.max() == 2 and inst[10, 8] != inst[10, 20] and inst[10, 8] > 0


def test_sizes_are_physical():
    interior = np.zeros((40, 40), np.float32)
    interior[10:13, 10:13] = 0.9  # 9 px marker and foreground
    contour = np.zeros_like(interior)
    p = NucleiParams(erosion_um=0.0)
    assert nuclei_instances(interior, contour, 0.5, p).max() == 1  # 9 px >= 8 px (2 um2 at 0.5 um/px)
    assert nuclei_instances(interior, contour, 0.25, p).max() == 0  # 2 um2 at 0.25 um/px = 32 px


def test_gland_rim_restored_and_holes_filled():
    inst = np.zeros((120, 120), np.int32)
    inst[20:100, 20:100] = 1
    p = probs_from_truth(inst, 11, np.random.default_rng(0), noise=0.0, blur=0.0)
    p[1, 55:65, 55:65] = 0.0  # a hole in the interior probability
    p[0, 55:65, 55:65] = 1.0
    out = gland_instances(p[1], p[2])
    assert out.max() == 1 and out[60, 60] == 1  # hole filled
    iou = ((out > 0) & (inst > 0)).sum() / ((out > 0) | (inst > 0)).sum()
    assert iou > 0.97  # eroded by 5 px, dilated back by 5 px


def test_lumina_linked_and_clipped_to_their_gland():
    gland = np.zeros((50, 80), np.int32)
    gland[5:45, 5:38], gland[5:45, 42:75] = 1, 2
    lumen = np.zeros_like(gland)
    lumen[15:30, 15:30] = 1
    lumen[20:35, 50:60] = 2
    lumen[10:20, 36:44] = 3  # straddles the gap between glands: clipped, linked to the larger part
    lumen[46:49, 10:20] = 7  # outside every gland (its gland missed): kept whole, without a gland
    out, parents = link_lumina(lumen, gland)
    assert out.max() == 4 and (out[46:49, 10:20] == 4).all() and not out[:, 38:42].any()
    assert parents == {1: 1, 2: 2, 3: 1, 4: 0} and not out[:, 42:].astype(bool)[10:20, :2].any()
    assert all(np.all(gland[out == lid] == gid) for lid, gid in parents.items())


def test_type_vote_by_hand():
    inst = np.array([[1, 1, 1, 2, 2], [1, 1, 0, 2, 2]])
    types = np.array([[3, 3, 5, 0, 0], [5, 0, 0, 0, 4]])
    ids, t, p = instance_types(inst, types, 6)
    assert ids.tolist() == [1, 2] and t.tolist() == [3, 4]  # 2: majority 0, so the non-zero class 4
    assert p.tolist() == pytest.approx([2 / 5, 1 / 4])


def test_records_by_hand():
    inst = np.zeros((10, 12), np.int32)
    inst[2:5, 3:9] = 7
    r = measure(inst).records()[0]
    assert r["id"] == 7 and r["bbox"] == [3, 2, 9, 5] and r["area"] == 18 and r["centroid"] == [5.5, 3.0]
    assert sorted(map(tuple, r["contour"])) == [(3, 2), (3, 4), (8, 2), (8, 4)]


@pytest.mark.parametrize("seed", range(3))
def test_equal_to_the_per_instance_versions(seed):
    t = synth_tile(256, 40 + seed)
    rng = np.random.default_rng(seed)
    p = probs_from_truth(t.nuclei_inst, 3, rng)
    assert np.array_equal(nuclei_instances(p[1], p[2]), nuclei_loop(p[1], p[2]))
    g = probs_from_truth(t.gland_inst, 11, rng)
    assert np.array_equal(gland_instances(g[1], g[2]), gland_loop(g[1], g[2]))
    lum = probs_from_truth(t.lumen_inst, 3, rng)
    assert np.array_equal(gland_instances(lum[1], lum[2], params=LUMEN_PARAMS),
                          gland_loop(lum[1], lum[2], params=LUMEN_PARAMS))
    type_map = rng.integers(0, 7, t.nuclei_inst.shape)
    ids, types, probs = instance_types(t.nuclei_inst, type_map, 7)
    ref = types_loop(t.nuclei_inst, type_map)
    assert np.array_equal(ids, ref[0]) and np.array_equal(types, ref[1]) and np.allclose(probs, ref[2])
    got = measure(t.nuclei_inst).records()
    for a, b in zip(got, records_loop(t.nuclei_inst), strict=True):
        assert a["id"] == b["id"] and a["bbox"] == b["bbox"] and a["area"] == b["area"]
        assert np.allclose(a["centroid"], b["centroid"]) and np.array_equal(a["contour"], b["contour"])


def test_recovers_synthetic_truth(tile):
    rng = np.random.default_rng(1)
    type_map = np.zeros(tile.nuclei_inst.shape, np.int32)
    for i, c in tile.nuclei_class.items():
        type_map[tile.nuclei_inst == i] = c
    probs = {
        "nuclei-inst": probs_from_truth(tile.nuclei_inst, 3, rng),
        "nuclei-type": np.stack([(type_map == c).astype(np.float32) for c in range(7)]),
        "gland-inst": probs_from_truth(tile.gland_inst, 11, rng),
        "lumen-inst": probs_from_truth(tile.lumen_inst, 3, rng),
        "tissue-class": np.stack([(tile.tissue == c).astype(np.float32) for c in range(9)]),
    }
    out = postprocess(probs, mpp=0.5)
    nuc = out["nuclei"]
    assert abs(len(nuc.instances) - len(tile.nuclei_class)) <= 0.05 * len(tile.nuclei_class)
    assert np.median(best_iou(tile.nuclei_inst, nuc.inst_map)) > 0.8
    # types recovered: the vote over each predicted nucleus gives its true class
    true_of = {i: tile.nuclei_class[int(np.bincount(tile.nuclei_inst[nuc.inst_map == i]).argmax())]
               for i in nuc.instances.ids if np.bincount(tile.nuclei_inst[nuc.inst_map == i]).argmax() > 0}
    agree = np.mean([nuc.instances.types[k] == true_of[i] for k, i in enumerate(nuc.instances.ids) if i in true_of])
    assert agree > 0.95
    assert np.median(best_iou(tile.gland_inst, out["gland"].inst_map)) > 0.85
    lum = out["lumen"]
    assert set(lum.instances.parents) <= set(out["gland"].instances.ids) and (lum.instances.parents > 0).all()
    assert np.array_equal(out["tissue"].class_map, tile.tissue)


def test_no_torch_import():
    code = "import cerberus_histo.postproc, sys; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_empty_maps():
    z = np.zeros((16, 16), np.float32)
    assert nuclei_instances(z, z).max() == 0 and gland_instances(z, z).max() == 0
    assert len(measure(np.zeros((4, 4), np.int32))) == 0
    assert len(postprocess({"gland-inst": np.stack([z + 1, z, z])})["gland"].instances) == 0
    assert GlandParams().min_area_um2 == 250.0
