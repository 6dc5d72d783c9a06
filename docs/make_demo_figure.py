"""Draw docs/demo.jpg (the README's picture) from a finished demo: a held-out tile as image | truth | prediction,
and the whole-slide thumbnail with the predicted objects. Run after `cerberus demo`:

    .venv/bin/python docs/make_demo_figure.py [demo-output]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np

from cerberus_histo.demo.scores import _label as label

OUT = Path(__file__).resolve().parent / "demo.jpg"
W = 1200
MAX_BYTES = 300_000


def read(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise SystemExit(f"{path}: not found or not an image; run `cerberus demo` first")
    return img


def fit_width(img: np.ndarray, width: int) -> np.ndarray:
    h, w = img.shape[:2]
    return cv2.resize(img, (width, round(h * width / w)), interpolation=cv2.INTER_AREA)


def main() -> None:
    demo = Path(sys.argv[1] if len(sys.argv) > 1 else "demo-output")
    report = json.loads((demo / "demo.json").read_text())
    res = report["results"]
    pictures = list(res["evaluate"]["pictures"].values())
    tile = fit_width(read(demo / pictures[0]), W)
    thumb = read(demo / res["wsi"]["files"]["thumbnail"])
    ys, xs = np.nonzero(np.abs(thumb.astype(int) - thumb[0, 0].astype(int)).sum(2) > 30)
    if ys.size:  # crop the white margin around the tissue
        thumb = thumb[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    slide = fit_width(thumb, W)
    slide = slide[: min(slide.shape[0], 520)]
    m = res["evaluate"]["metrics"]["nuclei"]
    label(slide, bottom=True, text=f"whole synthetic slide, {report['mode']} demo: nuclei PQ {m['pq_mean']:.2f} on held-out tiles, "
                 f"{res['wsi']['counts'].get('nuclei', 0):,} nuclei on the slide")
    gap = np.full((8, W, 3), 255, np.uint8)
    fig = np.concatenate([tile, gap, slide])
    for quality in (85, 80, 75, 70, 60, 50):
        ok, buf = cv2.imencode(".jpg", fig, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if ok and buf.size <= MAX_BYTES:
            break
    OUT.write_bytes(buf.tobytes())
    print(f"wrote {OUT} ({fig.shape[1]} x {fig.shape[0]}, {buf.size / 1e3:.0f} KB, quality {quality})")


if __name__ == "__main__":
    main()
