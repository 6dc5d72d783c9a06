"""Peer benchmark: TIAToolbox 2.1.3's HoVer-Net nucleus instance segmentation against ``cerberus infer-wsi``, same crop.

One run, one real slide crop (``../shared/data/CMU-1-Small-Region.svs``, level 0 at 0.499 um/px): the ``--size``
(1024) px square at 0.5 um/px with the most tissue (tissue mask of the slide, then darkness as a tie-break) is
read with ``open_slide(...).read_region`` and written as a tiled TIFF with its resolution (0.5 um/px, pixels per
cm). Both tools read that same file; then, one after the other in fresh processes:

(a) TIAToolbox (in its own virtual environment, ``--venv``): ``NucleusInstanceSegmentor`` (the WSI engine,
    ``patch_mode=False``) with a ``HoVerNet(num_types=6, mode="fast")`` of **random weights** (seed 0, BatchNorm
    calibrated on random images as ``model_speed.calibrated`` does, saved before and passed as ``weights=``, so
    nothing is downloaded) and an ``IOInstanceSegmentorConfig`` equal to that of ``hovernet_fast-pannuke``:
    windows 256 -> 164, stride 164, tiles 1024 with margin 128, at **0.5 um/px**: the same pixels as ours, as the
    issue measured it (``--tia-mpp 0.25`` runs it at the pretrained model's resolution instead: TIA then reads the
    crop upsampled x2, 4x the pixels, as a user of that model would). CPU, its defaults otherwise (batch 8, 0 workers, its own tissue mask, HoVer-Net's own
    post-processing, zarr output; 2.1.3 skips its default torch.compile when it sees no GPU). Nuclei: the
    instances in its output. TIAToolbox's ``WSIReader`` opens the crop as a ``TIFFWSIReader`` at 0.5 um/px
    with the same pixels.
(b) ``cerberus infer-wsi --model MODEL --input CROP --output OUT`` with no other option; MODEL is the original
    preset with random weights (seed 0, calibrated BatchNorm). Objects: ``counts`` of ``OUT/done/{stem}.json``;
    the settings its defaults chose (precision, layout, batch) are printed from its metadata.

With random weights the object counts are arbitrary (HoVer-Net's finds few nuclei, so its per-instance
post-processing costs little here: its figure is a lower bound).

Each is timed as a whole subprocess (start-up, imports and model loading included; weight preparation is not),
with the peak RSS of its process tree sampled every 0.1 s. Printed: both, the ratio TIA wall / ours wall and
whether the target (>= x10: six heads against HoVer-Net's one) is met. Neither side's threads are set: each
reports ``torch.get_num_threads()``. The load average is printed at start and end (the machine may be shared).

    python benchmarks/peer_tiatoolbox.py --install        # once: venv + pip install tiatoolbox==2.1.3 (minutes)
    python benchmarks/peer_tiatoolbox.py --json peer.json  # ~2 min of TIA + ~13 s of ours on 2 idle cores
    python benchmarks/peer_tiatoolbox.py --venv /tmp/tiavenv --size 256 --skip-ours
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SLIDE = ROOT.parent / "shared" / "data" / "CMU-1-Small-Region.svs"
TIA_VERSION = "2.1.3"
TARGET = 10.0

# Run with the venv's python: ``prep WEIGHTS`` (untimed) or ``run CROP SAVE_DIR MPP WEIGHTS`` (timed); ``run``
# prints one JSON line last.
TIA_CHILD = r'''
import json, sys, time
from pathlib import Path
import numpy as np, torch
from tiatoolbox.models.architecture.hovernet import HoVerNet

TYPES = {0: "Background", 1: "Neoplastic", 2: "Inflammatory", 3: "Connective", 4: "Dead",
         5: "Non-Neoplastic Epithelial"}
torch.manual_seed(0)
model = HoVerNet(num_types=6, mode="fast", nuc_type_dict=TYPES)
if sys.argv[1] == "prep":  # random weights, BatchNorm statistics measured on random images
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randint(0, 256, (4, 3, 256, 256)).float())
    torch.save(model.state_dict(), sys.argv[2])
    sys.exit(0)

from tiatoolbox.models.engine.io_config import IOInstanceSegmentorConfig
from tiatoolbox.models.engine.nucleus_instance_segmentor import NucleusInstanceSegmentor

crop, save_dir, mpp, weights = sys.argv[2], Path(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
res = {"units": "mpp", "resolution": mpp}
ioconfig = IOInstanceSegmentorConfig(  # hovernet_fast-pannuke's, at `mpp`
    input_resolutions=[res], output_resolutions=[res, res, res], margin=128, tile_shape=(1024, 1024),
    patch_input_shape=(256, 256), patch_output_shape=(164, 164), stride_shape=(164, 164), save_resolution=res,
    ignore_index=0)
engine = NucleusInstanceSegmentor(model=model, weights=weights, device="cpu")
t = time.perf_counter()
out = engine.run([Path(crop)], patch_mode=False, ioconfig=ioconfig, save_dir=save_dir, device="cpu")
engine_s = time.perf_counter() - t
path = Path(next(iter(out.values())))
import zarr
root = zarr.open(str(path), mode="r")  # arrays centroid, box, contours, prob, type: one row per nucleus
arrays = {key: list(root[key].shape) for key in root.array_keys()}
print(json.dumps({"nuclei": arrays["centroid"][0], "patches": len(engine.dataloader.dataset), "arrays": arrays,
                  "engine_s": engine_s, "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "output": str(path)}))
'''


def run_tree(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run ``cmd``; its wall seconds, the peak RSS (MB) of its process tree sampled every 0.1 s, its last stdout line.
    stdout and stderr go to ``log``; a failure exits with one line naming the log."""
    from wsi_scale import wait_peak_rss

    with open(log, "w") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, env=env)
        peak = wait_peak_rss(proc)
        wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"failed (exit {proc.returncode}): {' '.join(map(str, cmd[:3]))} ...; see {log}")
    lines = log.read_text().strip().splitlines()
    return {"wall_s": wall, "peak_rss_mb": peak / 2**20, "last_line": lines[-1] if lines else ""}


def tia_python(venv: Path, install: bool) -> Path:
    """The venv's python with tiatoolbox importable; created and installed with ``install``."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import tiatoolbox; print(tiatoolbox.__version__)"]
    ok = python.exists() and subprocess.run(probe, capture_output=True, text=True).returncode == 0
    if ok or not install:
        if not ok:
            print(f"no TIAToolbox in {venv}; pass --install to create it (or --venv DIR)", file=sys.stderr)
            sys.exit(2)
        return python
    print(f"installing tiatoolbox=={TIA_VERSION} into {venv} (with its own torch; this may take minutes)", flush=True)
    if not python.exists():
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--upgrade", "pip"], check=True)
    subprocess.run([str(python), "-m", "pip", "install", f"tiatoolbox=={TIA_VERSION}"], check=True)
    if subprocess.run(probe, capture_output=True).returncode:
        sys.exit(f"tiatoolbox installed into {venv} but does not import; run: {python} -c 'import tiatoolbox'")
    return python


def make_crop(slide: Path, size: int, out: Path, mpp: float = 0.5) -> tuple[int, int]:
    """Write the ``size`` px square at ``mpp`` with the most tissue as a tiled TIFF; its level-0 corner (x, y)."""
    import numpy as np
    import tifffile

    from cerberus_histo.io.slides import open_slide
    from cerberus_histo.io.tissue import tissue_mask

    with open_slide(slide) as reader:
        mask, mask_mpp = tissue_mask(reader, 4.0)
        dark = 255.0 - reader.thumbnail(mask_mpp)[: mask.shape[0], : mask.shape[1]].mean(axis=2)
        win = max(1, round(size * mpp / mask_mpp))
        if win > min(mask.shape):
            sys.exit(f"{slide.name} is smaller than a {size} px square at {mpp} um/px; lower --size")
        score = mask.astype(np.float64) * 256 + dark  # tissue first, then darkness
        sat = np.pad(score.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        sums = sat[win:, win:] - sat[:-win, win:] - sat[win:, :-win] + sat[:-win, :-win]
        iy, ix = np.unravel_index(int(np.argmax(sums)), sums.shape)  # first maximum: deterministic
        x0, y0 = round(ix * mask_mpp / reader.mpp), round(iy * mask_mpp / reader.mpp)
        image = reader.read_region((x0, y0), (size, size), mpp)
    tifffile.imwrite(out, image, tile=(256, 256), photometric="rgb", resolution=(1e4 / mpp, 1e4 / mpp),
                     resolutionunit="CENTIMETER", metadata=None)
    return int(x0), int(y0)


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", type=Path, default=Path.home() / ".cache" / "cerberus-bench" / "tiatoolbox-venv",
                    help="TIAToolbox's virtual environment")
    ap.add_argument("--install", action="store_true", help=f"create --venv with tiatoolbox=={TIA_VERSION} if needed")
    ap.add_argument("--size", type=int, default=1024, help="crop side in px at 0.5 um/px")
    ap.add_argument("--tia-mpp", type=float, default=0.5,
                    help="TIA's processing resolution (default: the crop's; the pretrained model's is 0.25)")
    ap.add_argument("--skip-tia", action="store_true")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--slide", type=Path, default=SLIDE)
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=None, help="write all figures here too")
    args = ap.parse_args(argv)
    if not args.slide.is_file():
        sys.exit(f"{args.slide}: slide not found (../shared/data beside the project)")
    python = None if args.skip_tia else tia_python(args.venv, args.install)

    import torch
    from model_speed import machine

    work = args.work or Path(tempfile.mkdtemp(prefix="cerberus-peer-tia-"))
    work.mkdir(parents=True, exist_ok=True)
    res = {"machine": machine("cpu"), "load_start": load(), "size": args.size, "slide": str(args.slide)}
    print(f"machine: {res['machine']}; load average {res['load_start']}", flush=True)
    crop = work / f"crop_{args.size}.tif"
    res["crop_xy"] = make_crop(args.slide, args.size, crop)
    print(f"crop: {args.size} x {args.size} px at 0.5 um/px from level-0 {tuple(res['crop_xy'])} of "
          f"{args.slide.name} -> {crop}", flush=True)

    if python is not None:
        child, weights = work / "tia_child.py", work / "hovernet_random.pth"
        child.write_text(TIA_CHILD)
        if not weights.exists():  # untimed; kept in --work for later runs
            if subprocess.run([str(python), str(child), "prep", str(weights)], capture_output=True).returncode:
                sys.exit(f"could not build HoVer-Net's random weights; run: {python} {child} prep {weights}")
        out = work / "tia_out"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        r = run_tree([str(python), str(child), "run", str(crop), str(out), str(args.tia_mpp), str(weights)],
                     work / "tia.log")
        r.update(json.loads(r.pop("last_line")))
        res["tia"] = r
        print(f"TIAToolbox {TIA_VERSION} HoVer-Net fast (random, {args.tia_mpp} um/px, torch {r['torch']}, "
              f"{r['threads']} threads, {r['patches']} patches of 256): wall {r['wall_s']:.1f} s (engine.run {r['engine_s']:.1f} s), peak RSS "
              f"{r['peak_rss_mb']:.0f} MB, nuclei {r['nuclei']}", flush=True)

    if not args.skip_ours:
        from wsi_scale import build_model

        model = build_model(work / "cerberus_model")
        out = work / "ours_out"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        cli = Path(sys.executable).with_name("cerberus")
        cmd = [str(cli)] if cli.exists() else [sys.executable, "-m", "cerberus_histo"]
        r = run_tree([*cmd, "infer-wsi", "--model", str(model), "--input", str(crop), "--output", str(out)],
                     work / "ours.log")
        r.pop("last_line")
        counts = json.loads((out / "done" / f"{crop.stem}.json").read_text())["counts"]
        meta = json.loads((out / f"{crop.stem}_metadata.json").read_text())
        r.update(counts=counts, objects=sum(v for k, v in counts.items() if k != "tissue"),
                 threads=torch.get_num_threads(), window=meta["window"], windows=meta["windows"]["run"],
                 processing_mpp=meta["processing_mpp"], timings_s=meta["timings_s"], settings=meta.get("runtime"))
        res["ours"] = r
        print(f"cerberus infer-wsi (defaults, original preset random, torch {torch.__version__}, {r['threads']} "
              f"threads; {r['processing_mpp']} um/px, geometry {r['window']['input']}/{r['window']['output']}, "
              f"{r['windows']} window(s) run, fitted to the crop): wall {r['wall_s']:.1f} s (in-slide {r['timings_s']['total']:.1f} s), peak RSS "
              f"{r['peak_rss_mb']:.0f} MB, objects {r['objects']} {counts}\n  its settings: {r['settings']}", flush=True)

    if "tia" in res and "ours" in res:
        res["ratio"] = res["tia"]["wall_s"] / res["ours"]["wall_s"]
        res["target_met"] = res["ratio"] >= TARGET
        print(f"TIA wall / ours wall: x{res['ratio']:.2f}; target >= x{TARGET:g} (six heads against HoVer-Net's "
              f"one): {'met' if res['target_met'] else 'NOT met'}")
    res["load_end"] = load()
    print(f"load average at end {res['load_end']}; work folder {work}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
