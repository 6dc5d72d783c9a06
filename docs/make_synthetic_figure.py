"""Draw docs/synthetic_samples.jpg: synthetic tiles with their labels, a patch per tissue class, and
examples of each nucleus type.  Run: .venv/bin/python docs/make_synthetic_figure.py"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage as ndi

from cerberus_histo.data.synthetic import synth_patch, synth_tile
from cerberus_histo.tasks import GLAND, LUMEN, NUCLEI, TISSUE

OUT = Path(__file__).resolve().parent / "synthetic_samples.jpg"
W = 1280


def contours(img, inst, colour_of, thickness=1):
    for i, sl in enumerate(ndi.find_objects(inst)):
        if sl is None:
            continue
        m = (inst[sl] == i + 1).astype(np.uint8)
        cs, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE, offset=(sl[1].start, sl[0].start))
        cv2.drawContours(img, cs, -1, colour_of(i + 1), thickness)


def label(img, text, y=16, x=4, scale=0.45):
    cv2.putText(img, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(img, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)


def main():
    tiles = [synth_tile(320, seed) for seed in (2, 3, 4, 9)]
    raw = np.concatenate([t.image for t in tiles], 1)
    over = []
    for t in tiles:
        img = t.image.copy()
        contours(img, t.nuclei_inst, lambda i, t=t: NUCLEI.class_colors[t.nuclei_class[i]])
        contours(img, t.gland_inst, lambda i, t=t: GLAND.class_colors[t.gland_class[i]], 2)
        contours(img, t.lumen_inst, lambda i: LUMEN.class_colors[1], 2)
        names = sorted({TISSUE.class_names[c] for c in np.unique(t.tissue)})
        label(img, "tissue: " + ", ".join(names), y=312, scale=0.38)
        over.append(img)
    over = np.concatenate(over, 1)
    patches = []
    for c, name in enumerate(TISSUE.class_names):
        p = cv2.resize(synth_patch(c, 144, c), (142, 142), interpolation=cv2.INTER_AREA)
        label(p, name, y=136, scale=0.4)
        patches.append(p)
    patches = np.concatenate(patches + [np.full((142, W - 142 * 9, 3), 255, np.uint8)], 1)
    # nucleus gallery: 3 examples of each type, 64 px crops
    crops = {k: [] for k in range(1, 7)}
    for seed in range(30):
        t = synth_tile(320, 100 + seed)
        for i, sl in enumerate(ndi.find_objects(t.nuclei_inst)):
            k = t.nuclei_class.get(i + 1)
            if sl is None or len(crops[k]) >= 3:
                continue
            cy, cx = (sl[0].start + sl[0].stop) // 2, (sl[1].start + sl[1].stop) // 2
            if 32 <= cy < 288 and 32 <= cx < 288:
                crops[k].append(cv2.resize(t.image[cy - 32:cy + 32, cx - 32:cx + 32], (70, 70), interpolation=cv2.INTER_NEAREST))
    gallery = []
    for k in range(1, 7):
        cell = np.concatenate(crops[k], 1)
        head = np.full((20, cell.shape[1], 3), 255, np.uint8)
        cv2.putText(head, NUCLEI.class_names[k], (3, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        gallery.append(np.concatenate([head, cell], 0))
    gallery = np.concatenate(gallery + [np.full((90, W - 210 * 6, 3), 255, np.uint8)], 1)
    figure = np.concatenate([raw, over, patches, gallery], 0)
    cv2.imwrite(str(OUT), figure[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 88])
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
